"""How much effai's host runner adds to a bare timing loop, and how much medians move between repeats.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py                   # exports ghostnetv3_050.digits (64x64)
    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py out/a-tflite out/a-onnx --runs 300 --repeats 5

For each artifact and each of `--repeats` rounds, it times the same model twice, in alternating order (ABBA, so
slow drift of the machine falls on both sides equally):

- effai: HostRunner.run -> remote_runner.measure, the code `effai bench --device host` uses;
- bare: the runtime loaded directly and `for _: t0 = perf_counter_ns(); invoke(); t1 = ...` with nothing else.

Printed per artifact: the median-of-medians of both, the overhead ratio effai/bare - 1 (target <= 2%), the
per-iteration bookkeeping outside the timed calls (loop wall time per iteration minus the mean sample, as a share of
the median; it catches work the samples do not see, and is computed within each run so machine noise cancels), and
the spread of the per-round medians ((max - min) / median), which says how large a difference between
two runs is noise on this machine. Both sides get the same seeded inputs and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effai.device_bench import artifact as artifact_mod  # noqa: E402
from effai.device_bench import remote_runner  # noqa: E402
from effai.device_bench.base import BenchConfig  # noqa: E402
from effai.device_bench.runners.host import HostRunner  # noqa: E402


def bare_invoke(art: artifact_mod.Artifact, threads: int) -> Callable[[], Any]:
    """The runtime's own call, set up the plain way a user's script would, with the same seeded inputs."""
    inputs = remote_runner.make_inputs(art.manifest["inputs"], seed=0)
    path = str(art.model_file)
    if art.target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=path, num_threads=threads)
        interp.allocate_tensors()
        for d, x in zip(interp.get_input_details(), inputs):
            interp.set_tensor(d["index"], x)
        return interp.invoke
    if art.target == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: x for i, x in zip(sess.get_inputs(), inputs)}
        return lambda: sess.run(None, feeds)
    if art.target == "executorch":
        import torch
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(path).load_method("forward")
        args = [torch.from_numpy(x) for x in inputs]
        return lambda: method.execute(args)
    raise SystemExit(f"bench_overhead: no bare loop for target {art.target}")


def bare(art: artifact_mod.Artifact, threads: int, warmup: int, runs: int) -> tuple[float, float]:
    """(median ms, per-iteration bookkeeping ms: loop wall per iteration minus the mean sample) of the bare loop."""
    invoke = bare_invoke(art, threads)
    invoke()
    for _ in range(warmup):
        invoke()
    pc = time.perf_counter_ns
    samples = []
    w0 = pc()
    for _ in range(runs):
        t0 = pc()
        invoke()
        t1 = pc()
        samples.append(t1 - t0)
    wall = (pc() - w0) / 1e6 / runs
    return statistics.median(samples) / 1e6, wall - statistics.fmean(samples) / 1e6


def effai(runner: HostRunner, art: artifact_mod.Artifact, cfg: BenchConfig, threads: int) -> tuple[float, float]:
    """(median ms, per-iteration bookkeeping ms: timed-window wall per iteration minus the mean sample) through
    effai's host runner."""
    t = runner.run(art, threads, cfg)
    wall = (t.window_s[1] - t.window_s[0]) * 1e3 / len(t.samples_ms)
    return statistics.median(t.samples_ms), wall - statistics.fmean(t.samples_ms)


def spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / statistics.median(xs)


def export_default(root: Path) -> list[Path]:
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export

    loaded = zoo.create("ghostnetv3_050.digits")
    dirs = []
    for target in ("tflite", "onnx"):
        print(f"exporting ghostnetv3_050.digits to {target} ...", flush=True)
        export(loaded, ExportConfig(target=target, out=root / target, verify=False, eval="none"))
        dirs.append(root / target)
    return dirs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="*", type=Path, help="artifact dirs (default: export ghostnetv3_050.digits)")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="effai-overhead-") as tmp:
        dirs = args.artifacts or export_default(Path(tmp))
        cfg = BenchConfig(threads=(args.threads,), warmup=args.warmup, runs=args.runs, cooldown_s=0, idle_s=0,
                          energy="none")
        runner = HostRunner(cfg)
        worst = 0.0
        print(f"runs={args.runs} warmup={args.warmup} repeats={args.repeats} threads={args.threads}")
        for d in dirs:
            art = artifact_mod.load(d)
            e_med, b_med, e_wall, b_wall = [], [], [], []
            for r in range(args.repeats):
                order = ("effai", "bare") if r % 2 == 0 else ("bare", "effai")
                for side in order:
                    if side == "effai":
                        m, w = effai(runner, art, cfg, args.threads)
                        e_med.append(m)
                        e_wall.append(w)
                    else:
                        m, w = bare(art, args.threads, args.warmup, args.runs)
                        b_med.append(m)
                        b_wall.append(w)
            em, bm = statistics.median(e_med), statistics.median(b_med)
            ew, bw = statistics.median(e_wall), statistics.median(b_wall)
            ratio, book = em / bm - 1, (ew - bw) / bm
            worst = max(worst, ratio, book)
            print(f"{art.model_name} {art.target}/{art.precision}:")
            print(f"  medians per repeat effai {' '.join(f'{x:.4f}' for x in e_med)} ms")
            print(f"  medians per repeat bare  {' '.join(f'{x:.4f}' for x in b_med)} ms")
            print(f"  median of medians effai {em:.4f} ms  bare {bm:.4f} ms  overhead {ratio:+.2%}")
            print(f"  bookkeeping per iter effai {ew * 1e3:.2f} us  bare {bw * 1e3:.2f} us  extra {book:+.3%} of the "
                  "median")
            print(f"  spread of medians  effai {spread(e_med):.2%}  bare {spread(b_med):.2%}")
        print(f"worst overhead {worst:+.2%} ({'within' if worst <= 0.02 else 'ABOVE'} the 2% target)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
