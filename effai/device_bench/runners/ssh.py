"""`ssh:USER@HOST[:PORT]`: time an artifact on a Linux board (Raspberry Pi, Jetson, ...) over SSH with paramiko.

Per run: `mktemp -d` on the board, SFTP the artifact and remote_runner.py there, run it (every argument
shlex.quote'd), read its JSON lines as they come, `rm -rf` the directory in `finally`; a lost connection raises
RunnerError carrying the iterations received so far.
Host keys, auth, tests: docs/bench.md, "effai/device_bench/runners/ssh.py".
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any

from effai.device_bench.base import BenchConfig, Timings
from effai.device_bench.runners.common import RunnerError, RuntimeMissing, timings_from_events
from effai.errors import EffaiError, UsageError

try:  # paramiko is needed only to connect; without it this module still imports (and connect() says what to install)
    from paramiko.ssh_exception import SSHException as SSH_ERRORS
except ImportError:  # pragma: no cover
    class SSH_ERRORS(Exception):  # type: ignore[no-redef]  # noqa: N801
        """Stand-in when paramiko is absent."""

KNOWN_HOSTS_ENV = "EFFAI_KNOWN_HOSTS"
STALL_S = float(os.environ.get("EFFAI_SSH_STALL_S", "300"))   # silence from a running benchmark = board gone
KEY_ENV = "EFFAI_SSH_KEY"
PYTHON_ENV = "EFFAI_REMOTE_PYTHON"
REMOTE_RUNNER = Path(__file__).resolve().parents[1] / "remote_runner.py"
EXIT_MISSING_RUNTIME, EXIT_BAD_ARTIFACT = 3, 2
PROBE = ("import json, platform, sys\n"
         "try:\n    from importlib.metadata import version\nexcept ImportError:\n    version = None\n"
         "rt = {}\n"
         "for d in ('numpy', 'ai-edge-litert', 'tflite-runtime', 'onnxruntime', 'executorch', 'coremltools'):\n"
         "    try:\n        rt[d] = version(d)\n    except Exception:\n        pass\n"
         "print(json.dumps({'python': platform.python_version(), 'python_path': sys.executable,"
         " 'platform': platform.platform(), 'machine': platform.machine(), 'runtimes': rt}))\n")


def parse_target(target: str) -> tuple[str, str, int]:
    """'pi@raspberrypi.local[:2222]' -> (user, host, port); '[::1]:2222' style brackets allowed for IPv6."""
    user, _, rest = target.partition("@")
    host, port = rest, 22
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = _port(tail[1:], target)
    elif rest.count(":") == 1:
        host, p = rest.split(":")
        port = _port(p, target)
    if not user or not host:
        raise UsageError(f"ssh target '{target}' is not USER@HOST[:PORT], like pi@raspberrypi.local")
    return user, host, port


def _port(text: str, target: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"ssh port in '{target}' must be a number 1-65535")
    return int(text)


def known_hosts_path() -> Path:
    return Path(os.environ.get(KNOWN_HOSTS_ENV) or Path.home() / ".ssh" / "known_hosts").expanduser()


def load_known_hosts(client: Any, path: Path) -> set[str]:
    """Host keys from an OpenSSH known_hosts file, line by line: lines paramiko cannot parse (key types it does
    not know) are skipped instead of failing the whole file, @cert-authority lines are ignored (paramiko has no
    certificates) and the keys of @revoked lines are returned so that the caller refuses them."""
    from paramiko.hostkeys import HostKeyEntry

    revoked: set[str] = set()
    if not path.is_file():
        return revoked
    keys = client.get_host_keys()
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(fields[3])
            continue
        try:
            entry = HostKeyEntry.from_line(line, n)
        except Exception:  # noqa: BLE001 - an unknown key type or a damaged line: skip it, keep the rest
            continue
        if entry is not None and entry.key is not None:
            for host in entry.hostnames:
                keys.add(host, entry.key.get_name(), entry.key)
    return revoked


def fingerprint(key: Any) -> str:
    """A host key's fingerprint as ssh prints it: 'SHA256:' + unpadded base64 of the key blob's SHA-256."""
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def key_label(key: Any) -> str:
    """'ED25519 key SHA256:...' (ssh's wording: the key type without its 'ssh-' prefix, upper-cased)."""
    kind = key.get_name().removeprefix("ssh-").removeprefix("ecdsa-sha2-").split("-")[0].upper()
    return f"{'ECDSA' if key.get_name().startswith('ecdsa') else kind} key {fingerprint(key)}"


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: HOST on port 22, [HOST]:PORT otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def remove_key_hint(host: str, port: int, kh: Path) -> str:
    """The ssh-keygen command that removes a stale key: [HOST]:PORT off port 22, -f FILE for a non-default file."""
    argv = ["ssh-keygen", "-R", known_hosts_name(host, port)]
    if kh != (Path.home() / ".ssh" / "known_hosts").expanduser():
        argv += ["-f", str(kh)]
    return command(argv)


def remote_python() -> list[str]:
    return shlex.split(os.environ.get(PYTHON_ENV) or "python3")


def command(argv: list[str]) -> str:
    """One remote command line from an argv list, each argument quoted for the board's shell."""
    return " ".join(shlex.quote(a) for a in argv)


class SshFS:
    """DeviceFS over the runner's SSH connection: SFTP reads and listings, argv commands (quoted)."""

    def __init__(self, runner: SshRunner) -> None:
        self.runner = runner

    def read_text(self, path: str) -> str | None:
        try:
            with self.runner.sftp().open(path, "r") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, EOFError, AttributeError, SSH_ERRORS):
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(self.runner.sftp().listdir(path))
        except (OSError, EOFError, AttributeError, SSH_ERRORS):
            return []

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        try:
            code, out, _ = self.runner.exec(argv, timeout=timeout)
        except (OSError, EOFError, AttributeError, SSH_ERRORS):
            return 255, ""
        return code, out


