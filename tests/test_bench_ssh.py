"""The ssh runner against a REAL sshd on localhost that these tests start (key auth, a temp dir, a free port).

The "board" is this machine: the runner copies the artifact and remote_runner.py over SFTP into a mktemp dir and
runs them with this venv's Python ($EFFAI_REMOTE_PYTHON). Skipped only when /usr/sbin/sshd is missing outside CI;
in CI (CI=true) a missing sshd fails, since .ci/run installs openssh-server.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effai.device_bench import artifact as artifact_mod
from effai.device_bench.base import BenchConfig
from effai.device_bench.runners import RunnerError, open_runner
from effai.errors import EffaiError

SSHD = Path("/usr/sbin/sshd")
REMOTE_RUNNER = Path(__file__).resolve().parents[1] / "effai" / "device_bench" / "remote_runner.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def start_sshd(d: Path, sftp: bool = True):
    """A real sshd on 127.0.0.1:<free port> in `d` accepting one user key (with or without an SFTP subsystem);
    returns (process, log file, facts)."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("/usr/sbin/sshd is missing in CI: .ci/run must install openssh-server")
        pytest.skip("/usr/sbin/sshd not installed (apt-get install openssh-server); the ssh runner is untested here")
    host_key = keygen(d / "host_ed25519")
    user_key = keygen(d / "user_ed25519")
    (d / "authorized_keys").write_text((d / "user_ed25519.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"AuthorizedKeysFile {d}/authorized_keys",
        f"PidFile {d}/sshd.pid", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        *(["Subsystem sftp internal-sftp"] if sftp else []), "LogLevel ERROR", ""]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.1)
    pub = (d / "host_ed25519.pub").read_text().split()
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return proc, log, {"port": port, "key": user_key, "known_hosts": known, "dir": d, "user": getpass.getuser()}


