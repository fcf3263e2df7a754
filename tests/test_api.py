"""The public Python API as docs/api.md shows it: export an in-memory nn.Module, load the artifact in its runtime
and predict, verify, bench, list models; bad input is a UsageError naming the fix."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import effai
from effai.errors import UsageError
from tests.helpers import run_cli


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def module_artifact(tmp_path_factory):
    net = _tiny()
    out = tmp_path_factory.mktemp("api") / "tiny-onnx"
    result = effai.export(net, "onnx", example_inputs=torch.randn(1, 3, 32, 32), out=out, name="tiny",
                          labels=["cat", "dog", "bird", "fish"])
    return net, result


def test_import_effai_is_light_and_lists_its_api():
    code = "import sys, effai; assert 'torch' not in sys.modules, 'torch imported'; print(sorted(effai.__all__))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("export", "verify", "bench", "list_models", "load_artifact", "ExportResult", "__version__"):
        assert name in proc.stdout


def test_export_an_in_memory_module_and_run_it_in_its_runtime(module_artifact, tmp_path):
    net, result = module_artifact
    assert result.status == "pass" and result.model_file.is_file() and result.parity["status"] == "pass"
    assert result.manifest["model"]["name"] == "tiny" and result.manifest["labels"] == ["cat", "dog", "bird", "fish"]
    art = effai.load_artifact(result.out_dir)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(art.run(x)[0] - ref).max() < 1e-4
    from skimage import data

    top = art.predict([data.astronaut(), data.coffee()], top_k=2)
    assert len(top) == 2 and all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    assert {lab for t in top for lab, _ in t} <= {"cat", "dog", "bird", "fish"}
    with pytest.raises(UsageError, match="does not match the artifact's"):
        art.run(np.zeros((2, 3, 32, 32), np.float32))
    assert effai.verify(result.out_dir)["hashes"] == "pass"
    recs = effai.bench(result.out_dir, threads=(1,), runs=5, warmup=1, energy="none", out=tmp_path / "b.json")
    assert len(recs) == 1 and recs[0]["status"] == "ok" and len(recs[0]["samples_ms"]) == 5


@pytest.mark.parametrize("target", ["executorch", "tflite", "onnx"])
def test_load_artifact_runs_every_host_runtime_as_exported(small_exports, target):
    from effai.export.verify import parity_samples

    res = small_exports[target]
    art = effai.load_artifact(res.out_dir)
    x, refs = parity_samples(res.out_dir, res.manifest)
    out = art.run(x[:1])[0]
    assert np.abs(out - refs[0][:1]).max() < 1e-3 * max(1.0, float(np.abs(refs[0]).max()))


def test_predict_command_on_an_artifact(module_artifact, tmp_path):
    from PIL import Image
    from skimage import data

    img = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(img)
    code, last, _, err = run_cli("predict", str(module_artifact[1].out_dir), str(img), "--top-k", "3", "--json")
    assert code == 0, err
    assert last["target"] == "onnx" and len(last["predictions"][0]["top"]) == 3
    code, last, _, _ = run_cli("predict", str(module_artifact[1].out_dir), str(tmp_path / "nope.png"))
    assert code == 2 and "image not found" in last["error"]


def test_list_models_filters_the_zoo_and_timm():
    assert effai.list_models("ghostnetv3_050*", zoo_only=True) == ["ghostnetv3_050", "ghostnetv3_050.digits"]
    assert effai.list_models("ghostnetv3*", pretrained=True, zoo_only=True) == ["ghostnetv3_050.digits"]
    names = effai.list_models("resnet1*")
    assert "resnet18" in names and all(n.startswith("resnet1") for n in names)


def test_bad_api_input_is_a_usage_error_naming_the_fix():
    with pytest.raises(UsageError, match="needs example_inputs"):
        effai.export(_tiny(), "onnx")
    with pytest.raises(UsageError, match="cannot run on input"):
        effai.export(_tiny(), "onnx", input_shape=(1, 5, 32, 32))
    with pytest.raises(UsageError, match="4 labels|labels for 4"):
        effai.export(_tiny(), "onnx", input_shape=(1, 3, 32, 32), labels=["a"])
    with pytest.raises(UsageError, match="not supported by onnx"):
        effai.export(_tiny(), "onnx", input_shape=(1, 3, 32, 32), quantize="palette4")
    with pytest.raises(UsageError, match="takes an nn.Module"):
        effai.export(42, "onnx")
