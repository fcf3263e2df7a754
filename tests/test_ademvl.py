"""ADEM-VL (issue 16): fusion invariants, the VQA data, JSONL and LM errors, a 2-step train smoke, the shipped
default's held-out digit answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from effai.data import vqa
from effai.errors import UsageError
from effai.zoo import ademvl as zm

LM_DIR = zm.WEIGHTS_DIR / "ademvl_tiny_digits_lm"


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    trunk, channels, size, mean, std = zm.build_trunk("ghostnetv3_050.digits", "blocks.6")
    return trunk, channels, size, vqa.load_tokenizer(LM_DIR)


def _model(parts, mode="adem", drop_ratio=0.0, scales=(4, 2, 1)):
    trunk, channels, size, tok = parts
    return zm.AdemVL(trunk, zm.load_causal_lm(LM_DIR), tok, feature_dim=channels, scales=scales, mode=mode,
                     drop_ratio=drop_ratio, input_size=size).eval()


def test_zero_projector_leaves_lm_unchanged_and_fusion_is_parameter_free(parts):
    model = _model(parts, drop_ratio=0.25)
    plain = zm.load_causal_lm(LM_DIR).eval()
    ids = torch.tensor([parts[3](vqa.prompt(vqa.Q_DIGIT))["input_ids"]])
    pixels = torch.randn(2, *model.input_size)
    with torch.no_grad():
        ref = plain(input_ids=ids.expand(2, -1)).logits
        for p in model.projector.parameters():
            p.zero_()
        fused = model(pixels, ids.expand(2, -1))
        assert torch.allclose(fused, ref, atol=1e-6)          # V = 0 and e2 = 0: the fusion adds exactly nothing
        torch.nn.init.normal_(model.projector.fc2.weight)
        torch.nn.init.normal_(model.projector.fc2.bias)
        assert not torch.allclose(model(pixels, ids.expand(2, -1)), ref, atol=1e-3)   # and it is wired in
    # parameter-free: the fusion owns only the two offsets; no q/k/v (or any Linear) was added to the LM
    fusion = [n for n, _ in model.lm.named_parameters() if "ademvl_fusion" in n]
    assert sorted(n.rsplit(".", 1)[-1] for n in fusion) == ["emb_k", "emb_v"]
    added = {n for n, _ in model.lm.named_parameters()} - {n.replace(".mlp.", ".mlp.mlp.", 1) if ".mlp." in n else n
                                                          for n, _ in plain.named_parameters()}
    assert added == set(fusion)
    counts = zm.trainable_parameters(model)
    d = plain.config.hidden_size
    assert counts["fusion"] == 2 * model.num_visual * d == 2 * 21 * d
    assert counts["trainable"] == counts["projector"] + counts["fusion"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(("trunk.", "lm.model")))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9])
def test_drop_ratio_keeps_the_right_count(ratio):
    g = torch.Generator().manual_seed(0)
    h, v, e = torch.randn(2, 5, 16, generator=g), torch.randn(2, 40, 16, generator=g), torch.randn(1, 40, 16, generator=g)
    scores = zm.fusion_scores(h, v, e, ratio)
    kept = (scores != 0).sum(-1)
    assert bool((kept == 40 - int(ratio * 40)).all())
    full = zm.fusion_scores(h, v, e, 0.0)
    keep = scores != 0
    assert torch.equal(scores[keep], full[keep])                                # kept scores are untouched
    if ratio > 0:                                                               # and they are the highest ones
        lowest_kept = full.masked_fill(~keep, float("inf")).min(-1).values
        highest_dropped = full.masked_fill(keep, float("-inf")).max(-1).values
        assert bool((lowest_kept >= highest_dropped).all())


def test_prefix_baseline_and_image_size_error(parts):
    model = _model(parts, mode="prefix")
    assert zm.trainable_parameters(model)["fusion"] == 0
    ids = torch.tensor([parts[3](vqa.prompt(vqa.Q_DIGIT))["input_ids"]])
    out = model(torch.randn(1, *model.input_size), ids)
    assert out.shape[:2] == ids.shape                                    # visual positions cut off
    with pytest.raises(UsageError, match="does not match the vision encoder"):
        model.encode_image(torch.randn(1, 3, 32, 32))


def test_offline_vqa_set_and_split():
    data = vqa.build_offline(64, 1, crops_per_photo=2, seed=0)
    kinds = {k for _, _, _, k in data.items}
    assert kinds == {"digit", "parity", "photo", "quadrant"}
    assert data.images.shape[1:] == (1, 64, 64) and len(data.group) == 1797 + 24
    answers = {a for _, q, a, _ in data.items if q == vqa.Q_DIGIT}
    assert answers == set(vqa.DIGIT_WORDS)
    train, val = vqa.split(data, 0.2, seed=3)
    assert len(train.images) + len(val.images) == len(data.images)
    again, _ = vqa.split(data, 0.2, seed=3)
    assert torch.equal(train.images, again.images)
    assert not ({tuple(x.flatten()[:64].tolist()) for x in val.images[:50]}
                & {tuple(x.flatten()[:64].tolist()) for x in train.images[:0]})
    img = torch.zeros(64, 64).numpy()
    img[40:, 40:] = 200
    assert vqa.brightest_quadrant(img) == "bottom right"


def test_jsonl_loader_and_its_errors(tmp_path):
    from PIL import Image

    Image.fromarray((torch.rand(20, 20) * 255).byte().numpy()).save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", "question": "what is it?", "answer": "Noise"}) + "\n\n")
    data = vqa.load_jsonl(good, None, 64, 1)
    assert data.images.shape == (1, 1, 64, 64) and data.items[0][2] == "noise"
    cases = {"": "holds no rows", "{bad\n": ":1: not valid JSON",
             json.dumps({"image": "a.png", "question": "q"}): ":1: missing or empty answer",
             json.dumps({"image": "b.png", "question": "q", "answer": "x"}): "does not exist",
             json.dumps({"image": "../a.png", "question": "q", "answer": "x"}): "outside the image folder",
             "[1, 2]": "expected an object"}
    for i, (text, msg) in enumerate(cases.items()):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(text)
        with pytest.raises(UsageError, match=msg):
            vqa.load_jsonl(f, None, 64, 1)


def test_lm_loading_errors_and_no_hub(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        zm.load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UsageError, match="'bert' model; ADEM-VL takes a causal LM"):
        zm.load_causal_lm(tmp_path)
    with pytest.raises(UsageError, match="does not download"):
        zm.resolve_lm_dir("HuggingFaceTB/SmolLM2-135M")
    from effai.train.ademvl import AdemvlConfig

    with pytest.raises(UsageError, match="no network"):
        AdemvlConfig(pretrained=True)
    with pytest.raises(UsageError, match="unknown mode"):
        AdemvlConfig(mode="cross")


def test_two_step_train_smoke_and_reload(tmp_path):
    from effai.train.ademvl import AdemvlConfig, train_ademvl

    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for i in range(30):                                   # a small user set: 3 real digits per class, as PNG files
        Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).save(tmp_path / f"d{i}.png")
        rows.append(json.dumps({"image": f"d{i}.png", "question": vqa.Q_DIGIT, "answer": vqa.DIGIT_WORDS[d.target[i]]}))
    (tmp_path / "qa.jsonl").write_text("\n".join(rows) + "\n")
    cfg = AdemvlConfig(data=str(tmp_path / "qa.jsonl"), out=str(tmp_path / "run"), lm_steps=2, steps=2,
                       batch_size=4, eval_every=2)
    r = train_ademvl(cfg)
    assert Path(r["model_path"]).is_file() and (tmp_path / "run" / "lm" / "tokenizer.json").is_file()
    assert r["trainable_params"] == r["projector_params"] + r["fusion_params"] > 0
    assert 0.0 <= r["val_acc"] <= 1.0
    model = zm.load(tmp_path / "run")
    assert model.num_visual == 21
    from effai.generate.artifact import source_kind, vision_encoder   # `effai export <run>`: the generation export

    run = str(tmp_path / "run")
    assert source_kind(run) == "vlm" and vision_encoder(run) == "ghostnetv3_050.digits"
    with pytest.raises(UsageError, match="already holds a finished"):
        train_ademvl(cfg)
    (tmp_path / "run" / "model.safetensors").unlink()          # an interrupted run: the checkpoint resumes it
    with pytest.raises(UsageError, match="resume=true"):
        train_ademvl(cfg)
    import dataclasses

    again = train_ademvl(dataclasses.replace(cfg, resume=True))
    assert again["val_acc"] == r["val_acc"]
    assert torch.equal(zm.load(tmp_path / "run").projector.fc1.weight, model.projector.fc1.weight)


def test_shipped_default_answers_held_out_digits():
    from effai import zoo
    from effai.data.datasets import normalized

    loaded = zoo.create("ademvl_tiny.digits")
    model, card = loaded.model, loaded.card
    assert not loaded.random_init
    assert card.task == "visual-question-answering" and card.num_classes == 0
    visual = model.encode_image(torch.zeros(2, *card.input_size))          # the documented (B, Nv, D), Nv = 16+4+1
    assert visual.shape == (2, 21, model.lm.config.hidden_size) and model.num_visual == 21
    record = json.loads(__import__("safetensors").safe_open(
        str(zm.WEIGHTS_DIR / card.bundled_weights), framework="pt").metadata()["effai.train"])
    data = vqa.build_offline(64, 1, photos=False)
    _, val = vqa.split(data, record["config"]["val_fraction"], record["config"]["split_seed"])
    idx = [i for i, q, _, _ in val.items if q == vqa.Q_DIGIT][:200]
    truth = [a for i, q, a, _ in val.items if q == vqa.Q_DIGIT][:200]
    answers = model.answer(normalized(val.images[idx], card.mean, card.std), vqa.Q_DIGIT)
    acc = sum(a == t for a, t in zip(answers, truth)) / len(truth)
    assert acc >= 0.7, acc


def test_qwen2_class_takes_the_fusion_too(parts, tmp_path):
    import shutil

    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = parts[3]
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path))
    for f in LM_DIR.glob("tokenizer*"):
        shutil.copy(f, tmp_path)
    trunk, channels, size, _ = parts
    model = zm.AdemVL(trunk, zm.load_causal_lm(tmp_path), vqa.load_tokenizer(tmp_path), feature_dim=channels,
                      scales=(2, 1), input_size=size).eval()
    assert type(model.lm).__name__ == "Qwen2ForCausalLM" and model.num_visual == 5
    ids = torch.tensor([tok(vqa.prompt(vqa.Q_DIGIT))["input_ids"]])
    with torch.no_grad():
        model.set_visual(model.encode_image(torch.randn(1, *size)))
        fused = model.lm(input_ids=ids).logits
        model.set_visual(None)
        plain = model.lm(input_ids=ids).logits
    assert fused.shape == plain.shape and not torch.allclose(fused, plain)
