"""The host's measured fp32 compute peak: a square matmul timed with torch at N threads, cached per CPU and threads.

    peak_gflops(2)   # -> {"gflops": 318.2, "threads": 2, "n": 1024, "cached": False, ...}

The figure is what this machine's best-tuned GEMM (torch's MKL/oneDNN/OpenBLAS sgemm) reaches, not a datasheet
number: a model's fraction of it says how far the runtime is from what the cores can do in practice. The cache is
$XDG_CACHE_HOME/effai/peak.json (or ~/.cache), keyed by CPU model, thread count and torch version; `refresh=True`
re-measures. torch.set_num_threads is restored after the measurement.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from effai.files import atomic_write

MATMUL_N = 1024          # 2.1 GFLOP per product: long enough to swamp call overhead, small enough to stay in cache
REPEATS = 12
_SCHEMA = "effai.peak/1"


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


def measure(threads: int, n: int = MATMUL_N, repeats: int = REPEATS) -> dict[str, Any]:
    """Best-of-`repeats` GFLOP/s of an n x n x n fp32 matmul at `threads` threads (torch), with its median."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    flops = 2.0 * n ** 3
    times.sort()
    return {"gflops": flops / times[0] / 1e9, "median_gflops": flops / times[len(times) // 2] / 1e9,
            "threads": int(threads), "n": n, "repeats": repeats, "method": f"torch.mm fp32 {n}x{n}x{n}, best of "
            f"{repeats}", "cpu": cpu_model(), "torch": torch.__version__}


def _key(threads: int) -> str:
    try:
        from importlib import metadata

        tv = metadata.version("torch")
    except Exception:
        tv = "?"
    return f"{cpu_model()}|threads={int(threads)}|torch={tv}|n={MATMUL_N}"


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
