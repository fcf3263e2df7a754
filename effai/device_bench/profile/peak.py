"""The host's measured fp32 compute peak: square matmuls timed with numpy's BLAS at N threads, cached per CPU and
thread count.

    peak_gflops(2)   # -> {"gflops": 222.5, "threads": 2, "n": 512, "cached": False, ...}

The figure is what this machine's tuned sgemm (numpy's OpenBLAS) reaches, not a datasheet number: a model's fraction
of it says how far the runtime is from what the cores can do in practice. numpy's OpenBLAS, not torch: torch's MKL
sgemm reached a fifth of it on the AMD EPYC these figures come from. The best of several sizes and many repeats,
because a shared host's load preempts long calls. The cache is $XDG_CACHE_HOME/effai/peak.json (or ~/.cache), keyed
by CPU model, thread count and numpy version; `refresh=True` re-measures.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from effai.errors import EffaiError
from effai.files import atomic_write

SIZES = (256, 512, 1024)  # the best of several sizes: a small product fits in cache and finishes within a time slice
REPEATS = 30
MATMUL_N = max(SIZES)
_SCHEMA = "effai.peak/2"

# Run in a child Python: OpenBLAS reads its thread count once, at load, from OPENBLAS_NUM_THREADS.
_CHILD = """
import json, sys, time
import numpy as np
sizes, repeats = [int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])
rng = np.random.default_rng(0)
best = {}
for n in sizes:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    best[n] = [2.0 * n ** 3 / ts[0] / 1e9, 2.0 * n ** 3 / ts[len(ts) // 2] / 1e9]
cfg = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else {}
blas = ((cfg or {}).get("Build Dependencies", {}).get("blas", {}) or {}).get("name", "?")
print(json.dumps({"best": best, "blas": blas, "numpy": np.__version__}))
"""


def cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "effai" / "peak.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _child(threads: int, sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    import subprocess
    import sys

    env = {**os.environ, **{k: str(int(threads)) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                           "MKL_NUM_THREADS")}}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, ",".join(map(str, sizes)), str(int(repeats))], env=env,
                              capture_output=True, text=True, timeout=300)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise EffaiError(f"the matmul peak microbenchmark failed ({type(e).__name__}: {e}); check that numpy runs "
                         f"in {sys.executable}") from None
    per_size = {int(n): {"gflops": v[0], "median_gflops": v[1]} for n, v in res["best"].items()}
    n_best = max(per_size, key=lambda n: per_size[n]["gflops"])
    return {"gflops": per_size[n_best]["gflops"], "n": n_best, "per_size": per_size, "blas": res.get("blas", "?"),
            "numpy": res.get("numpy")}


def measure(threads: int, sizes: tuple[int, ...] = SIZES, repeats: int = REPEATS) -> dict[str, Any]:
    """The fp32 peak of `threads` cores: the larger of numpy's matmul measured at `threads` BLAS threads and
    `threads` x its one-thread figure (best of `repeats` per size, best over the sizes; each in a child Python so
    the BLAS thread count applies). On a shared host a multi-threaded GEMM waits for every thread to be scheduled,
    while one thread needs one free core: threads x the one-thread peak is what the cores can do, and it is never
    below what was measured with all threads."""
    single = _child(1, sizes, repeats)
    multi = _child(threads, sizes, repeats) if int(threads) > 1 else single
    scaled = single["gflops"] * int(threads)
    gflops = max(multi["gflops"], scaled)
    how = (f"{threads} x the one-thread figure" if scaled >= multi["gflops"] else f"measured at {threads} threads")
    return {"gflops": gflops, "single_thread_gflops": single["gflops"], "measured_threads_gflops": multi["gflops"],
            "threads": int(threads), "repeats": repeats, "single": single, "multi": multi,
            "method": f"numpy fp32 matmul ({single['blas']}), best of {repeats} over sizes "
                      f"{','.join(map(str, sizes))}; {how}", "cpu": cpu_model(), "numpy": single.get("numpy")}


def _key(threads: int) -> str:
    try:
        from importlib import metadata

        nv = metadata.version("numpy")
    except Exception:
        nv = "?"
    return f"{cpu_model()}|threads={int(threads)}|numpy={nv}|sizes={','.join(map(str, SIZES))}"


def peak_gflops(threads: int, refresh: bool = False) -> dict[str, Any]:
    """The cached peak for this CPU and thread count, measured (and cached) on first use or with refresh=True."""
    path = cache_path()
    cache: dict[str, Any] = {}
    try:
        doc = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1_000_000 else {}
        if isinstance(doc, dict) and doc.get("schema") == _SCHEMA and isinstance(doc.get("peaks"), dict):
            cache = doc["peaks"]
    except (OSError, ValueError):
        cache = {}
    key = _key(threads)
    hit = cache.get(key)
    if not refresh and isinstance(hit, dict) and isinstance(hit.get("gflops"), (int, float)):
        return {**hit, "cached": True, "cache": str(path)}
    res = measure(threads)
    cache[key] = res
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"schema": _SCHEMA, "peaks": cache}, indent=1))
    except OSError:
        pass   # an unwritable cache costs a re-measurement next time, not this run
    return {**res, "cached": False, "cache": str(path)}
