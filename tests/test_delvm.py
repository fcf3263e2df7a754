"""DeLVM (issue 17): the VQ tokenizer, visual sentences, the training recipe (tail modes, KD), the CLI's refusals;
the slow test exports a tiny run and generates in the ExecuTorch runtime with end-to-end token parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effai.data import visual_sentences as vs
from effai.errors import UsageError
from effai.zoo import vq as zvq
from tests.helpers import call_cli


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(images=60, tail_count=3, eval_images=3, vq_steps=20, steps=6, batch_size=4, codebook=16, code_dim=8,
            vq_hidden=8, lm_hidden=16, lm_layers=1, lm_heads=2, teacher_hidden=32, teacher_layers=1, teacher_steps=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    from effai.train.delvm import DelvmConfig, train_delvm

    out = tmp_path_factory.mktemp("delvm") / "run"
    res = train_delvm(DelvmConfig(out=str(out), kd=True, **TINY))
    return out, res


def test_vq_straight_through_and_ema(one_thread):
    torch.manual_seed(0)
    m = zvq.VQVAE(zvq.VQConfig(size=8, hidden=4, dim=3, codebook=8)).train()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    before = m.codebook.clone()
    x_hat, loss, idx = m(x)
    loss.backward()
    assert x_hat.shape == x.shape and idx.shape == (4, 4) and int(idx.max()) < 8
    assert m.encoder[0].weight.grad.abs().sum() > 0        # the decoder's gradient reached the encoder (STE)
    assert not torch.equal(before, m.codebook)              # EMA step moved the codebook
    m.eval()
    z_e = m.encoder(x)
    d = ((z_e.permute(0, 2, 3, 1).reshape(-1, 1, 3) - m.codebook[None]) ** 2).sum(-1)
    assert torch.equal(m.codes(z_e).flatten(), d.argmin(1))  # nearest code
    with pytest.raises(UsageError, match="8x8"):
        m.encode(torch.zeros(1, 1, 12, 12))
    with pytest.raises(UsageError, match="codebook"):
        m.lookup(torch.tensor([[8, 0, 0, 0]]))


def test_vq_save_load(tmp_path):
    m = zvq.VQVAE(zvq.VQConfig(size=8, hidden=4, dim=3, codebook=8)).eval()
    p = zvq.save(m, tmp_path / "vq.safetensors", {"note": 1})
    back = zvq.load(p)
    x = torch.rand(2, 1, 8, 8)
    assert back.config == m.config and torch.equal(back.encode(x), m.encode(x))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UsageError, match="not a safetensors"):
        zvq.load(tmp_path / "bad.safetensors")


def test_tasks_and_augmentation_commute():
    x = vs.source_images("eval", 4, 16, 0)
    assert x.shape == (4, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert np.allclose(vs.apply_task("invert", x)[1], 1 - x)
    assert set(np.unique(vs.apply_task("threshold", x)[1])) <= {0.0, 1.0}
    noisy, clean = vs.apply_task("denoise", x, 3)
    assert np.array_equal(clean, x) and 0.1 < np.std(noisy - x) < 0.3
    for task in ("invert", "edges", "threshold"):   # a dihedral transform of a pair is a valid pair of the task
        for k in range(8):
            a, b = vs.apply_task(task, vs.dihedral(x, k))
            assert np.allclose(b, vs.dihedral(vs.apply_task(task, x)[1], k), atol=1e-5), (task, k)
    with pytest.raises(UsageError, match="choose from"):
        vs.apply_task("colourise", x)


def test_sentence_layout_and_tail_share():
    t = np.arange(4)
    s = vs.sentence(t, t + 1, t + 2, t + 3)
    assert s[0] == vs.BOS and s.count(vs.SEP) == 3 and len(s) == 4 * 4 + 4 and min(s[1:5]) == vs.N_SPECIAL
    assert vs.sentence(t, t, t)[-1] == vs.SEP
    w = vs.task_weights("none", 0.01)
    assert abs(sum(w.values()) - 1) < 1e-9 and w["threshold"] == 0.01
    assert vs.task_weights("repeat", 0.01)["threshold"] == vs.task_weights("augment", 0.01)["invert"]
    with pytest.raises(UsageError, match="augment, repeat, none"):
        vs.task_weights("oversample", 0.01)


def test_config_refusals():
    from effai.train.delvm import DelvmConfig

    with pytest.raises(UsageError, match="over 5%"):
        DelvmConfig(images=100, tail_count=50)
    with pytest.raises(UsageError, match="augment, repeat, none"):
        DelvmConfig(tail_mode="x")
    assert DelvmConfig().tail_share <= 0.05


def test_training_run(run):
    out, res = run
    rec = json.loads((out / "train_record.json").read_text())
    assert (out / "vq.safetensors").is_file() and (out / "lm" / "tokenizer.json").is_file()
    assert set(res["eval"]) == set(vs.TASKS) and rec["teacher_eval"] is not None
    for r in res["eval"].values():
        assert np.isfinite(r["loss"]) and r["psnr"] > 0 and r["vq_psnr"] > 0
    from effai.train.delvm.loop import load_lm

    lm = load_lm(out / "lm", vs.N_SPECIAL + TINY["codebook"])
    assert lm.config.hidden_size == TINY["lm_hidden"]
    with pytest.raises(UsageError, match="vocabulary"):
        load_lm(out / "lm", 999)
    from effai.train.delvm import DelvmConfig, train_delvm

    with pytest.raises(UsageError, match="--force"):
        train_delvm(DelvmConfig(out=str(out), **TINY))


def test_kd_changes_the_gradient(one_thread):
    from effai.train.delvm import loop

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bank = vs.PairBank({t: rng.integers(0, 8, (5, 2, 4)) for t in vs.TASKS}, {}, {})
    losses = {}
    for kd in (False, True):
        lm = loop.new_lm(vs.N_SPECIAL + 8, 16, 1, 2, 0)
        teacher = loop.new_lm(vs.N_SPECIAL + 8, 16, 1, 2, 1) if kd else None
        losses[kd] = loop.train_lm(lm, vs.SentenceSampler(bank, "none", 0.05, 0), 1, 2, 1e-3, teacher=teacher)[0]
    assert losses[True] > losses[False]   # same batch and init: the KD term adds a positive KL


def _cli(capfd, fn, **kw):
    return call_cli(capfd, fn, **kw)[:2]


def test_cli_refusals(run, tmp_path, capfd):
    import shutil

    from effai.cli.delvm import export_cmd, generate_cmd

    code, j = _cli(capfd, generate_cmd, artifact=tmp_path, prompt_images="a.png,b.png", out=tmp_path / "o.png",
                   target="executorch", as_json=True)
    assert code == 2 and "takes 3 images" in j["error"]
    code, j = _cli(capfd, generate_cmd, artifact=tmp_path, prompt_images="a.png,b.png,c.png", out=tmp_path / "o.png",
                   target="executorch", as_json=True)
    assert code == 2 and "not a DeLVM artifact" in j["error"] and not (tmp_path / "o.png").exists()
    kw = dict(precision="fp32", targets="executorch", force=False, as_json=True)
    code, j = _cli(capfd, export_cmd, run=tmp_path, out=tmp_path / "art", **kw)
    assert code == 2 and "not a DeLVM run" in j["error"] and not (tmp_path / "art").exists()
    out, _ = run   # a codebook / LM vocabulary mismatch: this run's LM beside another tokenizer
    shutil.copytree(out / "lm", tmp_path / "mix" / "lm")
    zvq.save(zvq.VQVAE(zvq.VQConfig(size=16, hidden=4, dim=3, codebook=32)), tmp_path / "mix" / "vq.safetensors")
    code, j = _cli(capfd, export_cmd, run=tmp_path / "mix", out=tmp_path / "art", **kw)
    assert code == 2 and "does not match" in j["error"] and not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def artifact(run, tmp_path_factory):
    """The tiny run exported once (LM decoder + tokenizer nets in ExecuTorch): (path, delvm.json spec)."""
    from effai.cli.delvm import export_delvm

    out, _ = run
    path = tmp_path_factory.mktemp("delvm-art") / "art"
    return path, export_delvm(out, path, targets=("executorch",))


@pytest.mark.slow
def test_export_and_generate_parity(run, artifact):
    """The artifact's greedy tokens (ExecuTorch decoder, tokenizer nets in ExecuTorch) equal torch's on one prompt."""
    from effai.cli.delvm import DelvmArtifact
    from effai.train.delvm.loop import greedy_image, load_lm

    out, _ = run
    path, spec = artifact
    assert spec["lm_parity"]["identical"]
    art = DelvmArtifact(path)
    x = vs.source_images("eval", 2, 16, 0)
    a, b = vs.apply_task("invert", x)
    img, stats = art.generate(a[0], b[0], a[1])
    vq, lm = zvq.load(out / "vq.safetensors"), load_lm(out / "lm")
    enc = lambda im: vq.encode(zvq.to_pixels(torch.from_numpy(im)[None, None]))[0].numpy()   # noqa: E731
    prompt = torch.tensor([vs.sentence(enc(a[0]), enc(b[0]), enc(a[1]))])
    assert stats["codes"] == greedy_image(lm, prompt, vq.config.tokens)[0].tolist()
    ref = zvq.from_pixels(vq.decode(torch.tensor([stats["codes"]])))[0, 0].numpy()
    assert img.shape == (16, 16) and np.abs(img - ref).max() < 1e-4


def test_shipped_default_solves_invert_in_context(one_thread):
    """The shipped tiny DeLVM (effai/zoo/weights) generates the inverse of held-out query images far better than
    copying the query (the trivial in-context answer)."""
    from effai.cli.delvm import run_paths
    from effai.train.delvm.loop import encoder_fn, eval_sentences, greedy_image, load_lm

    vq_file, lm_dir = run_paths("delvm_tiny")
    vq = zvq.load(vq_file)
    lm = load_lm(lm_dir, vs.N_SPECIAL + vq.config.codebook)
    bank = vs.build_bank(vs.source_images("eval", 9, vq.config.size, 0), encoder_fn(vq), 2, 1, augment=False)
    rows, target = eval_sentences(bank, "invert")
    n = vq.config.tokens
    gen = zvq.from_pixels(vq.decode(greedy_image(lm, torch.from_numpy(rows[:, :-n]), n)))[:, 0]
    truth = torch.from_numpy(target)
    copy = torch.from_numpy(bank.images["invert"][1:len(rows) + 1, 0])
    assert float(zvq.psnr(gen, truth).mean()) > float(zvq.psnr(copy, truth).mean()) + 5


# --- the zoo card, and effai export / generate / bench / bundle pack on DeLVM ---------------------------------------

def test_zoo_card_builds_the_in_context_generator(one_thread):
    """zoo.create('delvm_tiny'): the shipped tokenizer (the card's bundled file) + LM; its forward is the greedy
    in-context generation of the training code's evaluation, decoded by the VQ decoder."""
    from effai import zoo
    from effai.cli.delvm import run_paths
    from effai.train.delvm.loop import greedy_image, load_lm

    loaded = zoo.create("delvm_tiny")
    assert loaded.card.task == "image-to-image-in-context" and not loaded.random_init and not loaded.notes
    model = loaded.model
    vq_file, lm_dir = run_paths("delvm_tiny")
    vq = zvq.load(vq_file)
    assert set(model.state_dict()) == set(vq.state_dict())      # the state dict is the tokenizer's (bundled file)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in vq.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in vq.parameters())   # + the LM
    x = vs.source_images("eval", 3, 16, 0)
    a, b = vs.apply_task("invert", x)
    px = lambda im: zvq.to_pixels(torch.from_numpy(im)[:, None])   # noqa: E731
    got = model(px(a[1:]), px(a[:1]), px(b[:1]))
    enc = lambda im: vq.encode(px(im)).numpy()   # noqa: E731
    prompts = torch.tensor([vs.sentence(enc(a[:1])[0], enc(b[:1])[0], q) for q in enc(a[1:])])
    ref = vq.decode(greedy_image(load_lm(lm_dir), prompts, vq.config.tokens))
    assert got.shape == (2, 1, 16, 16) and torch.allclose(got, ref, atol=1e-5)
    assert float(zvq.psnr(zvq.from_pixels(got)[:, 0], torch.from_numpy(b[1:])).mean()) > 12   # inverts in context
    with pytest.raises(UsageError, match="example_in and example_out"):
        model(px(a[1:]), px(a[:1]))


def test_export_and_pack_point_to_delvm_export(run, tmp_path, capfd):
    from effai.bundle.pack import pack
    from effai.cli.export import export_cmd

    for source in ("delvm_tiny", str(run[0])):     # the card and a run dir
        code, j = _cli(capfd, export_cmd, model=source, target="onnx", out=tmp_path / "x", as_json=True)
        assert code == 2 and f"effai delvm export {source} --out DIR" in j["error"] and "\n" not in j["error"]
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="image-to-image-in-context model: bundles hold .*effai delvm export delvm_tiny"):
        pack("delvm_tiny", ["onnx"], out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_generate_and_bench_route_by_artifact_kind(tmp_path, capfd):
    """--prompt-images only for a DeLVM artifact (a delvm.json of the schema), required there; bench refuses a mix."""
    from effai.cli.delvm import SCHEMA
    from effai.cli.generate import bench_dispatch, generate_cmd

    fake = tmp_path / "art"
    fake.mkdir()
    (fake / "delvm.json").write_text(json.dumps({"schema": SCHEMA}))
    text = tmp_path / "lm-art"
    text.mkdir()
    kw = dict(image=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None, as_json=True)
    code, j = _cli(capfd, generate_cmd, artifact=fake, prompt=None, prompt_images=None, out_image=None, **kw)
    assert code == 2 and "DeLVM artifact" in j["error"] and "--prompt-images a_in.png,a_out.png,b_in.png" in j["error"]
    code, j = _cli(capfd, generate_cmd, artifact=fake, prompt="hi", prompt_images="a,b,c", out_image=None, **kw)
    assert code == 2 and j["error"].startswith("--prompt: text-generation options")
    code, j = _cli(capfd, generate_cmd, artifact=fake, prompt=None, prompt_images="a.png,b.png",
                   out_image=tmp_path / "o.png", **kw)
    assert code == 2 and "takes 3 images" in j["error"] and not (tmp_path / "o.png").exists()
    code, j = _cli(capfd, generate_cmd, artifact=text, prompt=None, prompt_images="a,b,c", out_image=None, **kw)
    assert code == 2 and "--prompt-images is for DeLVM artifacts" in j["error"]
    code, j = _cli(capfd, generate_cmd, artifact=text, prompt=None, prompt_images=None, out_image=None, **kw)
    assert code == 2 and "missing --prompt" in j["error"]
    code, j = _cli(capfd, bench_dispatch, artifacts=[fake, text], runs=2, warmup=0, not_used={}, as_json=True)
    assert code == 2 and "is not a DeLVM artifact" in j["error"]
    code, j = _cli(capfd, bench_dispatch, artifacts=[fake], runs=2, warmup=0, not_used={"--device": True},
                   as_json=True)
    assert code == 2 and "--device" in j["error"]
    assert not bench_dispatch([text], 2, 0, {}, True)    # neither kind: the single-forward bench runs


@pytest.mark.slow
def test_effai_generate_and_bench_on_a_delvm_artifact(artifact, tmp_path, capfd):
    """`effai generate ART --prompt-images` writes the artifact's generation as a PNG; `effai bench ART` reports
    image tokens/s and ms per generated image (median, p90) and the size."""
    from PIL import Image

    from effai.cli.delvm import DelvmArtifact, write_png
    from effai.cli.generate import bench_dispatch, generate_cmd

    path, _ = artifact
    x = vs.source_images("eval", 2, 16, 0)
    a, b = vs.apply_task("invert", x)
    files = [tmp_path / n for n in ("a_in.png", "a_out.png", "b_in.png")]
    for f, im in zip(files, (a[0], b[0], a[1])):
        write_png(im, f)
    kw = dict(prompt=None, image=None, max_new_tokens=None, temperature=None, top_k=None, top_p=None, seed=None,
              as_json=True)
    code, j = _cli(capfd, generate_cmd, artifact=path, prompt_images=",".join(map(str, files)),
                   out_image=tmp_path / "b_out.png", **kw)
    assert code == 0 and j["image_tokens"] == 16 and j["image_tokens_per_s"] > 0
    art = DelvmArtifact(path)
    want, _ = art.generate(*(art.read_image(f) for f in files))
    got = np.asarray(Image.open(tmp_path / "b_out.png"), dtype=np.float32) / 255
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6
    code, j = _cli(capfd, bench_dispatch, artifacts=[path], runs=3, warmup=1, not_used={}, as_json=True)
    (r,) = j["delvm"]
    assert code == 0 and r["image_tokens"] == 16 and r["repeats"] == 3
    assert 0 < r["ms_per_image"]["median"] <= r["ms_per_image"]["p90"]
    assert r["image_tokens_per_s"]["p90"] <= r["image_tokens_per_s"]["median"]
    assert r["lm_ms_per_image"]["median"] < r["ms_per_image"]["median"] + 1e-9
    assert 0 < r["decoder_bytes"] < r["artifact_bytes"]