def stop_sshd(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:<free port> accepting one user key; yields its facts, killed at the end."""
    proc, log, facts = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield facts
    stop_sshd(proc, log)


@pytest.fixture
def board(sshd, monkeypatch):
    """Environment for talking to the local sshd as a board; returns the --device spec."""
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(sshd["known_hosts"]))
    monkeypatch.setenv("EFFAI_SSH_KEY", str(sshd["key"]))
    monkeypatch.setenv("EFFAI_REMOTE_PYTHON", sys.executable)
    return f"ssh:{sshd['user']}@127.0.0.1:{sshd['port']}"


def test_tflite_over_ssh(board, small_exports):
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    cfg = BenchConfig(warmup=2, runs=5)
    runner = open_runner(board, cfg)
    try:
        t0 = time.time()
        t = runner.run(art, 1, cfg)
        t1 = time.time()
        assert t.runtime == "litert" and t.runtime_version
        assert len(t.samples_ms) == 5 and all(s > 0 for s in t.samples_ms)
        assert t.load_ms > 0 and t.first_ms > 0 and t.warmup == 2 and t.threads == 1
        assert t.extra["complete"] is True
        assert t0 - 1 <= t.window_s[0] <= t.window_s[1] <= t1 + 1  # on the host's clock
        remote_dir = Path(t.extra["board_dir"])
        assert remote_dir.name.startswith("effai-") and not remote_dir.exists()  # cleaned up
        d = runner.describe()
        assert d["transport"] == "ssh" and "ai-edge-litert" in d["python"]["runtimes"]
        assert runner.fs.read_text(str(REMOTE_RUNNER)) == REMOTE_RUNNER.read_text()
        assert "remote_runner.py" in runner.fs.listdir(str(REMOTE_RUNNER.parent))
        assert runner.fs.run(["echo", "a b; echo c"]) == (0, "a b; echo c\n")  # quoted: one argument, no 2nd command
        assert runner.fs.run(["no-such-program-effai"])[0] == 127
    finally:
        runner.close()


def test_unknown_host_key_refused_then_trusted(board, sshd, tmp_path, monkeypatch):
    kh = tmp_path / "known_hosts"
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(kh))
    with pytest.raises(EffaiError, match="--trust-new-host.*ssh-keyscan"):
        open_runner(board, BenchConfig())
    assert not kh.exists()
    open_runner(board, BenchConfig(trust_new_host=True)).close()
    assert f"[127.0.0.1]:{sshd['port']}" in kh.read_text()
    open_runner(board, BenchConfig()).close()  # stored: accepted without the flag now


def test_known_hosts_is_appended_to_never_rewritten_and_revoked_keys_refused(board, sshd, tmp_path, monkeypatch):
    kh = tmp_path / "known_hosts"
    theirs = ("# the user's own notes\n"
              "@cert-authority *.corp ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH4yJ3uZl2Nq0Jv9lH9eZkY3n1V1WZ3O5c1kB8o8xYzQ\n"
              "github.com sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIBZnK0\n"
              "garbage line\n")
    kh.write_text(theirs)
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(kh))
    with pytest.raises(EffaiError, match="--trust-new-host"):     # markers and unknown key types do not crash it
        open_runner(board, BenchConfig())
    open_runner(board, BenchConfig(trust_new_host=True)).close()
    text = kh.read_text()
    assert text.startswith(theirs) and text.count("\n") == theirs.count("\n") + 1    # one line appended
    open_runner(board, BenchConfig(trust_new_host=True)).close()
    assert kh.read_text() == text                                                   # known: nothing appended
    server_key = (Path(sshd["dir"]) / "host_ed25519.pub").read_text().split()
    kh.write_text(text + f"@revoked * {server_key[0]} {server_key[1]}\n")
    with pytest.raises(EffaiError, match="@revoked"):
        open_runner(board, BenchConfig())


def test_wrong_key_is_an_auth_error(board, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFAI_SSH_KEY", str(keygen(tmp_path / "other")))
    with pytest.raises(EffaiError, match="authentication .* failed.*ssh-copy-id"):
        open_runner(board, BenchConfig())


def test_closed_port_is_unreachable(sshd, monkeypatch):
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(sshd["known_hosts"]))
    from tests.helpers import refused_port

    with refused_port() as closed, pytest.raises(EffaiError, match="cannot reach"):
        open_runner(f"ssh:{sshd['user']}@127.0.0.1:{closed}", BenchConfig())


def test_missing_runtime_on_board(board, small_exports, tmp_path, monkeypatch):
    # The board's Python without any TFLite runtime: the real remote_runner, with those imports blocked.
    blocker = tmp_path / "no_tflite.py"
    blocker.write_text("import runpy, sys\n"
                       "sys.modules['ai_edge_litert'] = None\nsys.modules['tflite_runtime'] = None\n"
                       "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    monkeypatch.setenv("EFFAI_REMOTE_PYTHON", f"{sys.executable} {blocker}")
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    cfg = BenchConfig(warmup=1, runs=2)
    runner = open_runner(board, cfg)
    try:
        with pytest.raises(RunnerError, match="pip install ai-edge-litert") as e:
            runner.run(art, 1, cfg)
        assert e.value.partial is None
    finally:
        runner.close()


def test_connection_lost_mid_run_keeps_partial(board, small_exports, tmp_path, monkeypatch):
    # The board's Python relays remote_runner's output and, once the timed loop started, kills the sshd session
    # process that carries this connection: the host sees the connection drop mid-run.
    killer = tmp_path / "drop_connection.py"
    killer.write_text(
        "import os, signal, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable] + sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
        "for line in p.stdout:\n"
        "    sys.stdout.write(line); sys.stdout.flush()\n"
        "    if '\"start\"' in line:\n"
        "        pid = os.getppid()\n"
        "        while pid > 1:\n"
        "            comm = open(f'/proc/{pid}/comm').read().strip()\n"
        "            if comm.startswith('sshd'):\n"
        "                os.kill(pid, signal.SIGKILL); break\n"
        "            pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n")
    monkeypatch.setenv("EFFAI_REMOTE_PYTHON", f"{sys.executable} {killer}")
    art = artifact_mod.load(small_exports["tflite"].out_dir)
    cfg = BenchConfig(warmup=1, runs=200)
    runner = open_runner(board, cfg)
    try:
        with pytest.raises(RunnerError, match="lost mid-run") as e:
            runner.run(art, 1, cfg)
        part = e.value.partial
        assert part is not None and part.load_ms > 0 and part.extra["complete"] is False
        assert part.extra["board_dir"] in str(e.value)
        shutil.rmtree(part.extra["board_dir"], ignore_errors=True)  # the "board" is this machine: tidy /tmp
    finally:
        runner.close()


def host_fingerprint(sshd) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(Path(sshd["dir"]) / "host_ed25519.pub")], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]     # "256 SHA256:... comment (ED25519)"


def test_unknown_host_shows_the_fingerprint_ssh_shows(board, sshd, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(tmp_path / "known_hosts"))
    fp = host_fingerprint(sshd)
    assert fp.startswith("SHA256:")
    with pytest.raises(EffaiError, match="--trust-new-host.*ssh-keyscan") as e:
        open_runner(board, BenchConfig())
    assert f"ED25519 key {fp}" in str(e.value)


def test_changed_host_key_hint_names_port_and_known_hosts_file(board, sshd, tmp_path, monkeypatch):
    other = keygen(tmp_path / "other_host").with_suffix(".pub").read_text().split()
    kh = tmp_path / "my known hosts"
    kh.write_text(f"[127.0.0.1]:{sshd['port']} {other[0]} {other[1]}\n")
    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(kh))
    with pytest.raises(EffaiError, match="changed") as e:
        open_runner(board, BenchConfig())
    msg = str(e.value)
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd['port']}' -f '{kh}'" in msg, msg
    assert host_fingerprint(sshd) in msg and "--trust-new-host" in msg


def test_remove_key_hint_on_port_22_and_the_default_file(monkeypatch, tmp_path):
    from effai.device_bench.runners.ssh import remove_key_hint

    monkeypatch.setenv("HOME", str(tmp_path))
    assert remove_key_hint("pi.local", 22, tmp_path / ".ssh" / "known_hosts") == "ssh-keygen -R pi.local"
    assert remove_key_hint("pi.local", 2222, tmp_path / "kh") == f"ssh-keygen -R '[pi.local]:2222' -f {tmp_path}/kh"


@pytest.fixture(scope="module")
def sshd_no_sftp(tmp_path_factory):
    """A second sshd like `sshd`, but with no SFTP subsystem (some minimal board images ship it that way)."""
    proc, log, facts = start_sshd(tmp_path_factory.mktemp("sshd_no_sftp"), sftp=False)
    yield facts
    stop_sshd(proc, log)


def test_board_without_sftp_names_the_real_cause(sshd_no_sftp, tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("EFFAI_KNOWN_HOSTS", str(sshd_no_sftp["known_hosts"]))
    monkeypatch.setenv("EFFAI_SSH_KEY", str(sshd_no_sftp["key"]))
    monkeypatch.setenv("EFFAI_REMOTE_PYTHON", sys.executable)
    spec = f"ssh:{sshd_no_sftp['user']}@127.0.0.1:{sshd_no_sftp['port']}"
    art = SimpleNamespace(dir=tmp_path)     # the copy fails before any file of it is read
    cfg = BenchConfig(warmup=1, runs=2)
    runner = open_runner(spec, cfg)
    try:
        with pytest.raises(EffaiError, match="no SFTP subsystem.*Subsystem sftp") as e:
            runner.run(art, 1, cfg)
        assert "power and network" not in str(e.value)
    finally:
        runner.close()
