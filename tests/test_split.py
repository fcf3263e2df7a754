"""Split inference (issue 19): exact head/tail cuts, the feature autoencoder, a trained autoencoder run and the ONNX
export of both halves with the composed pipeline checked in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effai import zoo
from effai.errors import UsageError
from effai.zoo.split import DeviceHalf, FeatureAE, ServerHalf, split_model
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def digits():
    loaded = zoo.create("ghostnetv3_050.digits")
    return loaded, split_model(loaded.model, loaded.card.input_size)


def test_every_split_point_composes_to_the_whole_model_exactly(digits):
    loaded, sm = digits
    assert sm.names == ["blocks.0", "blocks.2", "blocks.4", "blocks.6", "blocks.9"]
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = loaded.model(x)
        for p in sm.points:
            head, tail = sm.cut(p.name)
            f = head(x)
            assert tuple(f.shape[1:]) == p.shape
            assert torch.equal(tail(f), whole), p.name


def test_resnet18_splits_at_its_stages_exactly():
    model = zoo.create("resnet18").model
    sm = split_model(model, (3, 32, 32))
    assert sm.names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, 3, 32, 32)
    head, tail = sm.cut("layer2")
    with torch.no_grad():
        assert torch.equal(tail(head(x)), model(x))


def test_unknown_split_point_lists_the_valid_ones(digits):
    with pytest.raises(UsageError, match="blocks.0, blocks.2, blocks.4, blocks.6, blocks.9"):
        digits[1].cut("blocks.3")


def test_autoencoder_code_shapes_levels_bytes_and_straight_through_gradient():
    ae = FeatureAE(20, reduction=4, bits=4)
    assert ae.code_channels == 5 and ae.code_bytes(8, 8) == 5 * 8 * 8 * 4 // 8 == 160
    x = torch.randn(2, 20, 8, 8, requires_grad=True)
    ae.train()
    code = ae.encode(x)
    assert code.shape == (2, 5, 8, 8)
    assert torch.equal(code, code.round()) and code.min() >= 0 and code.max() <= 15
    ae(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0      # rounding does not stop the gradient (STE)
    ae.eval()
    with pytest.raises(UsageError, match="channels"):
        ae.decode(torch.zeros(1, 6, 8, 8))
    with pytest.raises(UsageError, match="bits=9"):
        FeatureAE(20, 4, 9)
    dev, srv = DeviceHalf(torch.nn.Identity(), ae).eval(), ServerHalf(torch.nn.Identity(), ae).eval()
    with torch.no_grad():
        assert torch.equal(srv(dev(x)), ae(x))


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    from effai.train.split_ae import SplitAEConfig, train_split_ae

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("split_ae")
    rep = train_split_ae(SplitAEConfig(out=str(out), points=("blocks.6",), rates=((8, 2),), epochs=1,
                                       finetune_epochs=1))
    return out, rep


def test_trained_autoencoder_keeps_accuracy_at_a_fraction_of_the_bytes(ae_run):
    _out, rep = ae_run
    row = rep["rows"][0]
    assert row["point"] == "blocks.6" and row["code_shape"] == [7, 4, 4] and row["code_bytes"] == 28
    assert row["feature_bytes_fp32"] / row["code_bytes"] == 128
    assert row["val_top1"] > 0.9 and rep["val_top1_model"] > 0.95    # 359 held-out digits, 10 classes


def test_onnx_split_export_composes_in_onnxruntime(ae_run, tmp_path):
    from effai.collab.export import export_split

    out = tmp_path / "split"
    rec = export_split("ghostnetv3_050.digits", "blocks.6", ["onnx"], out, ae_run[0], eval_data=False)
    e = rec["targets"]["onnx"]
    assert e["device"]["parity"] == "pass" and e["server"]["parity"] == "pass"
    assert e["device"]["output_shape"] == [1, 7, 4, 4] and e["server"]["input_shape"] == [1, 7, 4, 4]
    c = e["composed"]
    assert c["status"] == "pass" and c["code_integer"] and c["vs_torch_split"]["cosine"] > 0.999
    saved = json.loads((out / "split.json").read_text())
    assert saved["bytes_per_image"] == 28 and saved["autoencoder"]["bits"] == 2
    for half in ("device", "server"):
        assert (out / "onnx" / half / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temp dir left


def test_cli_unknown_split_point_is_a_usage_error():
    rc, last, _out, _err = run_cli("split", "ghostnetv3_050.digits", "--at", "layer9", "--json")
    assert rc == 2 and "choose one of: blocks.0, blocks.2" in last["error"]
