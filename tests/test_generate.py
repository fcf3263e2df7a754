"""effai's generation path on a tiny random Llama (1 layer, hidden 64): the static-KV-cache decoder lowered to
ExecuTorch XNNPACK gives the same greedy tokens as torch, sampling is seeded and runtime-independent, and the CLI
refuses bad input with one line and exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import run_cli

pytest.importorskip("executorch")
pytest.importorskip("transformers")

MAX_LEN = 32


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from effai.generate.tiny import write_tiny_lm

    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=1)


@pytest.fixture(scope="module")
def fp32_artifact(lm_dir, tmp_path_factory):
    import torch

    from effai.generate.artifact import export_artifact

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("art") / "tiny-fp32"
    export_artifact(lm_dir, out, "fp32", MAX_LEN, parity_tokens=8)
    return out


def _torch_decoder(lm_dir):
    from effai.export.kv_decoder import static_cache_module
    from effai.generate.artifact import load_lm
    from effai.generate.decoders import TorchDecoder

    return TorchDecoder(static_cache_module(load_lm(lm_dir)[0], MAX_LEN))


def test_fp32_greedy_tokens_match_torch(fp32_artifact, lm_dir):
    from effai.generate.artifact import read
    from effai.generate.loop import generate
    from effai.generate.sampling import Sampling

    art = read(fp32_artifact)
    assert art.manifest["parity"]["identical"] and len(art.manifest["parity"]["runtime_tokens"]) == 8
    ids = art.tokenizer().encode("the photo of a cat : which digit is this ?").ids
    greedy = Sampling(max_new_tokens=8)
    ref = generate(_torch_decoder(lm_dir), ids, greedy, MAX_LEN, None).tokens
    got = generate(art.decoder(), ids, greedy, MAX_LEN, None).tokens
    assert got == ref and len(got) == 8
    # seeded sampling draws the same tokens from both runtimes (their logits agree), and differs from greedy
    s = Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=3, max_new_tokens=8)
    sampled = generate(art.decoder(), ids, s, MAX_LEN, None).tokens
    assert sampled == generate(_torch_decoder(lm_dir), ids, s, MAX_LEN, None).tokens
    assert sampled != ref


def test_pick_greedy_top_k_top_p():
    from effai.generate.sampling import Sampling, pick

    z = np.array([0.0, 3.0, 1.0, 2.9])
    assert pick(z, Sampling(), np.random.default_rng(0)) == 1
    draws = {pick(z, Sampling(temperature=1.0, top_k=2, seed=0), np.random.default_rng(i)) for i in range(50)}
    assert draws == {1, 3}
    # p = softmax(z) = (.02, .47, .06, .43): top_p 0.4 keeps the best token alone, 0.5 needs the two best
    assert {pick(z, Sampling(temperature=1.0, top_p=0.4), np.random.default_rng(i)) for i in range(20)} == {1}
    assert {pick(z, Sampling(temperature=1.0, top_p=0.5), np.random.default_rng(i)) for i in range(50)} == {1, 3}


def test_cli_generates_and_refuses_bad_input(fp32_artifact, lm_dir, tmp_path):
    from effai.generate.artifact import read

    code, last, _, _ = run_cli("generate", str(fp32_artifact), "--prompt", "which digit is this ?",
                               "--max-new-tokens", "6", "--json")
    parity = read(fp32_artifact).manifest["parity"]["runtime_tokens"]   # greedy, no eos stop
    assert code == 0 and last["ok"] and last["tokens"] == parity[:len(last["tokens"])]
    assert len(last["tokens"]) == 6 or last["stopped"] == "eos"
    assert last["decode_tok_s"] > 0

    code, last, _, err = run_cli("generate", str(fp32_artifact), "--prompt", "x", "--image", str(tmp_path / "no.png"))
    assert code == 2 and "image not found" in last["error"]
    code, last, _, _ = run_cli("generate", str(fp32_artifact), "--prompt", " ".join(["cat"] * 40), "--json")
    assert code == 2 and "cache holds 32" in last["error"]

    odd = tmp_path / "odd"
    shutil.copytree(fp32_artifact, odd)
    m = json.loads((odd / "manifest.json").read_text())
    (odd / "manifest.json").write_text(json.dumps({**m, "kind": "speech"}))
    code, last, _, _ = run_cli("generate", str(odd), "--prompt", "x", "--json")
    assert code == 2 and "unknown artifact kind 'speech'" in last["error"] and "lm, vlm" in last["error"]

    from effai.errors import UsageError
    from effai.generate.artifact import read as read_artifact   # the same checks, in process (a CLI call costs ~10 s)

    (odd / "manifest.json").write_text(json.dumps(m))
    (odd / "decoder.pte").write_bytes(b"tampered")
    with pytest.raises(UsageError, match="decoder.pte"):
        read_artifact(odd)
    (odd / "manifest.json").write_text(json.dumps({"schema": "effai.manifest/1", "target": "onnx"}))
    with pytest.raises(UsageError, match="single-forward model artifact"):
        read_artifact(odd)


@pytest.mark.slow
def test_int8_weight_decoder_runs_and_is_smaller(fp32_artifact, lm_dir, tmp_path):
    from effai.generate.artifact import export_artifact

    m = export_artifact(lm_dir, tmp_path / "int8", "int8-weight", MAX_LEN, parity_tokens=8)
    assert m["decoder"]["quantization"]["layers_quantized"] >= 7
    assert len(m["parity"]["runtime_tokens"]) == 8 and m["parity"]["token_agreement"] >= 0.5
    fp32 = json.loads((fp32_artifact / "manifest.json").read_text())["decoder"]["bytes"]
    assert m["decoder"]["bytes"] < fp32


@pytest.mark.slow
def test_ademvl_artifact_vision_and_fused_decoder_match_torch(tmp_path):
    import torch

    from effai.generate.artifact import export_vlm_artifact, read
    from effai.generate.loop import generate
    from effai.generate.sampling import Sampling
    from effai.zoo import create
    from effai.zoo.ademvl import greedy

    loaded = create("ademvl_tiny.digits")
    m = export_vlm_artifact(loaded.model, loaded.card, tmp_path / "vlm", "fp32", 48)
    assert m["kind"] == "vlm" and m["parity"]["identical"] and m["image"]["parity_max_abs"] < 1e-4
    art = read(tmp_path / "vlm")
    pixels = torch.zeros(1, *loaded.model.input_size)
    visual = loaded.model.encode_image(pixels)
    ids = art.tokenizer().encode("question: which digit is this? answer:").ids
    got = generate(art.decoder(), ids, Sampling(max_new_tokens=4), 48, art.manifest["eos_token_id"], visual).tokens
    ref = greedy(loaded.model, visual, torch.tensor([ids]), 4)[0]   # ADEM-VL's own eager loop (HF DynamicCache)
    eos = art.manifest["eos_token_id"]
    assert (got[:got.index(eos)] if eos in got else got) == ref
