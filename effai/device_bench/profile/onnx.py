"""ONNX Runtime per-node profile: SessionOptions.enable_profiling writes a Chrome-trace JSON whose "Node" events
("<node>_kernel_time", dur in microseconds, args.op_name) time every kernel of every run; the median per node over
the profiled runs is its time. FLOPs come from the .onnx graph (shape-inferred): Conv, ConvInteger, QLinearConv,
Gemm, MatMul (and their fused forms, which ORT names after the node they started from).

Module names: the dynamo exporter writes each node's torch module into its metadata_props
("pkg.torch.onnx.name_scopes" / "namespace"); graphs that kept it are mapped, graphs that lost it (onnxslim drops
node metadata) are not, and the profile says so.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from effai.device_bench.profile.base import OpRow, Profile, median
from effai.errors import UsageError

_CONVS = ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv")


def _shape_map(model: Any) -> dict[str, list[int]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes: dict[str, list[int]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        shapes[v.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def node_flops(model: Any) -> dict[str, float]:
    """{node name: 2 x MACs} for the graph's convolutions and matrix products with known shapes."""
    shapes = _shape_map(model)
    out: dict[str, float] = {}
    for n in model.graph.node:
        try:
            if n.op_type in _CONVS:
                w = shapes.get(n.input[3 if n.op_type == "QLinearConv" else 1])
                y = shapes.get(n.output[0])
                if w and y and min(w) > 0 and min(y) > 0:
                    out[n.name] = 2.0 * float(np.prod(y)) * float(np.prod(w[1:]))
            elif n.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
                a = shapes.get(n.input[0])
                y = shapes.get(n.output[0])
                if a and y and min(a) > 0 and min(y) > 0:
                    k = a[-1] if not (n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute)) \
                        else a[0]
                    out[n.name] = 2.0 * float(np.prod(y)) * k
        except (IndexError, TypeError):
            continue
    return out


_ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Add", "Sum")


def _origin(model: Any) -> Any:
    """node name as onnxruntime ran it -> the .onnx node it came from. ORT keeps a node's name when it fuses an
    activation into it (FusedConv) and names its NCHWc convolutions after the tensor they produce ("<out>_nchwc"),
    which may be the output of a fused activation: followed back through activations to the convolution."""
    by_name = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}

    def find(node: str) -> str:
        if node in by_name:
            return node
        if node.endswith("_nchwc"):
            n = producer.get(node[: -len("_nchwc")])
            for _ in range(3):
                if n is None:
                    break
                if n.op_type in _CONVS or n.op_type in ("Gemm", "MatMul"):
                    return n.name
                if n.op_type not in _ACTIVATIONS or not n.input:
                    break
                n = next((producer[i] for i in n.input if i in producer and producer[i].op_type in _CONVS),
                         producer.get(n.input[0]))
        return node

    return find


def node_modules(model: Any) -> dict[str, str]:
    """{node name: torch module path} from the exporter's node metadata, where the graph kept it."""
    out: dict[str, str] = {}
    for n in model.graph.node:
        props = {p.key: p.value for p in n.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes") or ""
        if scopes:
            try:
                names = json.loads(scopes) if scopes.startswith("[") else scopes.split("/")
                names = [s for s in names if s]
                if names:
                    out[n.name] = str(names[-1])
                    continue
            except ValueError:
                pass
        ns = props.get("namespace") or ""
        if ns:
            out[n.name] = ns.split("/")[-1].split(":")[0].strip()
    return out


def weight_bytes(model: Any) -> int:
    return int(sum(np.prod(i.dims) * _itemsize(i.data_type) for i in model.graph.initializer))


def _itemsize(dt: int) -> int:
    return {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2}.get(int(dt), 4)


def profile(model_file: Path, inputs: list[np.ndarray], names: list[str], threads: int, warmup: int,
            runs: int) -> Profile:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise UsageError("profiling an .onnx needs onnxruntime and onnx; pip install onnxruntime onnx") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    tmp = tempfile.mkdtemp(prefix="effai-ort-profile-")
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tmp, "ort")
    sess = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    declared = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names if set(names) == set(declared) else declared, inputs))
    import time

    for _ in range(max(1, warmup)):
        sess.run(None, feeds)
    walls = []
    start_ns = sess.get_profiling_start_time_ns()
    t_mark = time.perf_counter_ns()
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        walls.append((time.perf_counter() - t0) * 1e3)
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    # ts is microseconds since the session's profiling start: keep the timed runs only (not warmup, not load)
    cutoff_us = (t_mark - start_ns) / 1e3 if start_ns else 0.0
    runs_seen: list[float] = []
    per_node: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for e in events:
        if not isinstance(e, dict) or e.get("cat") != "Node" or float(e.get("ts", 0)) < cutoff_us:
            continue
        name = str(e.get("name", ""))
        if not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        per_node.setdefault(node, []).append(float(e.get("dur", 0)) / 1e3)
        kinds[node] = str((e.get("args") or {}).get("op_name", ""))
    for e in events:
        if isinstance(e, dict) and e.get("cat") == "Session" and e.get("name") == "model_run" \
                and float(e.get("ts", 0)) >= cutoff_us:
            runs_seen.append(float(e.get("dur", 0)) / 1e3)
    if not per_node:
        raise UsageError(f"{model_file}: onnxruntime's profile held no node events; re-run with more --runs")
    model = onnx.load(str(model_file), load_external_data=False)
    flops = node_flops(model)
    modules = node_modules(model)
    origin = _origin(model)
    nruns = max(1, len(runs_seen) or runs)
    rows = []
    for node, times in per_node.items():
        # a node run more than once per inference (a loop body) adds up; sum per run = total / runs
        per_run = sum(times) / nruns if len(times) > nruns else median(times)
        src = origin(node)
        rows.append(OpRow(name=node, kind=kinds.get(node, ""), time_ms=per_run, module=modules.get(src, ""),
                          flops=flops.get(src)))
    notes = []
    if not modules:
        notes.append("module names: this .onnx keeps no node metadata (effai's export runs onnxruntime-ready graphs "
                     "through onnxslim, which drops the exporter's name scopes), so nodes keep their graph names")
    fused = sum(1 for r in rows if r.flops is None and r.kind in ("FusedConv", "Conv", "NhwcConv"))
    if fused:
        notes.append(f"{fused} convolution node(s) onnxruntime renamed could not be traced back to the .onnx: their "
                     "FLOPs are in the model total only")
    total_flops = float(sum(flops.values())) if flops else None
    return Profile(target="onnx", runtime=f"onnxruntime {ort.__version__}",
                   method="onnxruntime SessionOptions.enable_profiling: per-node kernel time (Chrome trace), median "
                          "per inference over the profiled runs",
                   threads=threads, runs=len(walls), total_ms=0.0, rows=tuple(rows), wall_ms=median(walls),
                   flops=total_flops, weight_bytes=weight_bytes(model), notes=tuple(notes))
