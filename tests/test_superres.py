"""SRDiff / SAM-DiffSR: SPE invariants, SR data and mask errors, a 2-step training run that resumes, the DDIM
sampler's determinism, tiling seams, ONNX parity of the exported step, the PSNR gate of a quantized export,
`effai bench` of an SR artifact, the srdiff_x2 zoo card, and `effai sr` usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from effai.data import sr as data
from effai.errors import UsageError
from effai.superres import engine, sampler, tiles
from effai.zoo import srdiff
from tests.helpers import run_cli

TINY = dict(scale=2, input_size=8, enc_channels=8, enc_blocks=1, growth=4, unet_channels=8, timesteps=20)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Two real photo crops (scikit-image) as PNGs, and a mask folder with one label map each."""
    root = tmp_path_factory.mktemp("srdata")
    imgs, masks = root / "imgs", root / "masks"
    imgs.mkdir()
    masks.mkdir()
    for name in ("astronaut", "rocket"):
        img = data.photo(name)[:64, :64]
        Image.fromarray(img).save(imgs / f"{name}.png")
        Image.fromarray(data.builtin_labels(img, "slic").astype(np.uint8)).save(masks / f"{name}.png")
    return imgs, masks


@pytest.fixture(scope="module")
def run(tmp_path_factory, photo_dir):
    """A 2-iteration SAM-DiffSR run on the user folder (masks from the folder), resumed to 3."""
    from effai.train.sr import SrConfig, train_sr

    imgs, masks = photo_dir
    out = tmp_path_factory.mktemp("run") / "sr"
    cfg = dict(method="sam-diffsr", data=str(imgs), masks=str(masks), out=str(out), batch_size=2, eval_every=1,
               threads=1, **TINY)
    first = train_sr(SrConfig(iterations=2, **cfg))
    (out / "model.safetensors").unlink()      # as if killed after the checkpoint, before the final write
    second = train_sr(SrConfig(iterations=3, resume=True, **cfg))
    return out, first, second


# ------------------------------------------------------------------------------------------------------------- SPE

def test_zero_modulation_is_srdiff_exactly():
    torch.manual_seed(0)
    spec = srdiff.SRDiffSpec(scale=2, lr_size=8, enc_channels=8, enc_blocks=1, growth=4, unet_channels=8)
    model = srdiff.build(spec)
    hr, lr = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    up, noise, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([5, 90])
    enc = torch.from_numpy(srdiff.encode_masks(np.arange(256).reshape(16, 16) // 64))[None, None].repeat(2, 1, 1, 1)
    base = model.loss(hr, lr, up, t, noise)
    assert torch.equal(model.loss(hr, lr, up, t, noise, enc, strength=0.0), base)
    assert torch.equal(model.loss(hr, lr, up, t, noise, torch.zeros_like(enc)), base)
    assert not torch.equal(model.loss(hr, lr, up, t, noise, enc * 50), base)


def test_spe_region_codes_and_noise_mean_shift():
    labels = np.zeros((8, 8), int)
    labels[:, 4:] = 1
    labels[0, 0] = -1                            # a pixel in no region
    e = srdiff.encode_masks(labels)
    p = srdiff.position_map(8, 8)
    for r in (0, 1):
        sel = labels == r
        assert np.allclose(e[sel], p[sel].sum() / 64)      # e_R = (1/hw) sum_{p in R} P(p), constant on R
    assert e[0, 0] == 0
    spec = srdiff.SRDiffSpec()
    coef = torch.tensor(srdiff.spe_coefficient(spec), dtype=torch.float32)
    t = torch.tensor([spec.timesteps - 1])
    zero = torch.zeros(1, 3, 8, 8)
    shifted = srdiff.modulated_noise(zero, torch.from_numpy(e)[None, None], t, coef)
    assert torch.allclose(shifted[0, 1], coef[t] * torch.from_numpy(e))   # noise mean moves by c_t * e_R per region


# ------------------------------------------------------------------------------------------------------------ data

def test_image_conversions_and_refusals(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(gray)
    assert data.load_rgb(gray).shape == (8, 8, 3)
    deep = tmp_path / "d.png"
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)).save(deep)
    assert data.load_rgb(deep).dtype == np.uint8
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert data.load_rgb(tmp_path / "opaque.png").shape == (8, 8, 3)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba).save(tmp_path / "t.png")
    with pytest.raises(UsageError, match="transparent"):
        data.load_rgb(tmp_path / "t.png")
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(UsageError, match="not an image"):
        data.load_rgb(tmp_path / "x.png")


def test_mask_size_and_count_mismatch(tmp_path):
    np.savez(tmp_path / "a.npz", masks=np.ones((2, 5, 5), bool))
    with pytest.raises(UsageError, match="must match their image's size"):
        data.read_mask(tmp_path / "a.npz", (6, 6))
    assert data.read_mask(tmp_path / "a.npz", (5, 5)).max() == 1
    with pytest.raises(UsageError, match="1 masks for 2 images"):
        data.mask_files(tmp_path, ["a", "b"])


# ----------------------------------------------------------------------------------------------------- training

