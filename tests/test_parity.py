"""Parity metrics and the inputs they are computed on."""

import numpy as np
import pytest

from effai.export.parity import TOLERANCES, compare, run_batched
from effai.data.photos import PHOTOS, normalize, parity_inputs, photo, resize_crop
from effai.zoo.card import ModelCard

REF = [np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32) * 5]


def test_identical_outputs_pass_with_zero_error():
    r = compare(REF, [REF[0].copy()], TOLERANCES["fp32"])
    assert r["status"] == "pass" and r["max_abs_err"] == 0 and r["top1_agreement"] == 1.0
    assert r["cosine"] == pytest.approx(1.0)


def test_reordering_noise_passes_and_real_errors_fail():
    scale = np.abs(REF[0]).max()
    small = REF[0] + np.float32(1e-6 * scale)
    assert compare(REF, [small], TOLERANCES["fp32"])["status"] == "pass"
    wrong = REF[0].copy()
    wrong[0, 0] += 0.01 * scale
    r = compare(REF, [wrong], TOLERANCES["fp32"])
    assert r["status"] == "fail" and "relative error" in r["reason"]
    assert compare(REF, [wrong], TOLERANCES["fp16"])["status"] == "pass"


def test_nan_shape_and_count_mismatches_fail():
    nan = REF[0].copy()
    nan[1, 1] = np.nan
    assert compare(REF, [nan], TOLERANCES["fp32"])["status"] == "fail"
    assert "shape" in compare(REF, [REF[0][:, :5]], TOLERANCES["fp32"])["reason"]
    assert "outputs" in compare(REF, [REF[0], REF[0]], TOLERANCES["fp32"])["reason"]


def test_top1_agreement_counts_flips():
    flipped = REF[0].copy()
    flipped[0] = -flipped[0]
    assert compare(REF, [flipped], TOLERANCES["fp32"])["top1_agreement"] == pytest.approx(5 / 6)


def test_run_batched_feeds_fixed_batches():
    seen = []

    def run(inputs):
        seen.append(inputs[0].shape[0])
        return [inputs[0].sum(axis=(1, 2, 3))[:, None]]

    x = np.ones((6, 1, 2, 2), np.float32)
    out = run_batched(run, x, 2)
    assert seen == [2, 2, 2] and out[0].shape == (6, 1)


def test_parity_inputs_are_real_preprocessed_photos_and_deterministic():
    pre = ModelCard(name="m", family="f", source="timm:m", input_size=(3, 64, 48)).preprocessing()
    x, photos, names = parity_inputs(pre, 3, 2, seed=1)
    x2, _, _ = parity_inputs(pre, 3, 2, seed=1)
    assert x.shape == (5, 3, 64, 48) and photos.shape == (3, 64, 48, 3) and np.array_equal(x, x2)
    assert names[:3] == [f"photo:{p}" for p in PHOTOS[:3]] and names[3].startswith("gaussian")
    assert np.allclose(x[:3], normalize(photos, pre["mean"], pre["std"], 3))
    assert -3 < x[:3].min() < -1 and 1 < x[:3].max() < 3      # ImageNet-normalized pixels, not noise


def test_resize_crop_keeps_aspect_then_centre_crops():
    img = photo("coffee")          # 400 x 600
    out = resize_crop(img, (100, 100), crop_pct=0.5, interpolation="bilinear")
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    grey = parity_inputs(ModelCard(name="g", family="f", source="timm:g", input_size=(1, 32, 32),
                                   mean=(0.5,), std=(0.5,)).preprocessing(), 2, 0)[0]
    assert grey.shape == (2, 1, 32, 32)