class SshRunner:
    """Runner for `ssh:USER@HOST[:PORT]` (see the module docstring)."""

    def __init__(self, target: str, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.user, self.host, self.port = parse_target(target)
        self.name = f"ssh:{target}"
        self._sftp = None
        self._hello: dict[str, Any] = {}
        self.client = self.connect(cfg.trust_new_host)
        self.fs = SshFS(self)

    # ---------------------------------------------------------------------------------------------- connection

    def connect(self, trust_new_host: bool):
        try:
            import paramiko
        except ImportError:
            raise EffaiError("the ssh runner needs paramiko: pip install paramiko") from None
        where = f"{self.user}@{self.host}:{self.port}"
        kh = known_hosts_path()
        client = paramiko.SSHClient()
        revoked = load_known_hosts(client, kh)
        known_before = self._known(client)
        seen: dict[str, Any] = {}

        class Reject(paramiko.MissingHostKeyPolicy):
            """RejectPolicy that keeps the offered key, so the refusal can show its fingerprint."""

            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                seen["key"] = key
                raise paramiko.SSHException(f"Server {hostname!r} not found in known_hosts")

        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if trust_new_host else Reject())
        key = os.environ.get(KEY_ENV)
        kwargs: dict[str, Any] = dict(hostname=self.host, port=self.port, username=self.user, timeout=10,
                                      banner_timeout=15, auth_timeout=15)
        if key:
            kwargs.update(key_filename=str(Path(key).expanduser()), allow_agent=False, look_for_keys=False)
        try:
            client.connect(**kwargs)
        except paramiko.BadHostKeyException as e:
            raise EffaiError(f"the host key of {self.host}:{self.port} changed since it was stored in {kh} (it now "
                             f"offers the {key_label(e.key)}): if the board was reinstalled, remove the old key "
                             f"({remove_key_hint(self.host, self.port, kh)}) and rerun with --trust-new-host"
                             ) from None
        except paramiko.AuthenticationException as e:
            raise EffaiError(f"ssh authentication to {where} failed ({e}): install your public key on the board "
                             f"(ssh-copy-id -p {self.port} {self.user}@{self.host}) or set {KEY_ENV} to the private "
                             "key it accepts") from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e) or "known_hosts" in str(e):
                offered = f", and it offers the {key_label(seen['key'])}" if "key" in seen else ""
                raise EffaiError(f"{self.host}:{self.port} is not in {kh}{offered}: check that this is the board's "
                                 "fingerprint (on the board: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and "
                                 "rerun with --trust-new-host, or add it with: ssh-keyscan -p "
                                 f"{self.port} {self.host} >> {kh}") from None
            raise EffaiError(f"ssh to {where} failed: {e}; check that sshd runs there") from None
        except (socket.timeout, TimeoutError):
            raise EffaiError(f"ssh to {where} timed out: check the address and that the board is on the network"
                             ) from None
        except (OSError, paramiko.ssh_exception.NoValidConnectionsError) as e:
            raise EffaiError(f"cannot reach {where} ({e.strerror if getattr(e, 'strerror', None) else e}): check "
                             "the host name, the port and that sshd runs on the board") from None
        server_key = client.get_transport().get_remote_server_key()
        if server_key.get_base64() in revoked:
            client.close()
            raise EffaiError(f"the host key of {self.host}:{self.port} is marked @revoked in {kh}: refusing to "
                             "connect; check the board with its administrator")
        if trust_new_host and not known_before:
            # Append one line: the user's file (comments, @cert-authority/@revoked markers, key types paramiko does
            # not know) is never rewritten.
            kh.parent.mkdir(parents=True, exist_ok=True)
            name = known_hosts_name(self.host, self.port)
            fd = os.open(kh, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{name} {server_key.get_name()} {server_key.get_base64()}\n")
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)     # a board that loses power is noticed, not waited on forever
        return client

    def _known(self, client: Any) -> bool:
        return client.get_host_keys().lookup(known_hosts_name(self.host, self.port)) is not None

    def sftp(self):
        """The SFTP session (opened once). A board whose sshd has no SFTP subsystem is named as such, not mistaken
        for a lost connection."""
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (EOFError, SSH_ERRORS) as e:
                if not self.alive():
                    raise
                raise RunnerError(f"{self.host}:{self.port} has no SFTP subsystem (opening SFTP failed: {e}), which "
                                  "effai needs to copy the artifact: enable it in the board's /etc/ssh/sshd_config "
                                  "(Subsystem sftp /usr/lib/openssh/sftp-server, or internal-sftp; install "
                                  "openssh-sftp-server if missing), restart sshd and rerun", None) from None
        return self._sftp

    def alive(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run argv on the board; (exit code, stdout, stderr). 127 when the program is not there."""
        _, out, err = self.client.exec_command(command(argv), timeout=timeout)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
        return out.channel.recv_exit_status(), stdout, stderr

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        try:
            from effai.device_bench import device

            info.update(device.describe(self.fs))
        except ImportError:  # device.py absent: the probe below still says what the board runs
            pass
        code, out, err = self.exec(remote_python() + ["-c", PROBE], timeout=30)
        if code == 0:
            try:
                info["python"] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                info["python"] = {"error": out[-200:]}
        else:
            info["python"] = {"error": f"{' '.join(remote_python())} failed ({code}): {err.strip()[-200:]}"}
        if self._hello:
            info["runtimes"] = self._hello.get("runtimes", {})
        info.update(host=self.host, port=self.port, user=self.user, transport="ssh")
        return info

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self.client.close()

    # ---------------------------------------------------------------------------------------------- run

    def put_dir(self, local: Path, remote: str) -> None:
        sftp = self.sftp()
        for p in sorted(local.rglob("*")):
            rel = p.relative_to(local).as_posix()
            if p.is_dir():
                sftp.mkdir(f"{remote}/{rel}")
            elif p.is_file():
                sftp.put(str(p), f"{remote}/{rel}")

    def run(self, artifact: Any, threads: int, cfg: BenchConfig) -> Timings:
        try:
            return self._run(artifact, threads, cfg)
        except (OSError, EOFError, AttributeError, SSH_ERRORS) as e:
            raise RunnerError(f"connection to {self.host} failed while preparing or running the benchmark "
                              f"({type(e).__name__}: {e}); check the board's power and network, then rerun",
                              None) from None

    def _run(self, artifact: Any, threads: int, cfg: BenchConfig) -> Timings:
        code, out, err = self.exec(["mktemp", "-d", "/tmp/effai-XXXXXXXX"])
        if code != 0 or not out.strip():
            raise EffaiError(f"could not make a temp dir on {self.host} (mktemp -d: {err.strip()[-200:]}); check "
                             "that /tmp is writable there")
        workdir = out.strip()
        try:
            art_dir = f"{workdir}/artifact"
            self.sftp().mkdir(art_dir)
            self.put_dir(Path(artifact.dir), art_dir)
            self.sftp().put(str(REMOTE_RUNNER), f"{workdir}/remote_runner.py")
            argv = remote_python() + [f"{workdir}/remote_runner.py", art_dir, "--threads", str(threads),
                                      "--warmup", str(cfg.warmup), "--runs", str(cfg.runs), "--seed", str(cfg.seed)]
            if cfg.min_seconds:
                argv += ["--min-seconds", f"{cfg.min_seconds:g}"]
            return self.stream(argv, threads, cfg, workdir)
        finally:
            if self.alive():
                try:
                    self.exec(["rm", "-rf", workdir], timeout=30)
                except Exception:  # noqa: BLE001 - cleanup must not hide the real error
                    pass

    def stream(self, argv: list[str], threads: int, cfg: BenchConfig, workdir: str) -> Timings:
        """Run remote_runner and read its events as they arrive. The board's clock may differ from the host's
        (whose clock the energy meters use), so the window is shifted by the offset observed at `start`."""
        chan = self.client.get_transport().open_session()
        chan.settimeout(STALL_S)      # no byte for this long (not even a streamed iter) = the board is gone
        chan.exec_command(command(argv))
        events: list[dict[str, Any]] = []
        host_t: dict[str, float] = {}
        junk: list[str] = []
        buf = b""
        lost = False
        try:
            while True:
                try:
                    data = chan.recv(65536)
                except (OSError, EOFError, socket.timeout):
                    lost = True
                    break
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                now = time.time()
                for raw in lines:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        junk.append(line)
                        continue
                    if isinstance(ev, dict):
                        events.append(ev)
                        if ev.get("event") in ("start", "end"):
                            host_t[ev["event"]] = now
        except KeyboardInterrupt:
            chan.close()
            raise
        stderr = b""
        while not lost and chan.recv_stderr_ready():
            stderr += chan.recv_stderr(65536)
        code = chan.recv_exit_status() if not lost and self.alive() else -1
        chan.close()
        hello = next((e for e in events if e.get("event") == "hello"), None)
        if hello:
            self._hello = hello
        error = next((e for e in events if e.get("event") == "error"), None)
        timings = timings_from_events(events, threads, cfg.warmup)
        if timings is not None:
            remote_window = timings.window_s
            if "start" in host_t and remote_window[0]:
                # Board clock -> host clock by the offset seen when `start` arrived (one-way latency included).
                offset = host_t["start"] - remote_window[0]
                timings.window_s = (remote_window[0] + offset, remote_window[1] + offset)
                timings.extra["clock_offset_s"] = offset
            timings.extra.update(board_window_s=list(remote_window), host=self.host, board_dir=workdir,
                                 window="board start/end times shifted to the host clock by the offset observed "
                                        "when the start event arrived")
        if error is not None:
            msg = str(error.get("message", "")).strip()
            if code == EXIT_MISSING_RUNTIME or error.get("kind") == "missing-runtime":
                raise RuntimeMissing(f"{self.host}: {msg}", None)
            raise RunnerError(f"remote_runner on {self.host} failed ({error.get('kind')}): {msg}", timings)
        if code == 0 and any(e.get("event") == "end" for e in events):
            return timings  # type: ignore[return-value]
        n = len(timings.samples_ms) if timings else 0
        if lost or code == -1 or not self.alive():
            raise RunnerError(f"connection to {self.host} lost mid-run after {n} timed iteration(s); results so "
                              "far kept, run marked incomplete: check the board's power and network, then rerun "
                              f"(its temp dir {workdir} may remain there)", timings)
        shown = " | ".join((junk + stderr.decode("utf-8", "replace").strip().splitlines())[-10:]) or "(no output)"
        raise RunnerError(f"remote_runner on {self.host} exited with {code} after {n} iteration(s) without an end "
                          f"event: {shown}", timings)
