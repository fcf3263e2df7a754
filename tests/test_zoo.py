"""Model sources: zoo cards, any timm name, user module files, and safe checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from effai import zoo
from effai.errors import EffaiError, UsageError

ZOO = [n for n in zoo.CARDS.names() if zoo.CARDS.get(n).task == "image-classification"]   # VQA cards: test_ademvl


@pytest.mark.parametrize("name", ZOO)
def test_every_card_builds_and_matches_its_card(name):
    card = zoo.CARDS.get(name)
    loaded = zoo.create(name)
    assert loaded.random_init == (card.bundled_weights is None)
    assert any("RANDOM-INIT" in n for n in loaded.notes) == loaded.random_init
    x = torch.randn(1, *card.input_size)
    with torch.no_grad():
        y = loaded.model(x)
    assert y.shape == (1, card.num_classes)
    assert len(zoo.labels(card)) == card.num_classes
    pre = card.preprocessing()
    assert pre["input_size"] == list(card.input_size[1:]) and len(pre["mean"]) == card.input_size[0]


def test_zoo_is_seeded_with_ghostnetv3_and_compact_peers():
    for name in ("ghostnetv3_050", "ghostnetv3_100", "ghostnetv3_130", "mobilenetv2_100", "mobilenetv3_large_100",
                 "efficientnet_b0", "deit_tiny_patch16_224", "mobileone_s0", "repvgg_a0"):
        assert name in zoo.CARDS
    assert zoo.labels(zoo.CARDS.get("ghostnetv3_100"))[1].startswith("goldfish")


def test_embedded_default_ships_trained_weights_with_their_record():
    loaded = zoo.create("ghostnetv3_050.digits")
    card = loaded.card
    assert not loaded.random_init and len(loaded.weights.sha256) == 64
    assert zoo.labels(card) == [str(i) for i in range(10)] and card.input_size == (1, 64, 64)
    record = card.extra["train_record"]
    assert record["val_acc"] >= 0.97 and record["folded"] and card.extra["eval_data"] == "digits"
    assert card.extra["split"] == {"data": "digits", "seed": 0, "val_fraction": 0.2}


@pytest.mark.parametrize("deploy", [False, True])
def test_timm_ghostnetv3_checkpoints_load_into_effais_ghostnetv3(tmp_path, deploy):
    import timm

    ref = timm.create_model("ghostnetv3_050").eval()
    if deploy:
        from timm.utils.model import reparameterize_model

        ref = reparameterize_model(ref)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    loaded = zoo.create("ghostnetv3_050", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), ref(x), atol=1e-5)


def test_any_timm_model_name_gets_a_card_from_timm():
    card = zoo.resolve_card("resnet10t")
    assert card.source == "timm:resnet10t" and card.num_classes == 1000 and card.input_size[0] == 3


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'ghostnetv3_100'"):
        zoo.create("ghostnetv3-100")


def test_model_def_loads_a_users_module_with_its_hints(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch\nINPUT_SHAPE = (1, 32, 32)\nLABELS = ['a', 'b']\n"
                 "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                 "        self.c = torch.nn.Conv2d(1, 2, 3)\n    def forward(self, x):\n"
                 "        return self.c(x).mean((2, 3))\n")
    loaded = zoo.create(model_def=f"{f}:Net")
    assert loaded.card.input_size == (1, 32, 32) and zoo.labels(loaded.card) == ["a", "b"]
    with pytest.raises(UsageError, match="has no callable 'Nope'; it defines: Net"):
        zoo.create(model_def=f"{f}:Nope")
    with pytest.raises(UsageError, match="not found"):
        zoo.create(model_def=f"{tmp_path / 'missing.py'}:Net")
    with pytest.raises(UsageError, match="must look like"):
        zoo.create(model_def=str(f))


def test_model_def_that_returns_no_module_is_refused(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def make():\n    return 3\n")
    with pytest.raises(UsageError, match="returned int, not a torch.nn.Module"):
        zoo.create(model_def=f"{f}:make")


@pytest.fixture(scope="module")
def small_model_sd():
    return zoo.create("mobilenetv3_small_100").model.state_dict()


def test_weights_roundtrip_safetensors_and_wrapped_torch_checkpoints(tmp_path, small_model_sd):
    sd = {k: v.clone() for k, v in small_model_sd.items()}
    sd["conv_stem.weight"].fill_(0.5)
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "w.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, pt)
    for path in (st, pt):
        loaded = zoo.create("mobilenetv3_small_100", weights=path)
        assert not loaded.random_init and loaded.weights.sha256 != "random-init" and len(loaded.weights.sha256) == 64
        assert torch.equal(loaded.model.conv_stem.weight, sd["conv_stem.weight"])


def test_checkpoint_with_other_class_count_rebuilds_the_head_and_reads_labels(tmp_path, small_model_sd):
    sd = dict(small_model_sd)
    sd["classifier.weight"] = torch.randn(3, sd["classifier.weight"].shape[1])
    sd["classifier.bias"] = torch.zeros(3)
    path = tmp_path / "ft.safetensors"
    save_file(sd, str(path), metadata={"labels": '["cat", "dog", "bird"]'})
    loaded = zoo.create("mobilenetv3_small_100", weights=path)
    assert loaded.card.num_classes == 3 and zoo.labels(loaded.card) == ["cat", "dog", "bird"]
    assert loaded.model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, small_model_sd):
    sd = dict(small_model_sd)
    sd.pop("conv_stem.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["bn1.weight"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UsageError) as e:
        zoo.create("mobilenetv3_small_100", weights=path)
    msg = str(e.value)
    assert "1 missing keys (conv_stem.weight)" in msg and "1 unexpected keys (extra.weight)" in msg
    assert "bn1.weight (7,) vs (16,)" in msg


def test_truncated_and_corrupt_files_are_refused(tmp_path, small_model_sd):
    st = tmp_path / "w.safetensors"
    save_file(dict(small_model_sd), str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        zoo.create("mobilenetv3_small_100", weights=st)
    pt = tmp_path / "w.pt"
    torch.save(dict(small_model_sd), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        zoo.create("mobilenetv3_small_100", weights=pt)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(__import__("numpy").random.default_rng(0).bytes(300))   # seeded garbage: no flaky test
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        zoo.create("mobilenetv3_small_100", weights=junk)
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not a checkpoint")
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        zoo.create("mobilenetv3_small_100", weights=text)


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payloads_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload(marker)}, path)
    with pytest.raises(UsageError, match="refusing to unpickle"):
        zoo.create("mobilenetv3_small_100", weights=path)
    assert not marker.exists()


def test_missing_weights_path_and_conflicting_sources(tmp_path):
    with pytest.raises(UsageError, match="weights file not found"):
        zoo.create("mobilenetv3_small_100", weights=tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match="pass one of them"):
        zoo.create("mobilenetv3_small_100", weights=tmp_path / "x.pt", pretrained=True)
    with pytest.raises(UsageError, match="exactly one"):
        zoo.create()


def test_pretrained_offline_is_a_clear_error_not_a_hang(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens: "no network"
    before = constants.HF_HUB_OFFLINE
    t0 = time.perf_counter()
    with pytest.raises(EffaiError, match="could not fetch pretrained weights for mobilenetv3_small_100.*--weights PATH"):
        zoo.create("mobilenetv3_small_100", pretrained=True)
    assert time.perf_counter() - t0 < 15
    assert constants.HF_HUB_OFFLINE == before  # restored


@pytest.mark.parametrize("arch,fragment", [
    ({"header_dims": [2 ** 31]}, "header_dims=2147483648 is out of range"),          # would exhaust memory
    ({"backbone_kwargs": {"channels": [10 ** 9]}}, "out of range"),
    ({"parts": 2}, "cannot be built with options ['parts']"),                         # not this architecture's
])
def test_crafted_checkpoint_cards_are_refused_before_building(tmp_path, arch, fragment):
    import json

    card = {"name": "x", "source": "timm:resnet10t", "input_size": [1, 32, 32], "mean": [0.5], "std": [0.5],
            "num_classes": 10, "arch_kwargs": arch}
    path = tmp_path / "crafted.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"effai.card": json.dumps(card)})
    with pytest.raises(UsageError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        zoo.create(weights=path)


def test_model_card_round_trips_through_its_checkpoint_dict():
    """ModelCard.to_dict() is what every trainer writes as `effai.card`; from_dict() reads it back unchanged."""
    import json

    from effai.zoo.card import ModelCard
    from effai.zoo.catalog import CARDS

    for name in CARDS.names():
        card = CARDS.get(name).with_(extra={"arch_kwargs": {"deploy": True}})
        d = card.to_dict()
        assert json.loads(json.dumps(d)) == d                       # JSON-ready
        back = ModelCard.from_dict(d)
        assert back.to_dict() == d and back.input_size == card.input_size and back.mean == card.mean
        assert back.task == card.task
    assert {CARDS.get(n).task for n in CARDS.names()} == {"image-classification", "visual-question-answering",
                                                          "image-to-image-in-context", "image-super-resolution"}
    old = {k: v for k, v in CARDS.get("vit_pico").to_dict().items() if k != "task"}   # written before the field
    assert ModelCard.from_dict(old).task == "image-classification"
    with pytest.raises(ValueError, match="task 'speech' is not one of"):
        ModelCard.from_dict({**old, "task": "speech"})


def test_pack_refuses_a_generative_card_before_loading_it(tmp_path):
    from effai.bundle.pack import pack

    with pytest.raises(UsageError, match="visual-question-answering model: bundles hold image-classification"
                                         ".*effai generate-export ademvl_tiny.digits"):
        pack("ademvl_tiny.digits", ["onnx"], out=tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------- card stats (zoo list / zoo show) and cache


@pytest.fixture
def stats_cache(tmp_path, monkeypatch):
    """effai.export.stats with its user cache in tmp_path and nothing remembered from other tests."""
    from effai.export import stats

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stats.clear_memo()
    yield stats
    stats.clear_memo()


# mixer_pico, ghostnetv3_050.digits (its branch folds), mobilenetv3_small_100 (timm): built and counted on meta;
# delvm_tiny: its forward reads values (codebook bounds), counted on real tensors
@pytest.mark.parametrize("name", ["mixer_pico", "ghostnetv3_050.digits", "delvm_tiny", "mobilenetv3_small_100"])
def test_card_stats_on_meta_equal_the_count_on_real_tensors(stats_cache, name):
    card = zoo.CARDS.get(name)
    real = stats_cache.model_stats(zoo.build(card), tuple(card.input_size), meta=False)
    assert stats_cache.card_stats(name) == real and real["params"] > 0 and real["macs"] > 0
    if name != "delvm_tiny":          # the fast path really ran: build, folds and count without data
        with torch.device("meta"):
            model = zoo.build(card)
            assert stats_cache.model_stats(model, tuple(card.input_size), inplace=True) == real


def test_card_stats_cache_is_read_back_and_keyed_by_code(stats_cache, monkeypatch):
    import json

    first = stats_cache.card_stats("mixer_pico")
    path = stats_cache.cache_path()
    data = json.loads(path.read_text())
    assert data["schema"] == stats_cache.SCHEMA and data["effai"] and data["code"] and len(data["cards"]) == 1
    key = next(iter(data["cards"]))
    data["cards"][key] = {"params": 7, "macs": 11}          # a value only the cache can supply
    path.write_text(json.dumps(data))
    stats_cache.clear_memo()

    def no_build(card):
        raise AssertionError(f"{card.name} was measured although the cache holds it")

    monkeypatch.setattr(stats_cache, "_measure", no_build)
    assert stats_cache.card_stats("mixer_pico") == {"params": 7, "macs": 11}
    data["code"] = "0" * 16                                  # written by other code: ignored, measured again
    path.write_text(json.dumps(data))
    stats_cache.clear_memo()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(path.parents[1]))
    assert stats_cache.card_stats("mixer_pico") == first
    assert json.loads(path.read_text())["code"] == stats_cache._header()["code"]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b"[" * 100_000,
                                     b'{"schema": "effai.card_stats/1", "cards": {"x": {"params": "1", "macs": -1}}}'])
def test_card_stats_cache_that_is_corrupt_is_ignored_and_repaired(stats_cache, content):
    import json

    path = stats_cache.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert stats_cache.read_cache() == {}
    stats = stats_cache.card_stats("mixer_pico")
    assert stats["params"] > 0
    repaired = json.loads(path.read_text())
    assert repaired["schema"] == stats_cache.SCHEMA and list(repaired["cards"].values()) == [stats]
    assert not [p for p in path.parent.iterdir() if p.name != path.name]      # no temp files left beside it


def test_card_stats_without_a_writable_cache_still_count(stats_cache, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))   # a file where the cache dir would go
    assert stats_cache.card_stats("mixer_pico")["params"] > 0


def test_zoo_list_reads_its_stats_from_the_cache(stats_cache, capfd, monkeypatch):
    """A warm `effai zoo list` builds no model: every row's params and MACs come from the cache."""
    from effai.cli.zoo import zoo_list
    from tests.helpers import call_cli

    for name in ("mixer_pico", "vit_pico"):
        stats_cache.card_stats(name)
    stats_cache.clear_memo()
    monkeypatch.setattr(stats_cache, "_measure", lambda card: pytest.fail(f"{card.name} was built"))
    code, last, _ = call_cli(capfd, zoo_list, pattern="pico", timm_names=False, bundles=None, as_json=True)
    assert code == 0 and [m["name"] for m in last["models"]] == ["mixer_pico", "vit_pico"]
    assert all(m["params"] > 0 and m["macs"] > 0 for m in last["models"])
