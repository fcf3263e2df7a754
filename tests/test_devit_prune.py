"""DeViT's optional stage 2: HSIC + activation ranking, real structured pruning of heads and MLP neurons (equal to
masking them), pruned cards that rebuild, bad counts and ratios refused, and the pipeline end to end through the CLI
with the pruned parts exported with parity."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from effai import zoo
from effai.errors import UsageError
from effai.train.devit import DevitConfig, prune
from effai.zoo.vit import block_widths, keep_heads_and_neurons
from tests.helpers import DEVIT_SIZE as SIZE
from tests.helpers import run_cli


def _vit(**arch) -> torch.nn.Module:
    card = zoo.resolve_card("vit_pico").with_(input_size=(1, SIZE, SIZE), num_classes=4, label_set=None,
                                              extra={"arch_kwargs": {"patch_size": 4, **arch}})
    torch.manual_seed(0)
    return zoo.build(card).eval()


def _masked(model: torch.nn.Module, heads: list[list[int]], neurons: list[list[int]]) -> torch.nn.Module:
    """The unpruned model with every other head's proj columns and every other neuron's fc2 column zeroed."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for block, kh, kn in zip(m.blocks, heads, neurons):
            hd = block.attn.head_dim
            for j in set(range(block.attn.num_heads)) - set(kh):
                block.attn.proj.weight[:, j * hd:(j + 1) * hd] = 0
            block.mlp.fc2.weight[:, sorted(set(range(block.mlp.fc1.out_features)) - set(kn))] = 0
    return m


@pytest.mark.parametrize("neurons,heads", [(0.5, 0.0), (0.0, 0.34), (0.75, 0.67)])
def test_pruned_vit_computes_what_the_masked_vit_computes(neurons, heads):
    model = _vit()
    batches = [torch.randn(24, 1, SIZE, SIZE), torch.randn(24, 1, SIZE, SIZE)]
    head_scores, neuron_scores = prune.rank_units(model, batches)
    keep_h = [prune.keep_top(s, heads) for s in head_scores]
    keep_n = [prune.keep_top(s, neurons) for s in neuron_scores]
    reference = _masked(model, keep_h, keep_n)
    result = prune.prune_vit(model, batches, neurons=neurons, heads=heads)
    assert result.heads == [len(k) for k in keep_h] == [prune.keep_count(3, heads)] * 6
    assert result.hidden == [prune.keep_count(384, neurons)] * 6 and result.params_after < result.params_before
    x = torch.randn(5, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    rebuilt = _vit(**result.arch_kwargs())                  # what export / serve build from the pruned card
    rebuilt.load_state_dict(model.state_dict())
    assert block_widths(rebuilt) == (result.heads, result.hidden)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_dead_units_rank_lowest_and_are_pruned_first():
    """A neuron whose activation is identically 0 and a head whose output is 0 score 0 on both terms."""
    model = _vit()
    dead_neurons, dead_head = [3, 100, 250], 1
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight[dead_neurons] = 0
            block.mlp.fc1.bias[dead_neurons] = -20.0           # GELU(-20) = 0 to float precision
            hd = block.attn.head_dim
            v0 = 2 * block.attn.num_heads * hd + dead_head * hd          # V rows of the dead head in q|k|v
            v = slice(v0, v0 + hd)
            block.attn.qkv.weight[v] = 0                        # V of head 1 is 0, so its output is 0
            block.attn.qkv.bias[v] = 0
    head_scores, neuron_scores = prune.rank_units(model, [torch.randn(32, 1, SIZE, SIZE)])
    for hs, ns in zip(head_scores, neuron_scores):
        assert int(hs.argmin()) == dead_head and float(hs.min()) == 0.0
        assert set(torch.argsort(ns)[:3].tolist()) == set(dead_neurons)
        assert not set(dead_neurons) & set(prune.keep_top(ns, 0.01))


def test_hsic_sees_dependence_on_the_prediction():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4, generator=g) * 3, dim=-1)
    tied = probs[:, :1].repeat(1, 5) + 0.01 * torch.randn(64, 5, generator=g)   # a unit that follows class 0
    noise = torch.randn(64, 5, generator=g)
    scores = prune.hsic(torch.stack([tied, noise]), probs)
    assert scores[0] > 5 * scores[1] > 0
    assert prune.minmax(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]           # a flat layer: no NaN