def test_training_resumes_and_writes_a_loadable_model(run):
    out, first, second = run
    assert [r["iteration"] for r in second["history"]] == [1, 2, 3]
    assert second["history"][:2] == first["history"]            # resumed, not retrained
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    model, meta = srdiff.load(out)
    assert meta["srdiff"]["lr_size"] == 8 and meta["train"]["method"] == "sam-diffsr"
    from effai import zoo                   # the whole card rides along: the zoo rebuilds the run as srdiff_x2
    card = zoo.card_from_checkpoint(out / "model.safetensors")
    assert card.task == "image-super-resolution" and card.input_size == (3, 8, 8)
    assert card.extra["arch_kwargs"]["unet_channels"] == TINY["unet_channels"]
    loaded = zoo.create(weights=out / "model.safetensors")
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    assert loaded.model(lr).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------------------------------ sampler

def test_sampler_is_deterministic_and_seeded(run):
    out = run[0]
    model = engine.torch_model(out)
    lr = data.photo("chelsea")[100:112, 200:214]            # 14x12: larger than the 8-px tile, not a multiple of it
    a = engine.upscale(model, lr, 2, steps=4, seed=3)
    assert a.shape == (24, 28, 3)
    assert np.array_equal(a, engine.upscale(model, lr, 2, steps=4, seed=3))
    assert not np.array_equal(a, engine.upscale(model, lr, 2, steps=4, seed=4))
    assert sampler.timesteps(20, 4) == [19, 13, 6, 0]
    with pytest.raises(UsageError, match="--scale 4"):
        engine.upscale(model, lr, 4)


def test_tiles_cover_and_blend_like_one_pass():
    """A pointwise step makes each pixel independent of its tile: blending tiles must then give the untiled result
    exactly (up to float rounding), whatever the overlap; tiles cover every pixel."""
    assert tiles.starts(20, 8, 2) == [0, 6, 12]
    assert tiles.starts(8, 8, 2) == [0]

    def model(lr_size):
        def step(x, t, cond):
            return np.tanh(x * 0.5 + 0.01 * t)
        return engine.SRModel(lambda lr: lr, step, {"scale": 2, "lr_size": lr_size}, np.linspace(0.99, 0.01, 10),
                              "pointwise")

    lr = data.photo("coffee")[:20, :26]
    whole = engine.upscale(model(32), lr, 2, steps=5, seed=1)
    for ov in (0, 2, 5):
        tiled = engine.upscale(model(8), lr, 2, steps=5, seed=1, overlap=ov)
        assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def onnx_art(run, tmp_path_factory):
    from effai.superres.export import export_sr

    out = tmp_path_factory.mktemp("art") / "onnx"
    return out, export_sr(run[0], "onnx", out)


def test_onnx_step_and_encoder_parity(onnx_art):
    out, rep = onnx_art
    assert rep["parts"]["step"]["parity"]["status"] == "pass"
    assert rep["parts"]["encoder"]["parity"]["status"] == "pass"
    assert rep["sampler_parity"]["max_pixel_diff"] <= 1
    assert "psnr_gate" not in rep                       # fp32: the sampler parity is the check
    art = engine.load(out)
    assert art.runtime.startswith("onnx")


def test_quantized_export_runs_the_psnr_gate(run, tmp_path):
    from effai.superres.export import export_sr

    with pytest.raises(UsageError, match="three inputs.*--target executorch or onnx"):   # static int8 on tflite
        export_sr(run[0], "tflite", tmp_path / "q8", "int8")
    from effai.cli.sr import _export

    with pytest.raises(UsageError, match="no target given takes it"):        # several targets, none takes int8
        _export(run[0], "tflite,coreml", "int8", tmp_path / "q8", False, True)
    with pytest.raises(UsageError, match="max-psnr-drop"):
        export_sr(run[0], "onnx", tmp_path / "q8", "int8-dynamic", max_psnr_drop=-1)
    assert not (tmp_path / "q8").exists()
    rep = export_sr(run[0], "onnx", tmp_path / "q", "int8", max_psnr_drop=100.0)     # static: 3-input calibration
    assert rep["parts"]["step"]["details"]["quantization"]["nodes_quantized"] > 0
    g = rep["psnr_gate"]
    assert g["status"] == "pass" and g["crops"] == 4 and g["reference"] == "torch"
    assert g["drop_db"] == pytest.approx(g["reference_psnr_db"] - g["artifact_psnr_db"], abs=1e-3)
    assert g["fidelity_psnr_db"] > 0 and g["min_fidelity_db"] is None
    assert json.loads((tmp_path / "q" / engine.SR_JSON).read_text())["psnr_gate"] == g


def test_static_int8_calibration_follows_the_sampler_on_training_photos(run):
    from effai.superres import quant

    model, _ = srdiff.load(run[0])
    lrs, samples = quant.calibration(model, crops_per_photo=1, steps=2)
    assert lrs.shape == (len(data.TRAIN_PHOTOS), 3, 8, 8) and len(samples) == 2 * len(data.TRAIN_PHOTOS)
    assert [float(t[0]) for _, t, _ in samples[:2]] == [float(t) for t in sampler.timesteps(20, 2)]
    assert samples[0][0].shape == (1, 3, 16, 16) and samples[0][2].shape[0] == 1


