"""effai bench on the host, for real: the standalone remote runner, stats, artifact checks, the matrix driver and the
CLI, against ghostnetv3_050.digits exported once per session to TFLite and ONNX (ExecuTorch's export takes ~45 s
here, too slow for this file; bench_overhead.py and the host runner handle it the same way through measure())."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effai.device_bench import artifact as artifact_mod
from effai.device_bench import remote_runner, report
from effai.device_bench.base import BenchConfig, Timings
from effai.device_bench.bench import run_bench
from effai.device_bench.runners import RunnerError, open_runner, parse_spec
from effai.device_bench.stats import summarize
from effai.errors import EffaiError, UsageError
from tests.helpers import run_cli

RUNNER = Path(remote_runner.__file__)
FAST = BenchConfig(threads=(1,), warmup=1, runs=5, cooldown_s=0.0, idle_s=0.0, energy="none")


@pytest.fixture(scope="session")
def digits_artifacts(tmp_path_factory):
    """ghostnetv3_050.digits (64x64 greyscale) exported to tflite and onnx, without the parity/eval extras."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("bench_artifacts")
    loaded = zoo.create("ghostnetv3_050.digits")
    out = {}
    for target in ("tflite", "onnx"):
        export(loaded, ExportConfig(target=target, out=root / target, verify=False, eval="none"))
        out[target] = root / target
    return out


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _run_runner(art: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    proc = subprocess.run([sys.executable, str(RUNNER), str(art), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd)
    return proc.returncode, _events(proc.stdout), proc.stderr


def test_remote_runner_imports_only_stdlib_and_numpy():
    tree = ast.parse(RUNNER.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "argparse", "json", "os", "platform", "sys", "time", "typing", "numpy"}, top
    assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("effai") for n in ast.walk(tree))


@pytest.mark.parametrize("target,runtime", [("tflite", "litert"), ("onnx", "onnxruntime")])
def test_remote_runner_subprocess_prints_the_protocol(digits_artifacts, tmp_path, target, runtime):
    alone = tmp_path / "remote_runner.py"        # copied alone, as the ssh runner does
    shutil.copy(RUNNER, alone)
    proc = subprocess.run([sys.executable, str(alone), str(digits_artifacts[target]), "--threads", "1", "--warmup",
                           "2", "--runs", "6", "--seed", "3"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    events = _events(proc.stdout)
    kinds = [e["event"] for e in events]
    assert kinds == ["hello", "load", "first", "start"] + ["iter"] * 6 + ["end"]
    hello, load, first, start = events[:4]
    assert hello["python"] == ".".join(map(str, sys.version_info[:3])) and hello["runtimes"]["onnxruntime"]
    assert load["runtime"] == runtime and load["runtime_version"] and load["ms"] > 0 and first["ms"] > 0
    assert load["import_ms"] >= 0    # importing the runtime is timed apart from loading the model
    iters = events[4:-1]
    assert [e["i"] for e in iters] == list(range(6)) and all(e["ms"] > 0 for e in iters)
    assert start["t"] <= events[-1]["t"]
    # the window holds the timed loop: its length is at least the sum of the samples
    assert (events[-1]["t"] - start["t"]) * 1e3 >= sum(e["ms"] for e in iters) * 0.99


def test_remote_runner_min_seconds_and_errors(digits_artifacts, tmp_path):
    code, events, _ = _run_runner(digits_artifacts["tflite"], "--warmup", "0", "--runs", "2", "--min-seconds", "0.2")
    iters = [e for e in events if e["event"] == "iter"]
    assert code == 0 and len(iters) >= 2 and (events[-1]["t"] - events[3]["t"]) >= 0.2

    code, events, _ = _run_runner(tmp_path / "nope")
    assert code == 2 and events[-1]["kind"] == "bad-artifact" and "not found" in events[-1]["message"]

    # a Python without onnxruntime: a package on PYTHONPATH that fails to import, as a board without it would
    fake = tmp_path / "site"
    (fake / "onnxruntime").mkdir(parents=True)
    (fake / "onnxruntime" / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    code, events, _ = _run_runner(digits_artifacts["onnx"], env={"PYTHONPATH": str(fake)})
    assert code == 3 and events[-1]["kind"] == "missing-runtime"
    assert "pip install onnxruntime" in events[-1]["message"]


def test_timed_loop_streams_each_sample_before_the_next_invoke():
    calls: list[int] = []
    seen: list[tuple[int, int]] = []
    samples = remote_runner.timed_loop(lambda: calls.append(1), 5, None,
                                       on_sample=lambda i, ns: seen.append((i, len(calls))))
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4] and [n for _, n in seen] == [1, 2, 3, 4, 5]
    assert len(samples) == 5 and all(ns >= 0 for ns in samples)


def test_make_inputs_quantizes_int8_per_manifest():
    specs = [{"name": "x", "shape": [1, 3, 4, 4], "dtype": "int8", "quantization": {"scale": 0.5, "zero_point": -3}},
             {"name": "y", "shape": [2, 5], "dtype": "float32"}]
    a = remote_runner.make_inputs(specs, seed=7)
    b = remote_runner.make_inputs(specs, seed=7)
    assert a[0].dtype == np.int8 and a[0].shape == (1, 3, 4, 4) and a[1].dtype == np.float32
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    real = 0.5 * (a[0].astype(np.float32) + 3)            # dequantized: about standard normal
    assert abs(float(real.mean())) < 0.6 and 0.4 < float(real.std()) < 1.6


def test_stats_on_known_arrays():
    s = summarize([1, 2, 3, 4, 5, 6, 7, 8, 9, 100])
    assert s["n"] == 10 and s["median"] == 5.5 and s["min"] == 1 and s["max"] == 100
    assert s["mean"] == pytest.approx(14.5) and s["trimmed_mean"] == pytest.approx(5.5)   # drops 1 and 100
    assert s["std"] == pytest.approx(float(np.std([1, 2, 3, 4, 5, 6, 7, 8, 9, 100])))
    s = summarize(list(range(1, 101)))
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01) and s["median"] == 50.5
    assert summarize([]) == {"n": 0}


def test_artifact_errors_name_the_file_and_the_fix(digits_artifacts, tmp_path):
    art = artifact_mod.load(digits_artifacts["tflite"])
    assert art.target == "tflite" and art.model_name == "ghostnetv3_050.digits" and art.model_file.is_file()
    assert art.describe()["bytes"] == art.model_file.stat().st_size
    with pytest.raises(UsageError, match="not found"):
        artifact_mod.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no manifest.json"):
        artifact_mod.load(empty)
    (empty / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        artifact_mod.load(empty)
    bad = tmp_path / "flipped"
    shutil.copytree(digits_artifacts["tflite"], bad)
    data = bytearray((bad / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(UsageError) as e:
        artifact_mod.load(bad)
    assert "model.tflite" in str(e.value) and "effai verify" in str(e.value) and "re-export" in str(e.value)


def test_device_specs():
    assert parse_spec("host") == ("host", "") and parse_spec("ssh:pi@box:2222") == ("ssh", "pi@box:2222")
    for bad in ("usb:123", "", "hos"):
        with pytest.raises(UsageError, match=r"host \| adb:SERIAL \| ssh:USER@HOST\[:PORT\]"):
            open_runner(bad, FAST)
    for bad in ("ssh:box", "ssh:@box", "adb:", "host:x"):
        with pytest.raises(UsageError):
            open_runner(bad, FAST)


def test_cli_host_bench_every_host_runnable_format_in_one_command(small_exports, tmp_path):
    dirs = [str(small_exports[t].out_dir) for t in ("executorch", "tflite", "onnx")]
    code, last, _, err = run_cli("bench", *dirs, "--runs", "5", "--warmup", "1", "--cooldown", "0", "--idle", "0",
                                 "--out", str(tmp_path / "all.json"), env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err
    _, records = report.load(tmp_path / "all.json")
    assert [r.runtime for r in records] == ["executorch", "litert", "onnxruntime"]
    assert all(r.status == "ok" and len(r.samples_ms) == 5 and r.stats["median"] > 0 for r in records)


def test_cli_host_bench_threads_sweep_report_plot_and_baseline(digits_artifacts, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, last, stdout, err = run_cli("bench", str(digits_artifacts["tflite"]), str(digits_artifacts["onnx"]),
                                      "--threads", "1,2", "--runs", "5", "--warmup", "1", "--cooldown", "0",
                                      "--idle", "0", "--out", str(out), "--plot", str(png),
                                      env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err
    assert last["ok"] and len(last["records"]) == 4 and last["plot"] == str(png) and png.stat().st_size > 1000
    header, records = report.load(out)
    assert header["status"] == "complete"
    assert [(r.artifact["target"], r.threads) for r in records] == [("tflite", 1), ("tflite", 2), ("onnx", 1),
                                                                    ("onnx", 2)]
    for r in records:
        assert r.status == "ok" and r.runs == 5 and len(r.samples_ms) == 5 and r.stats["n"] == 5
        assert r.stats["median"] == pytest.approx(float(np.median(r.samples_ms)))
        assert r.load_ms > 0 and r.first_ms > 0 and r.device["name"] == "host" and r.device["runtimes"]
        assert r.energy["available"] is False and r.energy["reason"]      # no meter readable here: a reason
        assert r.throttling["verdict"] in ("none", "suspected", "throttled", "unknown")
    assert {r.runtime for r in records} == {"litert", "onnxruntime"}
    assert "median" in stdout or "effai bench" in stdout

    # the regression gate: a baseline whose samples were 100x faster makes this run a regression (exit 1)
    doc = json.loads(out.read_text())
    for rec in doc["records"]:
        rec["samples_ms"] = [v / 100 for v in rec["samples_ms"]]
        rec["stats"] = summarize(rec["samples_ms"])
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(doc))
    code, last, _, err = run_cli("bench", str(digits_artifacts["onnx"]), "--runs", "5", "--warmup", "1",
                                 "--cooldown", "0", "--idle", "0", "--energy", "none", "--out",
                                 str(tmp_path / "again.json"), "--baseline", str(fast), "--fail-on", "latency:+5%",
                                 env={"OMP_NUM_THREADS": "1"})
    assert code == 1 and last["ok"] is False and last["baseline"]["regressions"], err
    assert "regression" in last["error"]


def test_interrupt_mid_matrix_leaves_a_valid_partial_report(digits_artifacts, tmp_path):
    out = tmp_path / "partial.json"
    seen = []

    def stop_after_first(rec):
        seen.append(rec)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench([digits_artifacts["tflite"], digits_artifacts["onnx"]], "host", FAST, out, stop_after_first)
    header, records = report.load(out)
    assert header["status"] == "interrupted" and not header.get("crashed")
    assert len(records) == 1 == len(seen) and records[0].artifact["target"] == "tflite"
    assert len(records[0].samples_ms) == 5


def test_device_failure_mid_run_keeps_partial_samples_and_goes_on(digits_artifacts, tmp_path, monkeypatch):
    """A device that drops mid-run (simulated: the real host run, then a RunnerError carrying 3 of its samples)."""
    from effai.device_bench.runners import host

    real_run = host.HostRunner.run

    def flaky(self, art, threads, cfg):
        t = real_run(self, art, threads, cfg)
        if art.target == "tflite":
            partial = Timings(t.runtime, t.runtime_version, threads, t.load_ms, t.first_ms, t.samples_ms[:3],
                              t.warmup, t.window_s)
            raise RunnerError("device disconnected mid-run", partial)
        return t

    monkeypatch.setattr(host.HostRunner, "run", flaky)
    run = run_bench([digits_artifacts["tflite"], digits_artifacts["onnx"]], "host", FAST, tmp_path / "r.json")
    assert run.status == "complete" and [r.status for r in run.records] == ["error", "ok"]
    bad = run.records[0]
    assert "disconnected" in bad.error and len(bad.samples_ms) == 3 and bad.extra["complete"] is False
    _, records = report.load(tmp_path / "r.json")
    assert records[0].status == "error" and len(records[0].samples_ms) == 3 and len(records[1].samples_ms) == 5


def test_a_meter_that_fails_to_start_costs_only_the_energy(digits_artifacts, tmp_path, monkeypatch):
    from effai.device_bench import meters

    class Broken:
        name = "android"

        def start(self, fs):
            raise OSError("adb: device offline")

        def stop(self):
            raise AssertionError("never started")

    monkeypatch.setattr(meters, "choose", lambda spec, fs: (Broken(), "android"))
    run = run_bench([digits_artifacts["onnx"]], "host", FAST, tmp_path / "r.json")
    rec = run.records[0]
    assert run.status == "complete" and rec.status == "ok" and len(rec.samples_ms) == 5
    assert rec.energy["available"] is False and "failed to start: OSError: adb: device offline" in rec.energy["reason"]


def test_aggregate_only_timings_count_the_tools_runs_per_joule():
    from effai.device_bench.bench import inferences

    agg = Timings("benchmark_model", "sha256:x", 1, 1.0, 2.0, [4.0], 1, (0.0, 0.4),
                  extra={"timing": "aggregate-only", "aggregate_ms": {"count": 100.0, "avg_ms": 4.0}})
    assert inferences(agg) == 100
    assert inferences(Timings("litert", "2.3", 1, 1.0, 2.0, [4.0, 4.1, 3.9], 1, (0.0, 0.012))) == 3


def _coreml_artifact(root: Path) -> Path:
    """A Core ML artifact directory (manifest + .mlpackage layout) for the non-macOS path; its contents are never
    read on Linux, so a hand-written package stands in for the exported one."""
    pkg = root / "model.mlpackage" / "Data"
    pkg.mkdir(parents=True)
    (pkg / "model.mlmodel").write_bytes(b"\x08\x07")
    blob = (pkg / "model.mlmodel").read_bytes()
    files = [{"path": "model.mlpackage/Data/model.mlmodel", "bytes": len(blob),
              "sha256": hashlib.sha256(blob).hexdigest()}]
    (root / "manifest.json").write_text(json.dumps({
        "schema": "effai.manifest/1", "target": "coreml", "precision": "fp16", "model_file": "model.mlpackage",
        "inputs": [{"name": "x", "shape": [1, 1, 64, 64], "dtype": "float32", "layout": "NCHW"}],
        "outputs": [], "model": {"name": "ghostnetv3_050.digits"}, "files": files}))
    return root


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message given off macOS")
def test_coreml_needs_macos(tmp_path):
    art = _coreml_artifact(tmp_path / "coreml")
    with pytest.raises(EffaiError, match="Core ML artifacts need macOS"):
        open_runner("host", FAST).run(artifact_mod.load(art), 1, FAST)
    code, last, _, err = run_cli("bench", str(art), "--runs", "2", "--cooldown", "0", "--idle", "0",
                                 "--out", str(tmp_path / "b.json"))
    assert code == 0 and "need macOS" in last["skipped"][0]["reason"] and last["records"][0]["status"] == "skipped"
    assert "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (("--device", "usb:123"), "host | adb:SERIAL | ssh:USER@HOST[:PORT]"),
    (("--threads", "0,2"), "--threads"),
    (("--fail-on", "latency:+5%"), "--fail-on needs --baseline"),
])
def test_cli_bad_usage_exits_2(digits_artifacts, tmp_path, args, needle):
    code, last, _, err = run_cli("bench", str(digits_artifacts["onnx"]), *args, "--out", str(tmp_path / "b.json"))
    assert code == 2 and needle in last["error"] and needle in err and "Traceback" not in err
    assert not (tmp_path / "b.json").exists()


def test_cli_missing_manifest_exits_2(tmp_path):
    code, last, _, err = run_cli("bench", str(tmp_path), "--out", str(tmp_path / "b.json"))
    assert code == 2 and "no manifest.json" in last["error"]


def test_bench_imports_without_torch():
    code = ("import sys, effai.cli, effai.device_bench.bench, effai.device_bench.runners.host, "
            "effai.device_bench.artifact, effai.device_bench.stats, effai.device_bench.remote_runner; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_ctrl_c_writes_a_partial_report_and_exits_130(digits_artifacts, tmp_path):
    """A real SIGINT to `effai bench` while it times the second artifact (5 s each: a window a loaded CI machine's
    polling cannot miss)."""
    import signal
    import time

    out = tmp_path / "cc.json"
    proc = subprocess.Popen([sys.executable, "-m", "effai", "bench", str(digits_artifacts["tflite"]),
                             str(digits_artifacts["onnx"]), "--runs", "1", "--warmup", "0", "--min-seconds", "5",
                             "--cooldown", "0", "--idle", "0", "--energy", "none", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a suite started as a background job (`cmd &`) inherits SIGINT ignored: undo that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(json.loads(out.read_text())["records"]) == 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["interrupted"] and last["records"] == 1
    header, records = report.load(out)
    assert header["status"] == "interrupted" and len(records) == 1 and records[0].runs >= 1


def test_an_artifact_whose_runtime_is_not_here_is_skipped_with_the_reason_not_a_failure(small_exports, tmp_path):
    """`effai bench effai_out/*/` on Linux: the Core ML folder is a skipped record (the runtime needs macOS), the
    others are measured, exit 0."""
    import platform

    if platform.system() == "Darwin":
        pytest.skip("Core ML runs here")
    dirs = [str(small_exports[t].out_dir) for t in ("onnx", "coreml")]
    code, last, _, err = run_cli("bench", *dirs, "--threads", "1", "--runs", "3", "--warmup", "1", "--cooldown", "0",
                                 "--energy", "none", "--out", str(tmp_path / "b.json"), "--json")
    assert code == 0 and last["ok"], err[-2000:]
    assert [s["artifact"] for s in last["skipped"]] == [dirs[1]] and "macOS" in last["skipped"][0]["reason"]
    report = json.loads((tmp_path / "b.json").read_text())
    assert sorted(r["status"] for r in report["records"]) == ["ok", "skipped"]