def test_bad_ratios_and_damaged_cards_are_refused():
    with pytest.raises(UsageError, match=r"prune_heads 1.0 must lie in \[0, 1\).*--set prune_heads="):
        DevitConfig(teacher="t", prune_heads=1.0)
    with pytest.raises(UsageError, match="prune_neurons -0.1"):
        DevitConfig(teacher="t", prune_neurons=-0.1)
    with pytest.raises(UsageError, match="block_heads .* needs 6 counts, block i between 1 and 3"):
        _vit(block_heads=[2, 2])
    with pytest.raises(UsageError, match="block_mlp .* between 1 and 384"):
        _vit(block_mlp=[0] * 6)
    with pytest.raises(UsageError, match="distinct indices in 0..2"):
        keep_heads_and_neurons(_vit().blocks[0], [1, 1], None)
    with pytest.raises(UsageError, match="more than 16384"):
        zoo.build(zoo.resolve_card("vit_pico").with_(
            input_size=(1, 4096, 4096), num_classes=4, label_set=None, extra={"arch_kwargs": {"patch_size": 1}}))
    # removed = ratio * units rounded half up, at least one unit kept
    assert [prune.keep_count(3, r) for r in (0.34, 0.5, 0.67, 0.99)] == [2, 1, 1, 1]
    assert prune.keep_count(5, 0.5) == 2 and prune.keep_count(384, 0.5) == 192 and prune.keep_count(4, 0.0) == 4


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, digits_npz, devit_teacher):
    """`effai train devit` with 50% of the neurons and a third of the heads pruned (one epoch per stage)."""
    out = tmp_path_factory.mktemp("devit_prune") / "run"
    code, last, _, err = run_cli("train", "devit", "--teacher", str(devit_teacher), "--parts", "2", "--data",
                                 str(digits_npz), "--out", str(out), "--epochs", "1", "--batch-size", "32",
                                 "--set", "finetune_epochs=1", "--set", "ensemble_epochs=1",
                                 "--set", "prune_neurons=0.5", "--set", "prune_heads=0.34",
                                 "--set", "prune_epochs=1", "--json")
    assert code == 0, err
    return out


def test_devit_with_pruning_writes_smaller_parts_that_rebuild_and_export(pruned_run, tmp_path):
    from effai.devit_runtime.parts import load_run

    manifest = json.loads((pruned_run / "devit.json").read_text())
    assert manifest["config"]["prune_neurons"] == 0.5
    for part in manifest["parts"]:
        p = part["pruning"]
        assert p["heads"] == [2] * 6 and p["mlp_neurons"] == [192] * 6 and p["heads_before"] == [3] * 6
        assert p["params_after"] < 0.6 * p["params_before"] and 0 <= p["val_acc_recovered"] <= 1
        assert part["params"] < p["params_before"]
    assert any(r.get("pruned") for r in manifest["history"])
    decomp = load_run(pruned_run)                       # rebuilt from the cards, as `effai devit serve` does
    assert [block_widths(p.model) for p in decomp.parts] == [([2] * 6, [192] * 6)] * 2
    out = tmp_path / "bundle"
    code, _, _, err = run_cli("devit", "export", str(pruned_run), "--target", "onnx", "--out", str(out), "--json")
    assert code == 0, err
    rec = json.loads((out / "devit_bundle.json").read_text())
    for piece in rec["pieces"]:
        art = piece["artifacts"]["onnx"]
        assert art["parity"] == "pass"