def test_psnr_gate_fails_a_degraded_denoiser():
    """The shipped srdiff_x2 vs the same model with its step zeroed (as a broken quantization would): the gate
    fails it, and passes the model against itself with a zero drop."""
    from effai.superres.gate import psnr_gate

    ref = engine.load("srdiff_x2")
    broken = engine.SRModel(ref.encode, lambda x, t, c: np.zeros_like(x), ref.spec, ref.abar, "broken")
    bad = psnr_gate(ref, broken, 0.5, steps=2)
    assert bad["status"] == "fail" and bad["drop_db"] > 0.5 and "PSNR fell" in bad["reason"]
    assert bad["fidelity_psnr_db"] < 30
    far = psnr_gate(ref, broken, 100.0, steps=2, min_fidelity_db=40.0)      # quality allowed, fidelity not
    assert far["status"] == "fail" and "from the fp32 model's" in far["reason"]
    same = psnr_gate(ref, ref, 0.0, steps=2, min_fidelity_db=40.0)
    assert same["status"] == "pass" and same["drop_db"] == 0 and same["fidelity_psnr_db"] is None   # identical


def test_bench_an_sr_artifact(onnx_art, capfd):
    from effai.cli.bench import bench_cmd
    from tests.helpers import call_cli

    out, _ = onnx_art
    code, last, stdout = call_cli(capfd, bench_cmd, artifacts=[out], runs=2, warmup=0, sr_size="20x12", sr_steps=2,
                                  as_json=True)
    assert code == 0, last
    r = last["sr"][0]
    assert r["kind"] == "sr" and r["target"] == "onnx" and r["steps"] == 2 and r["hr_size"] == [40, 24]
    assert r["tiles"] == 4 * 2 and r["repeats"] == 2                 # 20x12 LR, tile 8, overlap 4: stride 4
    assert 0 < r["ms_per_step"]["median"] < r["ms_per_image"]["median"] and r["hr_megapixels_per_s"] > 0
    code, last, _ = call_cli(capfd, bench_cmd, artifacts=[out], threads="2", as_json=True)
    assert code == 2 and "--threads" in last["error"]
    code, last, _ = call_cli(capfd, bench_cmd, artifacts=[out], sr_size="0x5", as_json=True)
    assert code == 2 and "--sr-size" in last["error"]
    code, last, _ = call_cli(capfd, bench_cmd, artifacts=[out.parent], sr_steps=4, as_json=True)
    assert code == 2 and "SR artifacts (effai sr export) only" in last["error"]


def test_zoo_card_srdiff_x2(tmp_path):
    from effai import zoo

    card = zoo.CARDS.get("srdiff_x2")
    assert card.task == "image-super-resolution" and card.num_classes == 0
    loaded = zoo.create("srdiff_x2")
    assert not loaded.random_init
    lr_u8 = data.photo("chelsea")[100:116, 200:216]
    lr = torch.from_numpy(data.to_unit(lr_u8).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        hr = loaded.model(lr)
        again = loaded.model(lr)
    assert hr.shape == (1, 3, 32, 32) and torch.equal(hr, again) and float(hr.abs().max()) <= 1
    from effai.superres.gate import psnr             # = `effai sr` on a one-tile image up to torch vs PIL bicubic

    sr = engine.upscale(engine.load("srdiff_x2"), lr_u8, 2)
    assert psnr(data.from_unit(hr[0].numpy().transpose(1, 2, 0)), sr) > 40
    with pytest.raises(UsageError, match="one 16x16 LR tile"):
        loaded.model(lr[..., :8, :8])
    from effai.bundle.pack import pack

    with pytest.raises(UsageError, match="effai sr export srdiff_x2"):    # bundles hold classifiers
        pack("srdiff_x2", ["onnx"], out=tmp_path)
    assert not any(tmp_path.iterdir())
    ref, _ = srdiff.load("srdiff_x2")                                # the same tensors as `effai sr srdiff_x2`
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), loaded.model.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------- CLI

def test_cli_errors(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    rc, last, _, err = run_cli("sr", str(run[0]), str(bad), "-o", str(tmp_path / "o.png"), "--json")
    assert rc == 2 and "not an image" in last["error"]
    good = tmp_path / "in.png"
    Image.fromarray(data.photo("chelsea")[:8, :8]).save(good)
    from effai.cli.sr import _upscale

    with pytest.raises(UsageError, match="choose from: 2"):      # in-process: one subprocess fewer
        _upscale(run[0], good, 4, tmp_path / "o.png", 4, 0, 4, False, True)
    assert not (tmp_path / "o.png").exists()
    rc, last, _, _ = run_cli("sr", str(run[0]), str(good), "-o", str(tmp_path / "o.png"), "--steps", "2", "--json")
    assert rc == 0 and last["size"] == [16, 16]
    assert Image.open(tmp_path / "o.png").size == (16, 16)
