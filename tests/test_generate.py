"""effai's generation path on a tiny random Llama (1 layer, hidden 64): the static-KV-cache decoder lowered to
ExecuTorch XNNPACK gives the same greedy tokens as torch, sampling is seeded and runtime-independent, and the CLI
refuses bad input with one line and exit 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.helpers import call_cli, run_cli

pytest.importorskip("executorch")
pytest.importorskip("transformers")

MAX_LEN = 64     # effai export's default cache length (effai.generate.artifact.DEFAULT_MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from effai.generate.tiny import write_tiny_lm

    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=1)


@pytest.fixture(scope="module")
def fp32_export(lm_dir, tmp_path_factory):
    """(artifact dir, the JSON summary) of `effai export LM_DIR --target executorch` run in process (the route to the
    generation export that generate-export shares; its default cache, MAX_LEN)."""
    import torch

    from effai.cli.export import export_cmd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("art") / "tiny-fp32"
    try:
        summary = export_cmd(model=str(lm_dir), target="executorch", out=out, as_json=True)
        yield out, summary
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32_artifact(fp32_export):
    return fp32_export[0]


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
    code, last, _, _ = run_cli("generate", str(fp32_artifact), "--prompt", " ".join(["cat"] * 70), "--json")
    assert code == 2 and f"cache holds {MAX_LEN}" in last["error"]

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


def test_export_routes_generative_models_and_refuses_the_rest(fp32_export, tmp_path, monkeypatch, capfd):
    from effai.cli.export import export_cmd
    from effai.cli.generate import generate_export_cmd
    from effai.generate.artifact import DEFAULT_MAX_SEQ_LEN, read

    out, summary = fp32_export          # effai export LM_DIR --target executorch: generate-export's JSON shape
    m = read(out).manifest
    assert MAX_LEN == DEFAULT_MAX_SEQ_LEN == m["max_seq_len"]
    assert set(summary) == {"ok", "artifact", "kind", "precision", "parity", "decoder_bytes", "programs"}
    assert summary["ok"] and summary["kind"] == "lm" and summary["precision"] == "fp32"
    assert summary["parity"] == m["parity"] and summary["parity"]["identical"]
    assert summary["programs"] == {"decoder": "decoder.pte", "vision": None}
    assert summary["decoder_bytes"] == (out / "decoder.pte").stat().st_size

    # every refusal below comes before the model is loaded (each call returns in well under a second)
    code, last, _ = call_cli(capfd, export_cmd, model="ademvl_tiny.digits", target="onnx", as_json=True)
    assert code == 2 and "runs only in ExecuTorch, pass --target executorch (not onnx)" in last["error"]
    assert "ghostnetv3_050.digits exports to onnx, tflite, coreml" in last["error"]
    code, last, _ = call_cli(capfd, export_cmd, model="ademvl_tiny.digits", target="executorch", batch=2,
                             as_json=True)
    assert code == 2 and last["error"].startswith("--batch: single-forward options")
    code, last, _ = call_cli(capfd, export_cmd, model="ademvl_tiny.digits", target="executorch", precision="int8",
                             as_json=True)
    assert code == 2 and "choose from: fp32, int8-weight, int4-weight" in last["error"]
    monkeypatch.chdir(tmp_path)         # the default --out: effai_out/<model>-executorch[-<precision>]
    (tmp_path / "effai_out" / "ademvl_tiny.digits-executorch-int8-weight").mkdir(parents=True)
    code, last, _ = call_cli(capfd, export_cmd, model="ademvl_tiny.digits", target="executorch",
                             precision="int8-weight", as_json=True)
    assert code == 2 and "effai_out/ademvl_tiny.digits-executorch-int8-weight exists; pass --force" in last["error"]
    code, last, _ = call_cli(capfd, generate_export_cmd, source="vit_pico", out=tmp_path / "x", as_json=True)
    assert code == 2 and "not a generative model (task image-classification)" in last["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effai_out"]


def test_bench_reports_ttft_prefill_decode_size_and_memory(fp32_artifact, tmp_path, capfd):
    from effai.cli.bench import bench_cmd
    from effai.generate.artifact import read

    code, last, _ = call_cli(capfd, bench_cmd, artifacts=[fp32_artifact], runs=3, warmup=1, as_json=True)
    assert code == 0 and last["ok"] and "ru_maxrss" in last["memory_method"]
    (r,) = last["generation"]
    m = read(fp32_artifact).manifest
    assert r["kind"] == "lm" and r["vision_ms"] is None and r["repeats"] == 3 and r["new_tokens"] == 16
    assert r["ttft_ms"]["median"] >= r["prefill_ms"]["median"] > 0       # TTFT = prefill + the first pick, per run
    for k in ("ttft_ms", "prefill_ms", "decode_ms_per_token"):
        assert r[k]["p90"] >= r[k]["median"] > 0
    assert r["decode_tok_s"]["median"] == pytest.approx(1e3 / r["decode_ms_per_token"]["median"], rel=1e-2)
    assert r["decode_tok_s"]["p90"] <= r["decode_tok_s"]["median"]    # the slow tail
    assert r["decoder_bytes"] == m["decoder"]["bytes"] and r["artifact_bytes"] == sum(f["bytes"] for f in m["files"])
    assert r["peak_rss_bytes"] > r["rss_rise_bytes"] >= 0 and r["peak_rss_bytes"] > 50e6   # torch alone is larger

    code, last, out = call_cli(capfd, bench_cmd, artifacts=[fp32_artifact], runs=1, warmup=0)
    assert code == 0 and "time to first token (ms)" in out and "decode (tokens/s)" in out and "peak memory" in out
    code2, last, _ = call_cli(capfd, bench_cmd, artifacts=[fp32_artifact, tmp_path], as_json=True)
    assert code2 == 2 and "is not a generation artifact" in last["error"]
    code2, last, _ = call_cli(capfd, bench_cmd, artifacts=[fp32_artifact], device="adb:x", as_json=True)
    assert code2 == 2 and last["error"].startswith("--device: not available for generation artifacts")


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

    from effai.cli.export import export_cmd
    from effai.generate.artifact import read
    from effai.generate.bench import bench_generation
    from effai.generate.loop import generate
    from effai.generate.sampling import Sampling
    from effai.zoo import create
    from effai.zoo.ademvl import greedy

    loaded = create("ademvl_tiny.digits")
    summary = export_cmd(model="ademvl_tiny.digits", target="executorch", out=tmp_path / "vlm", as_json=True)
    assert summary["kind"] == "vlm" and summary["programs"] == {"decoder": "decoder.pte", "vision": "vision.pte"}
    art = read(tmp_path / "vlm")
    m = art.manifest
    assert m["kind"] == "vlm" and m["parity"]["identical"] and m["image"]["parity_max_abs"] < 1e-4
    pixels = torch.zeros(1, *loaded.model.input_size)
    visual = loaded.model.encode_image(pixels)
    ids = art.tokenizer().encode("question: which digit is this? answer:").ids
    got = generate(art.decoder(), ids, Sampling(max_new_tokens=4), art.max_seq_len, art.manifest["eos_token_id"],
                   visual).tokens
    ref = greedy(loaded.model, visual, torch.tensor([ids]), 4)[0]   # ADEM-VL's own eager loop (HF DynamicCache)
    eos = art.manifest["eos_token_id"]
    assert (got[:got.index(eos)] if eos in got else got) == ref
    r = bench_generation(tmp_path / "vlm", repeats=2, warmup=0)    # TTFT includes the vision program, per run
    assert r["ttft_ms"]["median"] >= r["vision_ms"]["median"] > 0
    assert r["vision_bytes"] == (tmp_path / "vlm" / "vision.pte").stat().st_size
