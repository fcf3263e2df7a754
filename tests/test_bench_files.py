"""effai bench on plain model files (.onnx, .tflite, .pte, .mlpackage): inputs read from the file in its own runtime,
timed by the same runners as artifact directories, clear usage errors (issue 20). The files are the digits model's
exports from the session fixture digits_exports (no re-export)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from tests.helpers import run_cli

FAST = ("--runs", "3", "--warmup", "0", "--cooldown", "0", "--idle", "0", "--energy", "none", "--json")


@pytest.fixture(scope="module")
def plain_files(digits_exports, tmp_path_factory):
    """The digits model files copied out of their artifact dirs (no manifest beside them)."""
    root = tmp_path_factory.mktemp("plain")
    files = {}
    for target, res in digits_exports.items():
        dst = root / res.model_file.name.replace("model", f"digits_{target}")
        (shutil.copytree if res.model_file.is_dir() else shutil.copyfile)(res.model_file, dst)
        files[target] = dst
    return files


@pytest.fixture(scope="module")
def cli_run(plain_files, digits_exports, tmp_path_factory):
    """One `effai bench` over every plain file (Core ML included: skipped off macOS)."""
    out = tmp_path_factory.mktemp("bench_files") / "bench.json"
    paths = [str(plain_files[t]) for t in ("onnx", "tflite", "executorch", "coreml")]
    code, last, stdout, err = run_cli("bench", *paths, *FAST, "--out", str(out))
    return code, last, err, json.loads(out.read_text())


def test_plain_files_are_timed_in_their_runtime_with_inputs_read_from_the_file(cli_run, digits_exports,
                                                                            plain_files):
    code, last, err, report = cli_run
    assert code == 0, err
    by_target = {r["artifact"]["target"]: r for r in report["records"]}
    assert {"onnx", "tflite", "executorch"} <= {t for t, r in by_target.items() if r["status"] == "ok"}
    for target in ("onnx", "tflite", "executorch"):
        rec = by_target[target]
        art = rec["artifact"]
        assert art["path"] == str(plain_files[target].resolve())
        assert art["plain_file"] is True and "no manifest, parity and accuracy not checked" in art["note"]
        assert rec["runs"] == 3 and rec["stats"]["median"] > 0
        declared = digits_exports[target].manifest["inputs"][0]   # what export wrote; bench read it from the file
        assert art["inputs"][0]["shape"] == declared["shape"]
        assert art["inputs"][0]["dtype"] == declared["dtype"]
    assert by_target["onnx"]["runtime"] == "onnxruntime" and by_target["executorch"]["runtime"] == "executorch"
    rows = {r["target"]: r for r in last["records"]}
    assert rows["onnx"]["status"] == "ok"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_an_mlpackage_off_macos_is_a_skipped_record(cli_run):
    code, last, _, report = cli_run
    rec = next(r for r in report["records"] if r["artifact"]["target"] == "coreml")
    assert rec["status"] == "skipped" and "macOS" in rec["error"]
    assert rec["artifact"]["inputs"], "the package's inputs were read from its spec"
    assert any("mlpackage" in s["artifact"] for s in last["skipped"])


def test_unknown_extension_corrupt_file_and_record_are_usage_errors(tmp_path):
    from effai.device_bench.bench import run_bench
    from effai.device_bench.base import BenchConfig
    from effai.errors import UsageError

    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\0" * 64)
    code, last, _, _ = run_cli("bench", str(bad), *FAST, "--out", str(tmp_path / "a.json"))   # the CLI: exit 2
    assert code == 2 and ".onnx, .tflite, .pte, .mlpackage" in last["error"] and "'.bin'" in last["error"]
    cfg = BenchConfig(threads=(1,), runs=1, warmup=0, cooldown_s=0, idle_s=0, energy="none")
    short = tmp_path / "short.pte"      # a real program's header, cut short: refused before ExecuTorch's loader
    short.write_bytes(b"\x3c\0\0\0ET12eh00\x20\0\0\0" + (40000).to_bytes(8, "little") * 2)
    for suffix in (".onnx", ".tflite", ".pte", "short"):
        broken = short if suffix == "short" else tmp_path / f"broken{suffix}"
        if suffix != "short":
            broken.write_bytes(np.random.default_rng(0).bytes(2048))
        with pytest.raises(UsageError) as e:    # in process: ExecuTorch's loader must not be reached (it aborts)
            run_bench([broken], "host", cfg, tmp_path / "b.json")
        msg = str(e.value)
        assert "cannot be read as" in msg and str(broken) in msg and "\n" not in msg, msg
        assert suffix != "short" or "truncated" in msg
    code, last, _, _ = run_cli("bench", str(tmp_path / "broken.onnx"), *FAST, "--record", str(tmp_path))
    assert code == 2 and "plain model file" in last["error"]


def test_dynamic_onnx_dims_need_input_shape_and_the_api_takes_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, last, _, _ = run_cli("bench", str(path), *FAST, "--out", str(tmp_path / "a.json"))
    assert code == 2 and "dynamic" in last["error"] and "--input-shape" in last["error"]
    code, last, _, _ = run_cli("bench", str(path), *FAST, "--input-shape", "x=1,3,8,9", "--out", str(tmp_path / "b.json"))
    assert code == 2 and "does not fit" in last["error"]

    import effai

    recs = effai.bench(path, threads=(1,), runs=2, warmup=0, energy="none", input_shapes={"x": (2, 3, 8, 8)},
                       out=tmp_path / "c.json")
    assert recs[0]["status"] == "ok", recs[0]["error"]
    assert recs[0]["artifact"]["inputs"][0]["shape"] == [2, 3, 8, 8] and recs[0]["artifact"]["plain_file"]


def _relu_tflite(path, signature):
    """A one-op LiteRT model (RELU) whose input has `signature` as its shape_signature (-1 = resizable)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    def tensor(name, buf):
        t = fb.TensorT()
        t.shape, t.shapeSignature = [d if d > 0 else 1 for d in signature], list(signature)
        t.type, t.buffer, t.name = fb.TensorType.FLOAT32, buf, name.encode()
        return t

    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.RELU
    code.version = 1
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph = fb.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = [tensor("x", 1), tensor("y", 2)], [0], [1], [op]
    model = fb.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [fb.BufferT(), fb.BufferT(), fb.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


def test_input_shape_resizes_a_tflite_where_its_signature_allows_and_is_refused_where_the_file_fixes_it(
        tmp_path, plain_files):
    from effai.device_bench.base import BenchConfig
    from effai.device_bench.bench import run_bench
    from effai.errors import UsageError

    cfg = BenchConfig(threads=(1,), runs=2, warmup=0, cooldown_s=0, idle_s=0, energy="none")
    dyn = _relu_tflite(tmp_path / "dyn.tflite", [-1, 3, 8, 8])
    run = run_bench([dyn], "host", cfg, tmp_path / "a.json", input_shapes={"x": (4, 3, 8, 8)})
    rec = run.records[0]
    assert rec.status == "ok", rec.error
    assert rec.artifact["inputs"][0]["shape"] == [4, 3, 8, 8] and rec.artifact["inputs"][0]["resized"] is True
    assert rec.runtime == "litert" and rec.stats["median"] > 0
    refused = {   # (file, --input-shape) -> what the one-line error must say
        (dyn, (4, 3, 8, 9)): "only its ? dims can change",
        (dyn, ("z", (1, 3, 8, 8))): "does not have; its inputs: x",
        (_relu_tflite(tmp_path / "static.tflite", [1, 3, 8, 8]), (2, 3, 8, 8)): "the file fixes every dim",
        (plain_files["executorch"], (1, 1, 32, 32)): "ExecuTorch program has its input sizes fixed in the file",
        (plain_files["coreml"], (1, 1, 32, 32)): "Core ML package has its input sizes fixed in the file",
    }
    for (path, shape), said in refused.items():
        name, shape = shape if isinstance(shape[0], str) else ("", shape)
        with pytest.raises(UsageError) as e:
            run_bench([path], "host", cfg, tmp_path / "b.json", input_shapes={name: shape})
        msg = str(e.value)
        assert said in msg and str(path) in msg and "\n" not in msg, msg
