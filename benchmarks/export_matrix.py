"""effai's exported artifacts against the plain upstream flow of each target, side by side in one run.

    python benchmarks/export_matrix.py --models ghostnetv3_100,mobilenetv2_100,ghostnetv3_050.digits \
        --targets executorch,tflite,onnx,coreml --precisions all --runs 50 --threads 2
    python benchmarks/export_matrix.py --models runs/vit_tiny/model.safetensors --targets executorch   # a trained
                                                                    # checkpoint (a ViT: weight-only's use case)

For every model x target x precision (the target's precisions, intersected with --precisions):

- effai: `export(zoo.create(model), ExportConfig(target, precision))`: fold, trace, lower, parity, accuracy gate.
  Recorded: model-file size, export seconds (every pipeline stage, verification included; `build_s` is the part
  without parity/eval/sensitivity/manifest), parity status, the manifest's accuracy, ExecuTorch delegation, warnings.
- upstream: each toolchain's own documented flow on the UNFOLDED model as `zoo.create` returns it (no effai
  folding or rewrites), at the same precision where the toolchain has a plain flow for it:
  executorch  torch.export -> to_edge_transform_and_lower(XnnpackPartitioner); int8 / int8-dynamic: PT2E with
              XNNPACKQuantizer (per-channel symmetric), calibrated on the same samples effai used (dynamic:
              the example input run once, so the per-channel weight observers see the weights); int8-weight /
              int4-weight: torchao quantize_(IntxWeightOnlyConfig, per output channel) then the same lowering.
  tflite      litert_torch.convert; int8: litert-torch's own PT2E path is tried (and reported), the upstream number
              is ai-edge-quantizer's preset recipe on the upstream float .tflite (static_wi8_ai8, dynamic_wi8_afp32,
              weight_only_wi8_afp32, weight_only_wi4_afp32); fp16 has no preset: n/a.
  onnx        torch.onnx.export(dynamo=True), no simplifier; int8: quantize_static with its defaults (QDQ,
              per-tensor, int8 activations), int8-dynamic: quantize_dynamic with its defaults.
  coreml      ct.convert(torch.jit.trace(...), mlprogram, iOS16) at fp16/fp32; compressed precisions with
              coremltools.optimize.coreml defaults (size and export time only); int8 (W8A8) needs macOS upstream.
  Float-graph conversions are cached per model: a quantized flow's time is float conversion + quantization.
- host latency: every artifact is loaded in its runtime with --threads threads (ExecuTorch, ai-edge-litert,
  onnxruntime; Core ML needs macOS) and `run` is timed on one fixed input: 5 warmup runs, then --runs timed runs,
  effai and upstream alternating in blocks of 10 so machine noise hits both alike. Median and p90 in ms.
- cosine: output vs the torch fp32 model (unfolded) on that same fixed input, for both; top-1 on the card's
  held-out set (the digits model) for both.

Reading the ratios (effai / upstream): latency <= 1.0 means effai's artifact is no slower; size < 1.0 means smaller;
export time > 1.0 is expected (effai verifies parity and accuracy, upstream does not). The ExecuTorch/LiteRT line
compares effai's own ExecuTorch and TFLite artifacts (fp32 vs fp32, int8 vs int8); the target is <= 1.2.

Results go to --out as JSON, rewritten after every row, so an interrupted run keeps what it measured.
Note: effai's Core ML export installs a coremltools fix (aten::Int folding under numpy 2, hit only by ViTs) that
stays active in this process for the upstream Core ML flow too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from effai import toolchain
from effai.export.pipeline import ExportConfig, ParityFailed, export
from effai.export.targets import TARGETS
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/matrix/, also when run from elsewhere
from matrix.case import Case, _delegation_short, _first_line
from matrix.runtime import cosine, load_all, measure, top1
from matrix.upstream import run_upstream


# ------------------------------------------------------------------------------------------------ effai side

def run_effai(case: Case, target: str, precision: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = ExportConfig(target=target, precision=precision, out=out, calib_samples=args.calib_samples)
    error = None
    try:
        result = export(case.loaded, cfg)
    except ParityFailed as e:
        result, error = e.result, str(e)
    except Exception as e:  # EffaiError and anything a toolchain raises: recorded, the matrix goes on
        return {"error": _first_line(e)}
    m = result.manifest
    timings = m["timings_s"]
    rec: dict[str, Any] = {
        "path": str(result.out_dir / m["model_file"]),
        "mb": _manifest_mb(m),
        "export_s": round(sum(timings.values()), 3),
        "build_s": round(sum(v for k, v in timings.items() if k in ("fold", "calib", "trace", "lower")), 3),
        "timings_s": timings,
        "parity": {k: m["parity"].get(k) for k in ("status", "cosine", "max_abs_err", "reason") if k in m["parity"]},
        "accuracy": _accuracy_summary(m.get("accuracy")),
        "warnings": m.get("warnings", []),
    }
    if "delegation" in m.get("target_details", {}):
        rec["delegation"] = _delegation_short(m["target_details"]["delegation"])
    fallback = (m.get("quantization") or {}).get("fallback")
    if fallback:
        rec["fallback"] = {"status": fallback.get("status"), "reason": fallback.get("reason"),
                           "float_layers": fallback.get("float_layers", []), "attempts": len(fallback["attempts"])}
    if error:
        rec["error"] = error
    return rec


def _manifest_mb(m: dict[str, Any]) -> float:
    f = m["model_file"]
    return round(sum(e["bytes"] for e in m["files"] if e["path"] == f or e["path"].startswith(f + "/")) / 1e6, 3)


def _accuracy_summary(a: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a:
        return None
    return {"torch_top1": a["torch"]["top1"], "top1": a.get("artifact", {}).get("top1"), "status": a["status"],
            "samples": a["samples"]}



# ------------------------------------------------------------------------------------------------ one row

def run_row(case: Case, target: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    base = args.workdir / case.name / f"{target}-{precision}"
    effai_rec = run_effai(case, target, precision, base / "effai", args)
    up = run_upstream(case, target, precision, base / "upstream")
    recs = [effai_rec, up]
    pt2e = up.get("litert_torch_pt2e")
    if pt2e and pt2e.get("status") == "ok":
        recs.append(pt2e)   # litert-torch's own int8 .tflite, when it converts, is timed alongside
    runners = load_all(target, recs, args.threads, case.log)
    for rec, runner, lat in zip(recs, runners, measure(runners, case.x, args.runs)):
        if runner is None:
            continue
        rec["latency"] = lat
        rec["cosine"] = round(cosine(runner(case.x), case.reference), 6)
        if rec is not effai_rec:   # effai's own top-1 is the manifest's (same artifact, same runtime)
            rec["top1"] = top1(runner, case)
    return {"model": case.name, "target": target, "precision": precision, "effai": effai_rec, "upstream": up,
            "ratios": ratios(effai_rec, up)}


def ratios(e: dict[str, Any], u: dict[str, Any]) -> dict[str, float | None]:
    def r(a: Any, b: Any) -> float | None:
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None

    lat = lambda rec: rec["latency"]["median_ms"] if isinstance(rec.get("latency"), dict) else None  # noqa: E731
    return {"latency": r(lat(e), lat(u)), "size": r(e.get("mb"), u.get("mb")),
            "export_time": r(e.get("export_s"), u.get("export_s")),
            "export_time_build_only": r(e.get("build_s"), u.get("export_s"))}


# ------------------------------------------------------------------------------------------------ reporting

def machine(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    v = toolchain.versions()
    keys = ("torch", "executorch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "onnxruntime", "coremltools")
    return {"cpu": cpu, "cores": cores, "threads": threads, "platform": v.get("platform"),
            "versions": {k: v.get(k) for k in ("effai", *keys)}}


def machine_line(m: dict[str, Any]) -> str:
    vs = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return f"{m['cpu']}, {m['cores']} cores usable, {m['threads']} runtime threads; {vs}"


def et_vs_tflite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """effai ExecuTorch / effai TFLite median latency per model, fp32 vs fp32 and int8 vs int8."""
    lat = {(r["model"], r["target"], r["precision"]): r["effai"].get("latency") for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for p in ("fp32", "int8"):
            et, tfl = lat.get((model, "executorch", p)), lat.get((model, "tflite", p))
            if isinstance(et, dict) and isinstance(tfl, dict):
                out.append({"model": model, "precision": p, "executorch_ms": et["median_ms"],
                            "tflite_ms": tfl["median_ms"], "ratio": round(et["median_ms"] / tfl["median_ms"], 3)})
    return out


def print_model(console: Any, case: Case, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    torch_top1 = next((r["effai"]["accuracy"]["torch_top1"] for r in rows if r["effai"].get("accuracy")), None)
    title = f"{case.name}  (input {'x'.join(map(str, case.x.shape))}" + (
        f", torch fp32 top-1 {torch_top1:.1%})" if torch_top1 is not None else ")")
    t = Table(title=title, title_justify="left")
    for col in ("target", "prec", "effai MB", "s", "ms", "parity", "cos", "top-1",
                "upstream MB", "s", "ms", "cos", "top-1", "lat x", "size x", "time x"):
        t.add_column(col, justify="left" if col in ("target", "prec", "parity") else "right")
    for r in rows:
        e, u, q = r["effai"], r["upstream"], r["ratios"]
        acc = e.get("accuracy") or {}
        t.add_row(r["target"], r["precision"],
                  _f(e.get("mb"), ".2f"), _f(e.get("export_s"), ".1f"), _ms(e), _parity(e), _f(e.get("cosine"), ".4f"),
                  _f(acc.get("top1"), ".1%"),
                  _f(u.get("mb"), ".2f") if u["status"] == "ok" else u["status"], _f(u.get("export_s"), ".1f"),
                  _ms(u), _f(u.get("cosine"), ".4f"), _f(u.get("top1"), ".1%"),
                  _f(q["latency"], ".2f"), _f(q["size"], ".2f"), _f(q["export_time"], ".1f"))
    console.print(t)
    for line in notes(rows):
        console.print(f"  {line}", highlight=False, markup=False)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the table cannot show: errors, n/a reasons, delegation, fallbacks, litert-torch PT2E."""
    out = []
    for r in rows:
        tag, e, u = f"{r['target']} {r['precision']}:", r["effai"], r["upstream"]
        if e.get("error"):
            out.append(f"{tag} effai error: {e['error']}")
        if u["status"] != "ok":
            out.append(f"{tag} upstream {u['status']}: {u.get('error') or u.get('reason')}")
        for who, rec in (("effai", e), ("upstream", u)):
            if isinstance(rec.get("latency"), str):
                out.append(f"{tag} {who} latency: {rec['latency']}")
            if rec.get("delegation"):
                d = rec["delegation"]
                out.append(f"{tag} {who} XNNPACK partitions {d['partitions']}, non-delegated ops "
                           f"{d['non_delegated_ops'] or 'none'}")
        if e.get("fallback"):
            f = e["fallback"]
            out.append(f"{tag} effai fallback {f['status']}: {len(f['float_layers'])} float layer(s) after "
                       f"{f['attempts']} attempt(s) ({f['reason']})")
        if u.get("io_dtype", "float32/float32") != "float32/float32":
            out.append(f"{tag} upstream {u['recipe']} I/O {u['io_dtype']} (effai keeps float32 I/O by default)")
        pt2e = u.get("litert_torch_pt2e")
        if pt2e:
            out.append(f"{tag} litert-torch PT2E int8: " + (
                f"failed: {pt2e['error']}" if pt2e["status"] != "ok" else
                f"{pt2e['mb']:.2f} MB, {_ms(pt2e)} ms, cos {_f(pt2e.get('cosine'), '.4f')}, "
                f"top-1 {_f(pt2e.get('top1'), '.1%')}"))
    return out


