"""`adb:SERIAL`: time an artifact on an Android phone with the runtime's own benchmark tool, pinned to big cores.

Per run: check the device, refuse a tool built for another ABI, push model and tool to
/data/local/tmp/effai-<random>/, run `taskset MASK TOOL FLAGS` (cpumask.py), parse its output (tool_output.py),
remove the directory in `finally`. Every `adb shell` argument is shlex.quote'd.
Tools, lookup, tests: docs/bench.md, "effai/device_bench/runners/adb.py".
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from effai.device_bench.base import BenchConfig, Timings
from effai.device_bench.runners.common import RunnerError
from effai.device_bench.runners import cpumask
from effai.device_bench.runners.tool_output import (ToolOutputError, ToolResult, parse_benchmark_model,
                                                    parse_executor_runner, tail)
from effai.errors import EffaiError, UsageError

RUNNER_DIR_ENV = "EFFAI_RUNNER_DIR"
DEVICE_TMP = "/data/local/tmp"
TOOLS = {"tflite": "benchmark_model", "executorch": "executor_runner"}
TOOL_HELP = {
    "benchmark_model": "LiteRT's benchmark_model for Android (the prebuilt android_aarch64_benchmark_model from "
                       "ai.google.dev/edge/litert/models/measurement, or bazel build "
                       "//tflite/tools/benchmark:benchmark_model --config=android_arm64)",
    "executor_runner": "ExecuTorch's executor_runner cross-compiled for Android (examples/portable/executor_runner, "
                       "built with the Android NDK toolchain and the XNNPACK backend)",
}
# ELF e_machine per Android ABI (System V gABI values).
ABI_MACHINE = {"arm64-v8a": 0xB7, "armeabi-v7a": 0x28, "armeabi": 0x28, "x86_64": 0x3E, "x86": 0x03,
               "riscv64": 0xF3}
MACHINE_NAME = {0xB7: "aarch64 (arm64-v8a)", 0x28: "arm (armeabi-v7a)", 0x3E: "x86_64", 0x03: "x86",
                0xF3: "riscv64"}
DISCONNECT = re.compile(r"device '?[^'\s]*'? not found|device offline|no devices/emulators found|error: closed|"
                        r"device still connecting|protocol fault", re.I)


def adb_binary() -> str:
    exe = shutil.which("adb")
    if exe is None:
        raise UsageError("adb not found on PATH: install Android platform-tools "
                         "(developer.android.com/tools/releases/platform-tools) and put adb on PATH")
    return exe


def elf_machine(path: Path) -> int | None:
    """ELF e_machine of a file, or None when it is not an ELF file (a script)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    return int.from_bytes(head[18:20], order)


def check_abi(binary: Path, abis: list[str]) -> str:
    """Refuse a tool built for another CPU than the device's; returns a note for Timings.extra."""
    machine = elf_machine(binary)
    if machine is None:
        return "runner is not an ELF binary (a script); ABI not checked"
    wanted = {ABI_MACHINE[a] for a in abis if a in ABI_MACHINE}
    if wanted and machine not in wanted:
        raise UsageError(f"{binary} is built for {MACHINE_NAME.get(machine, hex(machine))} but the device's ABIs are "
                         f"{', '.join(abis)}: use a {abis[0]} build of {binary.name}")
    return f"ELF {MACHINE_NAME.get(machine, hex(machine))} matches device ABI {', '.join(abis)}"


