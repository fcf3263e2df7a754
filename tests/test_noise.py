"""Toolchain noise stays off the user's terminal (issue 20): what ExecuTorch/XNNPACK, LiteRT, coremltools and torch
print during export, verify, predict and bench goes to export.log or is dropped; and int8-dynamic on a CNN says how
many of its Conv/Linear layers it quantized (console, manifest, --json)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import run_cli

# What the toolchains print when left alone (seen on Linux, issue 20): Core ML's proxies, XNNPACK's cpuinfo and
# delegate lines, torch's pytree warning on torchao's enums (glog "W1205 ..."), coremltools' version checks.
NOISE = re.compile(r"_MLModelProxy|cpuinfo|threadpool|XNNPACK delegate|pytree|^[WIEF]\d{4} |has not been tested "
                   r"with coremltools|is not supported\. Minimum required", re.M)


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    """One export: the digits CNN to ONNX int8-dynamic (MatMul/Gemm only: its one Linear)."""
    out = tmp_path_factory.mktemp("noise") / "dyn"
    code, last, stdout, err = run_cli("export", "ghostnetv3_050.digits", "-t", "onnx", "-q", "int8-dynamic",
                                      "--eval", "none", "--out", str(out))
    return code, last, stdout, err, out


def test_int8_dynamic_on_a_cnn_says_how_many_layers_it_quantized(dynamic_onnx):
    code, last, stdout, err, out = dynamic_onnx
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    said = [w for w in manifest["warnings"] if w.startswith("int8-dynamic quantized")]
    assert len(said) == 1, manifest["warnings"]
    m = re.match(r"int8-dynamic quantized (\d+) of (\d+) Conv/Linear layers", said[0])
    assert m and 1 <= int(m.group(1)) < int(m.group(2)), said[0]     # the classifier's Linear, none of the convs
    assert "MatMul/Gemm only" in said[0] and "-q int8" in said[0]
    assert said[0] in " ".join(err.split()), err                                        # the console summary
    assert any(said[0] in a.get("warnings", []) for a in last["artifacts"]), last       # --json too


def test_export_predict_verify_bench_keep_toolchain_noise_off_stderr(dynamic_onnx, digits_exports, tmp_path):
    from PIL import Image
    from skimage import data

    code, _, _, err, out = dynamic_onnx
    assert code == 0 and not NOISE.search(err), err
    img = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(img)
    ets, tfl = digits_exports["executorch"].out_dir, digits_exports["tflite"].out_dir
    code, _, _, err = run_cli("predict", str(ets), str(img), "-k", "2")
    assert code == 0 and not NOISE.search(err), err
    code, _, _, err = run_cli("verify", str(tfl))
    assert code == 0 and not NOISE.search(err), err
    code, _, _, err = run_cli("bench", str(ets), str(tfl), "--runs", "2", "--warmup", "0",
                              "--cooldown", "0", "--idle", "0", "--energy", "none", "--out", str(tmp_path / "b.json"))
    assert code == 0 and not NOISE.search(err), err


def test_zoo_list_and_show_keep_toolchain_noise_off_stderr(tmp_path):
    """ademvl_tiny.digits builds through transformers, which imports torchao: torch's pytree warns on its enums
    (W1205 ... _pytree.py) when nothing hushes it. A cold stats cache makes `zoo list` build the card."""
    cold = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    code, last, stdout, err = run_cli("zoo", "list", "ademvl", env=cold)
    assert code == 0 and not NOISE.search(err), err
    assert [m["name"] for m in last["models"]] == ["ademvl_tiny.digits"] and last["models"][0]["params"] > 0
    assert (tmp_path / "cache" / "effai" / "card_stats.json").is_file()    # it really was built, not read
    code, last, stdout, err = run_cli("zoo", "show", "ademvl_tiny.digits", env=cold)
    assert code == 0 and not NOISE.search(err), err
    assert last["model"]["params_deploy_form"] > 0
