"""The export pipeline end to end on every target (ghostnetv3_050 at 64x64), its manifest, and its failure modes."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from effai import zoo
from effai.errors import EffaiError, UsageError
from effai.export import manifest as manifest_io
from effai.export.pipeline import ExportConfig, ParityFailed, export
from effai.export.targets import TARGETS
from effai.export.verify import verify
from tests.helpers import SMALL

TARGET_NAMES = ("executorch", "onnx", "tflite", "coreml")
MODEL_FILES = {"executorch": "model.pte", "onnx": "model.onnx", "tflite": "model.tflite", "coreml": "model.mlpackage"}


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_every_target_writes_an_artifact_with_a_complete_manifest(small_exports, target):
    res = small_exports[target]
    m = json.loads((res.out_dir / "manifest.json").read_text())
    assert m["schema"] == "effai.manifest/1" and m["target"] == target
    assert m["model_file"] == MODEL_FILES[target] and (res.out_dir / m["model_file"]).exists()
    for key in ("effai_version", "model", "precision", "quantization", "inputs", "outputs", "preprocessing",
                "labels", "files", "fold", "parity", "toolchain", "created_at", "timings_s"):
        assert key in m, key
    assert m["model"]["weights_sha256"] == "random-init" and m["model"]["random_init"] is True
    assert m["inputs"][0]["shape"] == [1, 3, SMALL, SMALL] and m["outputs"][0]["shape"] == [1, 1000]
    assert len(m["labels"]) == 1000 and m["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert m["fold"]["fused_conv_bn"] > 0 and m["fold"]["params_after"] < m["fold"]["params_before"]
    assert {"fold", "lower", "parity"} <= set(m["timings_s"])
    assert m["toolchain"]["torch"] == "2.14.1"
    paths = {f["path"] for f in m["files"]}
    assert "parity.npz" in paths and "export.log" not in paths and (res.out_dir / "export.log").is_file()
    assert not list(res.out_dir.parent.glob(".*.tmp-*")), "temp dirs left behind"


@pytest.mark.parametrize("target", ["executorch", "onnx", "tflite"])
def test_runtime_targets_pass_parity_at_fp32_on_real_photos(small_exports, target):
    p = small_exports[target].manifest["parity"]
    assert p["status"] == "pass", p
    assert small_exports[target].manifest["status"] == "pass"
    assert p["rel_err"] < 1e-4 and p["cosine"] > 0.99999 and p["top1_agreement"] == 1.0
    assert p["samples"] == 8 and sum(n.startswith("photo:") for n in p["sample_names"]) == 6
    assert p["runtime"] in ("executorch-xnnpack", "onnxruntime-cpu", "ai-edge-litert")


def test_coreml_is_verified_structurally_on_linux(small_exports):
    m = small_exports["coreml"].manifest
    p = m["parity"]
    assert p["status"] == "not-run" and p["reason"] == "Core ML runtime needs macOS"
    assert small_exports["coreml"].manifest["status"] == "unverified"
    s = p["structural"]
    assert s["status"] == "pass" and s["op_count"] > 100 and set(s["weight_dtypes"]) == {"fp16"}
    assert s["inputs"][0]["shape"] == [1, 3, SMALL, SMALL] and s["inputs"][0]["dtype"] == "float32"
    assert m["precision"] == "fp16"


def test_executorch_ghostnet_is_one_xnnpack_partition(small_exports):
    d = small_exports["executorch"].manifest["target_details"]["delegation"]
    assert d["partitions"] == 1, d
    # only the delegate's output getitem stays outside: no compute node (SE's hard-sigmoid is decomposed by effai
    # with float scalars, so no dtype copies of its constants are left behind)
    assert set(d["non_delegated_ops"]) <= {"getitem"}, d
    assert not small_exports["executorch"].manifest["warnings"]
    assert "aten_upsample_nearest2d_vec" not in d["delegated_ops"] and d["delegated_ops"]["aten_linear_default"] > 1


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_verify_rechecks_hashes_and_reruns_parity(small_exports, target, tmp_path):
    src = small_exports[target].out_dir
    report = verify(src)
    assert report["hashes"] == "pass"
    assert report["parity"]["status"] == ("not-run" if target == "coreml" else "pass")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    model = copy / MODEL_FILES[target]
    victim = model if model.is_file() else next(p for p in model.rglob("*.bin"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = verify(copy)
    assert bad["hashes"] == "fail" and bad["parity"]["status"] == "not-run"


@pytest.fixture(scope="module")
def tiny():
    return zoo.create("mobilenetv3_small_100")


def test_failed_lowering_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    target = TARGETS.get("onnx")

    def boom(*a, **k):
        (a[3] / "model.onnx").write_bytes(b"half")
        raise RuntimeError("aten::frobnicate is not supported")

    monkeypatch.setattr(target, "lower", boom)
    out = tmp_path / "art"
    with pytest.raises(EffaiError, match="operator aten.frobnicate is not supported"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_disk_full_is_reported_and_nothing_is_written(tiny, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_io, "write", full)
    out = tmp_path / "art"
    with pytest.raises(EffaiError, match="disk full"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=out))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_and_invalid_output_locations(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=f))
    with pytest.raises(UsageError, match="cannot create the output directory"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=f / "sub"))
    user_dir = tmp_path / "photos"
    user_dir.mkdir()
    (user_dir / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UsageError, match="refusing to replace"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=user_dir))
    assert (user_dir / "holiday.jpg").read_bytes() == b"precious"
    web_app = tmp_path / "webapp"                    # a manifest.json that is not effai's must not make it a target
    web_app.mkdir()
    (web_app / "manifest.json").write_text('{"name": "my pwa", "start_url": "/"}')
    with pytest.raises(UsageError, match="refusing to replace"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=web_app))
    assert json.loads((web_app / "manifest.json").read_text())["name"] == "my pwa"


def test_input_size_the_model_cannot_take_is_a_usage_error(tmp_path):
    loaded = zoo.create("deit_tiny_patch16_224")
    with pytest.raises(UsageError, match="cannot run on input"):
        export(loaded, ExportConfig(target="onnx", input_size=96, out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_read_only_filesystem_is_a_usage_error(tiny, tmp_path, monkeypatch):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(UsageError, match="permission denied"):
        export(tiny, ExportConfig(target="onnx", input_size=32, out=tmp_path / "a" / "b"))


def test_reexport_replaces_a_previous_artifact_atomically(tiny, tmp_path):
    out = tmp_path / "art"
    first = export(tiny, ExportConfig(target="onnx", input_size=32, out=out))
    second = export(tiny, ExportConfig(target="onnx", input_size=48, out=out, force=True))
    assert second.manifest["inputs"][0]["shape"] == [1, 3, 48, 48]
    assert first.out_dir == second.out_dir and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_parity_failure_keeps_the_artifact_marked_failed(tiny, tmp_path, monkeypatch):
    target = TARGETS.get("onnx")
    real_load = target.load

    def skewed(out_dir, lowered):
        p = real_load(out_dir, lowered)
        run = p.run
        p.run = lambda xs: [o + 0.05 * np.abs(o).max() for o in run(xs)]
        return p

    monkeypatch.setattr(target, "load", skewed)
    out = tmp_path / "art"
    with pytest.raises(ParityFailed) as e:
        export(tiny, ExportConfig(target="onnx", input_size=32, out=out))
    assert e.value.exit_code == 1
    m = manifest_io.read(out)
    assert m["parity"]["status"] == "fail" and "relative error" in m["parity"]["reason"]


def test_no_verify_and_no_fold_are_recorded(tiny, tmp_path):
    res = export(tiny, ExportConfig(target="onnx", input_size=32, out=tmp_path / "a", fold=False, verify=False))
    m = res.manifest
    assert m["parity"] == {**m["parity"], "status": "not-run", "reason": "disabled by --no-verify"}
    assert m["fold"]["skipped"] == "disabled by --no-fold"


def test_batch_and_input_shape_options(tiny, tmp_path):
    res = export(tiny, ExportConfig(target="tflite", batch=3, input_size=40, out=tmp_path / "b"))
    assert res.manifest["inputs"][0]["shape"] == [3, 3, 40, 40] and res.manifest["outputs"][0]["shape"] == [3, 1000]
    assert res.parity_status == "pass" and res.manifest["parity"]["samples"] % 3 == 0
    with pytest.raises(UsageError, match="channels"):
        export(tiny, ExportConfig(target="onnx", input_shape=(1, 4, 32, 32), out=tmp_path / "c"))
    with pytest.raises(UsageError, match="--quantize fp16 is not supported by onnx.*onnx takes: fp32"):
        export(tiny, ExportConfig(target="onnx", precision="fp16", out=tmp_path / "d"))


def test_untraceable_model_names_the_failing_line(tmp_path):
    f = tmp_path / "dyn.py"
    f.write_text("import torch\nINPUT_SHAPE = (3, 32, 32)\n"
                 "class Dyn(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                 "        self.c = torch.nn.Conv2d(3, 4, 3)\n    def forward(self, x):\n        y = self.c(x)\n"
                 "        if y.mean() > 0:\n            return y.mean((2, 3))\n        return -y.mean((2, 3))\n")
    loaded = zoo.create(model_def=f"{f}:Dyn")
    with pytest.raises(EffaiError) as e:
        export(loaded, ExportConfig(target="executorch", out=tmp_path / "out"))
    msg = str(e.value)
    assert "torch.export cannot trace" in msg and "dyn.py:9" in msg and "if y.mean() > 0" in msg
    assert "torch.where" in msg and not (tmp_path / "out").exists()


OPS_FILE = ("import torch\nINPUT_SHAPE = (3, 16, 16)\n"
            "class Erfinv(torch.nn.Module):\n    def forward(self, x):\n"
            "        return torch.special.erfinv(torch.tanh(x) * 0.5).mean((2, 3))\n"
            "class Fft(torch.nn.Module):\n    def forward(self, x):\n"
            "        return torch.fft.rfft2(x).abs().mean((2, 3))\n")


@pytest.mark.parametrize("cls,op,verdict", [
    ("Erfinv", "aten.erfinv", "no other installed target takes aten.erfinv either (probed: coreml, executorch, onnx)"),
    ("Fft", "aten._fft_r2c", "targets that take aten._fft_r2c (probed alone with its shapes here): executorch, onnx"),
])
def test_unsupported_operator_is_named_with_the_targets_that_take_it(tmp_path, cls, op, verdict):
    f = tmp_path / "ops.py"
    f.write_text(OPS_FILE)
    loaded = zoo.create(model_def=f"{f}:{cls}")
    with pytest.raises(EffaiError) as e:
        export(loaded, ExportConfig(target="tflite", out=tmp_path / "out"))
    msg = str(e.value)
    assert f"operator {op} is not supported" in msg and "ops.py" in msg and verdict in msg
    assert not (tmp_path / "out").exists()


TWO_OUTPUTS = '''
import torch
from torch import nn
INPUT_SHAPE = (3, 32, 32)

class TwoHeads(nn.Module):
    """Class scores and an embedding, as retrieval / multi-task apps ship."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls, self.emb = nn.Linear(8, 5), nn.Linear(8, 16)

    def forward(self, x):
        f = self.body(x)
        return self.cls(f), self.emb(f)
'''


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_models_with_several_outputs_export_with_named_outputs(target, tmp_path):
    f = tmp_path / "two.py"
    f.write_text(TWO_OUTPUTS)
    loaded = zoo.create(model_def=f"{f}:TwoHeads")
    res = export(loaded, ExportConfig(target=target, out=tmp_path / "art"))
    outs = res.manifest["outputs"]
    assert [tuple(o["shape"]) for o in outs] in ([(1, 5), (1, 16)], [(1, 16), (1, 5)])
    assert res.parity_status in (("not-run",) if target == "coreml" else ("pass",))
    if target in ("executorch", "coreml"):
        assert [o["name"] for o in outs] == ["output_0", "output_1"]