def find_tool(tool: str, cfg: BenchConfig) -> Path:
    """The tool binary on this machine: cfg.runner_binary (a file, or a directory holding the tool), else
    $EFFAI_RUNNER_DIR/<tool>, else <tool> on PATH."""
    other = [t for t in TOOLS.values() if t != tool]
    if cfg.runner_binary:
        p = Path(cfg.runner_binary).expanduser()
        if p.is_dir():
            if (p / tool).is_file():
                return p / tool
        elif p.is_file():
            if not any(o in p.name for o in other):
                return p
        else:
            raise UsageError(f"--runner-binary {p} does not exist; point it at {tool} built for the phone")
    if os.environ.get(RUNNER_DIR_ENV):
        p = Path(os.environ[RUNNER_DIR_ENV]) / tool
        if p.is_file():
            return p
    found = shutil.which(tool)
    if found:
        return Path(found)
    raise UsageError(f"no {tool} to run on the phone: get {TOOL_HELP[tool]}, then pass --runner-binary PATH or put "
                     f"it in ${RUNNER_DIR_ENV}")


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class Adb:
    """`adb -s SERIAL ...` as argv lists. `shell(argv)` quotes each argument for the device's sh."""

    def __init__(self, serial: str, exe: str | None = None) -> None:
        self.serial = serial
        self.exe = exe or adb_binary()

    def base(self) -> list[str]:
        return [self.exe, "-s", self.serial]

    def call(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.base() + args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EffaiError(f"adb {' '.join(args[:2])} on {self.serial} did not answer in {timeout:.0f} s: check "
                             "the cable or wireless connection (adb devices -l)") from None

    def shell_argv(self, argv: list[str]) -> list[str]:
        return self.base() + ["shell"] + [shlex.quote(a) for a in argv]

    def shell(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.shell_argv(argv), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout} s")


class AdbFS:
    """DeviceFS over adb: `shell cat`, `shell ls`, and argv commands (quoted)."""

    def __init__(self, adb: Adb) -> None:
        self.adb = adb

    def read_text(self, path: str) -> str | None:
        r = self.adb.shell(["cat", path], timeout=20)
        return r.stdout if r.returncode == 0 else None

    def listdir(self, path: str) -> list[str]:
        r = self.adb.shell(["ls", "-1", path], timeout=20)
        if r.returncode != 0:
            return []
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]

    def run(self, argv: list[str], timeout: float = 10.0) -> tuple[int, str]:
        r = self.adb.shell(argv, timeout=timeout)
        code = r.returncode
        if code != 0 and re.search(r"not found|inaccessible", r.stderr + r.stdout) and code in (1, 127):
            code = 127
        return code, r.stdout