def _f(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def _ms(rec: dict[str, Any]) -> str:
    lat = rec.get("latency")
    return f"{lat['median_ms']:.2f}" if isinstance(lat, dict) else "-"


def _parity(e: dict[str, Any]) -> str:
    if "parity" not in e:
        return "error"
    s = e["parity"]["status"]
    return s + ("!" if e.get("error") else "")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic rewrite: an interrupted run leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main

def precisions_for(target: str, wanted: str) -> list[str]:
    ps = list(TARGETS.get(target).precisions)
    return ps if wanted == "all" else [p for p in ps if p in wanted.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ghostnetv3_100,mobilenetv2_100,ghostnetv3_050.digits")
    ap.add_argument("--targets", default="executorch,tflite,onnx,coreml")
    ap.add_argument("--precisions", default="all", help="all, or a comma list (fp32,int8,...)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per artifact (after 5 warmup runs)")
    ap.add_argument("--threads", type=int, default=2, help="runtime and torch threads")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration samples, effai and upstream alike")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_matrix.json")
    ap.add_argument("--workdir", type=Path, default=Path("runs/export_matrix"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    info = machine(args.threads)
    console.print(machine_line(info), highlight=False)
    results: dict[str, Any] = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()},
                               "rows": [], "executorch_vs_tflite": []}
    for name in [m for m in args.models.split(",") if m]:
        case = Case(name, args.workdir, args.calib_samples, args.workdir / "toolchain.log")
        rows = []
        for target in [t for t in args.targets.split(",") if t]:
            for precision in precisions_for(target, args.precisions):
                t0 = time.perf_counter()
                row = run_row(case, target, precision, args)
                rows.append(row)
                results["rows"].append(row)
                results["executorch_vs_tflite"] = et_vs_tflite(results["rows"])
                write_json(args.out, results)
                q = row["ratios"]
                console.print(f"{name} {target} {precision}: effai {_ms(row['effai'])} ms, upstream "
                              f"{_ms(row['upstream'])} ms ({row['upstream']['status']}), latency ratio "
                              f"{_f(q['latency'], '.2f')}  [{time.perf_counter() - t0:.0f}s]", highlight=False)
        print_model(console, case, rows)
    for r in results["executorch_vs_tflite"]:
        console.print(f"ExecuTorch/LiteRT {r['model']} {r['precision']}: {r['executorch_ms']:.2f} / "
                      f"{r['tflite_ms']:.2f} ms = {r['ratio']:.2f} (target <= 1.2)", highlight=False)
    console.print(f"results: {args.out}  (toolchain output: {args.workdir / 'toolchain.log'})", highlight=False)


if __name__ == "__main__":
    main()
