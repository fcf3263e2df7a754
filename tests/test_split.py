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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """1 thread: on a loaded 2-core host, 2 torch threads made these tiny forwards 80x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    out = tmp_path_factory.mktemp("split_ae")
    rep = train_split_ae(SplitAEConfig(out=str(out), points=("blocks.6", "blocks.9"), rates=((8, 2),), epochs=2,
                                       finetune_epochs=1, train_limit=480))
    return out, rep


def test_trained_autoencoder_keeps_accuracy_at_a_fraction_of_the_bytes(ae_run):
    _out, rep = ae_run
    row = next(r for r in rep["rows"] if r["point"] == "blocks.6")
    assert row["point"] == "blocks.6" and row["code_shape"] == [7, 4, 4] and row["code_bytes"] == 28
    assert row["feature_bytes_fp32"] / row["code_bytes"] == 128
    assert row["val_top1"] > 0.8 and rep["val_top1_model"] > 0.95    # 359 held-out digits, 10 classes; chance 0.1


@pytest.fixture(scope="module")
def onnx_split(ae_run, tmp_path_factory):
    from effai.collab.export import export_split

    out = tmp_path_factory.mktemp("split") / "split"
    return out, export_split("ghostnetv3_050.digits", "blocks.6", ["onnx"], out, ae_run[0], eval_data=False)


def test_onnx_split_export_composes_in_onnxruntime(onnx_split):
    out, rec = onnx_split
    e = rec["targets"]["onnx"]
    assert e["device"]["parity"] == "pass" and e["server"]["parity"] == "pass"
    assert e["device"]["output_shape"] == [1, 7, 4, 4] and e["server"]["input_shape"] == [1, 7, 4, 4]
    c = e["composed"]
    assert c["status"] == "pass" and c["code_integer"] and c["vs_torch_split"]["cosine"] > 0.999
    saved = json.loads((out / "split.json").read_text())
    assert saved["bytes_per_image"] == 28 and saved["autoencoder"]["bits"] == 2
    for half in ("device", "server"):
        assert (out / "onnx" / half / "manifest.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]    # no temp dir left


def test_live_split_over_the_authenticated_channel(onnx_split):
    import threading

    from effai.collab.live import pack, run, serve, unpack
    from effai.errors import EffaiError

    levels = np.random.default_rng(0).integers(0, 4, (1, 7, 4, 4)).astype(np.float32)
    assert len(pack(levels, 2)) == 28 and np.array_equal(unpack(pack(levels, 2), 2, (1, 7, 4, 4)), levels)
    out, _rec = onnx_split
    token, served, ready = "t" * 32, {}, threading.Event()
    port = {}

    def server():
        served.update(serve(out, "onnx", "127.0.0.1", 0, token, 20.0,
                            on_ready=lambda p: (port.setdefault("p", p), ready.set())))

    th = threading.Thread(target=server, daemon=True)
    th.start()
    assert ready.wait(20)
    with pytest.raises(UsageError, match="refused this device's token"):
        run(out, "onnx", "127.0.0.1", port["p"], "u" * 32, n=2, wait_s=5.0)
    res = run(out, "onnx", "127.0.0.1", port["p"], token, n=8, wait_s=20.0)
    th.join(20)
    assert res["bytes_per_request"] == 1 + len("blocks.6") + 28 and res["top1"] >= 0.75 and served["served"] == 8
    from tests.helpers import refused_port

    with refused_port() as closed, pytest.raises(EffaiError, match="cannot reach the server"):
        run(out, "onnx", "127.0.0.1", closed, token, n=1, wait_s=0.5)


def test_cli_unknown_split_point_is_a_usage_error():
    rc, last, _out, _err = run_cli("split", "ghostnetv3_050.digits", "--at", "layer9", "--json",
                                    env={"OMP_NUM_THREADS": "1"})
    assert rc == 2 and "choose one of: blocks.0, blocks.2" in last["error"]


@pytest.fixture(scope="module")
def onnx_split9(ae_run, tmp_path_factory):
    from effai.collab.export import export_split

    out = tmp_path_factory.mktemp("split9") / "split"
    export_split("ghostnetv3_050.digits", "blocks.9", ["onnx"], out, ae_run[0], eval_data=False)
    return out


def _serve_in_thread(dirs, token):
    import threading

    res, ready, port = {}, threading.Event(), {}

    def server():
        from effai.collab.live import serve

        try:
            res.update(serve(dirs, "onnx", "127.0.0.1", 0, token, 20.0,
                             on_ready=lambda p: (port.setdefault("p", p), ready.set())))
        except Exception as e:     # noqa: BLE001 - handed to the test
            res["error"] = e
            ready.set()

    th = threading.Thread(target=server, daemon=True)
    th.start()
    assert ready.wait(30)
    return th, res, port["p"]


def test_live_run_driven_by_a_saved_policy_over_several_hosted_splits(onnx_split, onnx_split9, tmp_path):
    """The server hosts blocks.6 and blocks.9; the device's policy picks per request; every frame names its split
    and the server runs that split's half; the choices are the policy's on the logged observations."""
    from effai.collab.live import PolicyChooser, run
    from effai.collab.policy import train_policy

    out6, _rec = onnx_split
    prof = {"options": ["blocks.6", "blocks.9", "local"], "device_ms": [0.6, 1.3, 1.5], "server_ms": [0.6, 0.1, 0.0],
            "bytes": [28, 60, 0], "top1": [0.97, 0.98, 0.99]}
    pol = tmp_path / "policy.safetensors"
    train_policy(prof, pol, devices=2, steps=128, seed=0)
    token = "t" * 32
    th, served, port = _serve_in_thread([out6, onnx_split9], token)
    res = run([out6, onnx_split9], "onnx", "127.0.0.1", port, token, n=8, wait_s=20.0, policy=pol)
    th.join(20)
    assert "error" not in served, served
    picks = [c["split"] for c in res["choices"]]
    assert len(picks) == 8 and set(picks) <= {"blocks.6", "blocks.9"}        # local masked: no --local given
    assert served["served"] == 8 and served["served_per_split"] == {p: picks.count(p) for p in ("blocks.6", "blocks.9")}
    chooser = PolicyChooser(pol, {"blocks.6", "blocks.9"})
    for c in res["choices"]:
        assert chooser.choose(np.array(c["obs"], np.float32))[0] == c["split"]
    assert res["top1"] >= 0.75 and 0.01 <= min(c["power_w"] for c in res["choices"])


def test_a_frame_naming_a_split_the_server_does_not_host_is_a_clean_error(onnx_split):
    from effai.collab.live import ERR_FRAME, pack, request_frame
    from effai.devit_runtime.channel import connect
    from effai.errors import EffaiError

    token = "t" * 32
    th, served, port = _serve_in_thread([onnx_split[0]], token)
    store = connect("127.0.0.1", port, token, 10.0)
    try:
        assert list(json.loads(store.get("meta"))["splits"]) == ["blocks.6"]
        store.set("req/0", request_frame("blocks.9", pack(np.zeros((1, 60, 2, 2), np.float32), 2)))
        store.wait(["resp/0"])
        resp = store.get("resp/0")
    finally:
        store.close()
    th.join(20)
    assert resp[:1] == ERR_FRAME and b"asked for split blocks.9, but this server hosts blocks.6" in resp
    assert isinstance(served["error"], EffaiError) and "\n" not in str(served["error"])


def test_int8_device_half_is_quantized_and_its_top1_drop_is_measured_and_gated(ae_run, tmp_path):
    from effai.collab.export import _gate_drop, export_split

    out = tmp_path / "split_int8"
    rec = export_split("ghostnetv3_050.digits", "blocks.6", ["onnx"], out, ae_run[0], device_precision="int8",
                       max_drop=5.0)
    e = rec["targets"]["onnx"]
    dev_manifest = json.loads((out / "onnx" / "device" / "manifest.json").read_text())
    assert e["device"]["precision"] == "int8" and e["server"]["precision"] == "fp32"
    assert dev_manifest["precision"] == "int8" and dev_manifest["quantization"]["nodes_quantized"] > 0
    ev = e["composed"]["eval"]
    assert ev["samples"] == 359 and ev["drop_points"] == pytest.approx(100 * (ev["top1_torch_split_fp32"] - ev["top1"]),
                                                                        abs=1e-3)
    assert e["composed"]["status"] == ("pass" if ev["drop_points"] <= 5.0 else "fail"), json.dumps(e)
    assert e["composed"]["gate"] == "held-out top-1 drop" and "cosine" in e["composed"]["vs_torch_split"]
    assert rec["calibration"].startswith("128 of")                    # training images, not the held-out ones
    composed = {"status": "pass", "eval": {"top1": 0.90}}
    _gate_drop(composed, {"device_precision": "int8", "eval_top1_torch_split": 0.95}, 1.0)
    assert composed["status"] == "fail" and "5.00 top-1 points" in composed["reason"]
    with pytest.raises(UsageError, match="target onnx has fp32, int8, int8-dynamic"):
        export_split("ghostnetv3_050.digits", "blocks.6", ["onnx"], tmp_path / "x", ae_run[0], device_precision="fp16")