def parse_devices(text: str) -> dict[str, str]:
    """`adb devices -l` -> {serial: state} (device | unauthorized | offline | ...)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


class AdbRunner:
    """Runner for `adb:SERIAL` (see the module docstring)."""

    def __init__(self, serial: str, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.serial = serial
        self.name = f"adb:{serial}"
        self.adb = Adb(serial)
        self.check_device()
        self.fs = AdbFS(self.adb)
        abi = (self.fs.run(["getprop", "ro.product.cpu.abi"])[1] or "").strip()
        abilist = (self.fs.run(["getprop", "ro.product.cpu.abilist"])[1] or "").strip()
        self.abis = [a for a in abilist.split(",") if a] or ([abi] if abi else [])
        self.abi = abi or (self.abis[0] if self.abis else "")

    def check_device(self) -> None:
        try:
            r = subprocess.run([self.adb.exe, "devices", "-l"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise EffaiError("adb devices did not answer in 30 s: restart the server (adb kill-server)") from None
        devices = parse_devices(r.stdout)
        state = devices.get(self.serial)
        if state is None:
            seen = ", ".join(f"{s} ({st})" for s, st in devices.items()) or "none"
            raise EffaiError(f"no adb device '{self.serial}' (attached: {seen}): plug it in with USB debugging on, or "
                             "`adb connect HOST:PORT` for wireless debugging")
        if state == "unauthorized":
            raise EffaiError(f"adb device {self.serial} is unauthorized: accept the RSA prompt on the phone "
                             "(Allow USB debugging), then rerun")
        if state != "device":
            raise EffaiError(f"adb device {self.serial} is {state}: replug it or run `adb reconnect`, then rerun")

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        try:
            from effai.device_bench import device

            info.update(device.describe(self.fs))
        except ImportError:  # device.py not available: the adb basics still identify the phone
            for key, prop in (("model", "ro.product.model"), ("soc", "ro.soc.model"),
                              ("os", "ro.build.version.release")):
                info[key] = self.fs.run(["getprop", prop])[1].strip()
        info.update(serial=self.serial, abi=self.abi, abilist=self.abis, transport="adb")
        return info

    def close(self) -> None:
        return None

    # -------------------------------------------------------------------------------------------------- run

    def run(self, artifact: Any, threads: int, cfg: BenchConfig) -> Timings:
        target = artifact.target
        if target == "onnx":
            raise UsageError("adb benchmarking of .onnx needs onnxruntime's onnxruntime_perf_test, which effai does "
                             "not drive yet: bench the tflite or executorch artifact on the phone, or the onnx one "
                             "with --device host / ssh:USER@HOST")
        if target == "coreml":
            raise UsageError("Core ML (.mlpackage) runs only on Apple devices: bench it with --device host on a Mac")
        tool = TOOLS.get(target)
        if tool is None:
            raise UsageError(f"adb cannot run target '{target}'; it runs: {', '.join(TOOLS)}")
        binary = find_tool(tool, cfg)
        abi_note = check_abi(binary, self.abis)  # before anything is pushed
        mask = self.pin_mask(threads)
        workdir = f"{DEVICE_TMP}/effai-{secrets.token_hex(4)}"
        model_remote = f"{workdir}/{artifact.model_file.name}"
        tool_remote = f"{workdir}/{tool}"
        extra: dict[str, Any] = {"tool": tool, "tool_sha256": sha12(binary), "abi": abi_note,
                                 "device_dir": workdir}
        try:
            self.checked(self.adb.shell(["mkdir", "-p", workdir]), "mkdir")
            self.checked(self.adb.call(["push", str(artifact.model_file), model_remote], timeout=600), "push model")
            self.checked(self.adb.call(["push", str(binary), tool_remote], timeout=600), "push tool")
            self.checked(self.adb.shell(["chmod", "755", tool_remote]), "chmod")
            prefix = ["taskset", mask.mask] if mask else []
            extra["pinning"] = mask.describe() if mask else "not pinned (taskset or cpu topology not readable)"
            if tool == "benchmark_model":
                resized = [i for i in artifact.manifest.get("inputs", []) if i.get("resized")]
                if resized:   # --input-shape on a plain .tflite: benchmark_model resizes those inputs itself
                    extra["input_layer"] = ",".join(i["name"] for i in resized)
                    extra["input_layer_shape"] = ":".join(",".join(map(str, i["shape"])) for i in resized)
                return self.run_benchmark_model(prefix + [tool_remote], model_remote, threads, cfg, extra)
            return self.run_executor_runner(prefix + [tool_remote], model_remote, threads, cfg, extra)
        finally:
            # Best effort: a vanished device cannot be cleaned, and that must not hide the real error.
            try:
                self.adb.shell(["rm", "-rf", workdir], timeout=30)
            except Exception:  # noqa: BLE001
                pass

    def checked(self, r: subprocess.CompletedProcess, what: str) -> None:
        if r.returncode != 0:
            text = (r.stderr or "") + (r.stdout or "")
            if DISCONNECT.search(text):
                raise RunnerError(f"adb device {self.serial} disconnected during {what}: reconnect it and rerun "
                                  f"({tail(text, 2)})", None)
            raise EffaiError(f"adb {what} failed on {self.serial}: {tail(text, 4)}")

    def pin_mask(self, threads: int) -> cpumask.CoreMask | None:
        if self.fs.run(["which", "taskset"])[0] != 0:
            return None
        try:
            return cpumask.for_threads(cpumask.big_cores(self.fs), threads)
        except ValueError:
            return None

    def stream(self, argv: list[str]) -> tuple[int, str, float]:
        """Run a device command, reading its merged output as it comes; (exit code, text, host time at exit)."""
        proc = subprocess.Popen(self.adb.shell_argv(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
            code = proc.wait()
        except BaseException:  # Ctrl-C: stop the tool, keep nothing half-read
            proc.kill()
            proc.wait()
            raise
        return code, "".join(lines), time.time()

    def failed(self, code: int, text: str, parse, build) -> RunnerError:
        """A non-zero exit: a disconnect keeps what was parsed so far; anything else shows the output."""
        partial = None
        try:
            partial = build(parse(text, complete=False))
        except (ToolOutputError, ValueError, IndexError):
            partial = None
        if DISCONNECT.search(text):
            n = len(partial.samples_ms) if partial else 0
            return RunnerError(f"adb device {self.serial} disconnected mid-run after {n} timed sample(s); results so "
                               f"far kept, run marked incomplete: reconnect it and rerun ({tail(text, 2)})", partial)
        return RunnerError(f"the benchmark tool exited with {code} on {self.serial}: {tail(text)}", partial)

    def finish(self, code: int, text: str, parse: Any, build: Any, missing: str) -> Timings:
        """Timings from a tool's output: a failed run raises with what was parsed so far (self.failed), output the
        parser cannot read raises showing its last lines."""
        if code != 0:
            raise self.failed(code, text, parse, build)
        try:
            t = build(parse(text))
        except ToolOutputError as e:
            raise RunnerError(str(e), None) from None
        if t is None:
            raise RunnerError(f"{missing}; last lines: {tail(text)}", None)
        return t

    def run_benchmark_model(self, cmd: list[str], model: str, threads: int, cfg: BenchConfig,
                            extra: dict[str, Any]) -> Timings:
        min_s = cfg.min_seconds or 0.0
        flags = [f"--graph={model}", f"--num_threads={threads}", f"--warmup_runs={max(1, cfg.warmup)}",
                 "--warmup_min_secs=0", f"--num_runs={cfg.runs}", f"--min_secs={min_s:g}",
                 f"--max_secs={max(150.0, 2 * min_s):g}", "--use_xnnpack=true"]
        if extra.get("input_layer"):
            flags += [f"--input_layer={extra['input_layer']}", f"--input_layer_shape={extra['input_layer_shape']}"]
        code, text, t_end = self.stream(cmd + flags)

        def build(res: ToolResult) -> Timings | None:
            if res.load_ms is None:
                return None
            agg = res.aggregate
            samples = [agg["avg_ms"]] if agg.get("avg_ms") is not None and agg.get("count", 0) > 0 else []
            total_s = (agg.get("count", 0) * agg.get("avg_ms", 0.0)) / 1000.0
            ex = dict(extra, timing="aggregate-only", complete=res.complete,
                      aggregate_ms=agg, warmup_aggregate_ms=res.warmup_aggregate,
                      note="benchmark_model prints no per-iteration times: samples_ms holds only the printed mean "
                           "(one value); count/min/max/std/percentiles are in aggregate_ms",
                      window="estimated: host clock at tool exit minus count x avg")
            return Timings(runtime="benchmark_model", runtime_version=f"sha256:{extra['tool_sha256']}",
                           threads=threads, load_ms=res.load_ms,
                           first_ms=res.first_ms if res.first_ms is not None else math.nan, samples_ms=samples,
                           warmup=int(res.warmup_aggregate.get("count", max(1, cfg.warmup))),
                           window_s=(t_end - total_s, t_end), extra=ex)

        return self.finish(code, text, parse_benchmark_model, build, "benchmark_model did not report its init time")

    def run_executor_runner(self, cmd: list[str], model: str, threads: int, cfg: BenchConfig,
                            extra: dict[str, Any]) -> Timings:
        # executor_runner has no warmup flag: execution 1 is the first inference, the next `warmup` are discarded,
        # the rest are timed. It cannot run by duration, so --min-seconds is not honoured here (noted in extra).
        n = 1 + cfg.warmup + cfg.runs
        flags = [f"--model_path={model}", f"--num_executions={n}", f"--cpu_threads={threads}"]
        code, text, t_end = self.stream(cmd + flags)
        if code != 0 and "cpu_threads" in text and "unknown command line flag" in text:
            # An executor_runner older than --cpu_threads: it picks its own thread count.
            extra["threads_note"] = "this executor_runner has no --cpu_threads; it chose its own thread count"
            code, text, t_end = self.stream(cmd + flags[:2])
        if cfg.min_seconds:
            extra["min_seconds_note"] = "executor_runner cannot run by duration; --runs executions were timed"

        def build(res: ToolResult) -> Timings | None:
            if not res.per_iteration and not res.aggregate:
                return None
            ex = dict(extra, complete=res.complete)
            if res.per_iteration:
                s = res.samples_ms
                samples = s[1 + cfg.warmup:]
                ex["timing"] = "per-iteration"
                first = s[0]
            else:
                agg = res.aggregate
                samples = [agg["avg_ms"]]
                first = math.nan
                ex.update(timing="aggregate-only", aggregate_ms=agg,
                          note="this executor_runner prints only the total over all executions: samples_ms holds "
                               "the printed mean (first inference and warmup included); first_ms is not available")
            total_s = sum(samples) / 1000.0 if res.per_iteration else 0.0
            ex["window"] = "estimated: host clock at tool exit minus the timed samples"
            return Timings(runtime="executor_runner", runtime_version=f"sha256:{extra['tool_sha256']}",
                           threads=threads, load_ms=res.load_ms if res.load_ms is not None else math.nan,
                           first_ms=first, samples_ms=samples, warmup=cfg.warmup,
                           window_s=(t_end - total_s, t_end), extra=ex)

        return self.finish(code, text, parse_executor_runner, build, "executor_runner printed no timings")
