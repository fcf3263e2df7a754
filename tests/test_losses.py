"""Distillation losses (METHODS.md section 2): their invariants, checked on seeded random logits of several shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effai.errors import UsageError
from effai.train.losses import LOSSES, dist_loss, dkd_loss, kd_loss
from effai.train.losses.dist import dist_parts
from effai.train.losses.dkd import dkd_parts
from effai.train.losses.kd import kd_per_sample

SHAPES = [(1, 2), (1, 10), (3, 2), (8, 5), (32, 100)]
TEMPS = [0.5, 1.0, 2.0, 4.0]


def logits(b: int, k: int, seed: int = 0, dtype=torch.float64, scale: float = 3.0):
    """Seeded (student, teacher, target), logits spread enough to make softmaxes non-trivial."""
    g = torch.Generator().manual_seed(seed * 1000 + b * 37 + k)
    z_s = scale * torch.randn(b, k, generator=g, dtype=dtype)
    z_t = scale * torch.randn(b, k, generator=g, dtype=dtype)
    return z_s, z_t, torch.randint(0, k, (b,), generator=g)


# ---- vanilla KD -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("t", TEMPS)
def test_kd_is_zero_iff_logits_differ_by_a_per_row_constant(b, k, t):
    _, z_t, _ = logits(b, k, scale=1.0)              # moderate logits: no row is numerically one-hot
    c_row = 10 * torch.randn(b, 1, dtype=z_t.dtype)
    assert kd_loss(z_t + c_row, z_t, t).abs() < 1e-12
    # any perturbation that is not constant along a row makes that row's KD > 0
    noise = torch.randn(b, k, dtype=z_t.dtype)
    noise[:, 0] += 1.0                                 # never constant along a row, even for k = 2
    assert (kd_per_sample(z_t + c_row + noise, z_t, t) > 1e-8).all()
    col = torch.linspace(-1, 1, k, dtype=z_t.dtype)    # a per-column constant is not a per-row one
    assert (kd_per_sample(z_t + col, z_t, t) > 1e-8).all()


@pytest.mark.parametrize("b,k", SHAPES)
def test_kd_matches_the_plain_formula(b, k):
    z_s, z_t, _ = logits(b, k)
    for t in TEMPS:
        p_t, p_s = F.softmax(z_t / t, 1), F.softmax(z_s / t, 1)
        want = t * t * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        torch.testing.assert_close(kd_loss(z_s, z_t, t), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("t", TEMPS)
def test_kd_gradient_is_T_times_probability_difference_over_B(b, k, t):
    z_s, z_t, _ = logits(b, k)
    z_s.requires_grad_(True)
    (grad,) = torch.autograd.grad(kd_loss(z_s, z_t, t), z_s)
    want = t * (F.softmax(z_s.detach() / t, 1) - F.softmax(z_t / t, 1)) / b
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


# ---- DKD --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("t", TEMPS)
def test_kd_decomposes_into_tckd_plus_weighted_nckd(b, k, t):
    for seed in range(3):
        z_s, z_t, y = logits(b, k, seed)
        tckd, nckd = dkd_parts(z_s, z_t, y, t)
        pt_gt = F.softmax(z_t / t, 1).gather(1, y[:, None]).squeeze(1)
        torch.testing.assert_close(kd_per_sample(z_s, z_t, t), tckd + (1 - pt_gt) * nckd, rtol=0, atol=1e-6)
        assert (tckd >= 0).all() and (nckd >= 0).all()
        if k == 2:
            assert (nckd == 0).all()                   # one non-target class: nothing to distribute


@pytest.mark.parametrize("b,k", SHAPES)
def test_dkd_matches_the_reference_minus_1000_masking(b, k):
    """Independent oracle: the paper's formulation with the gt logit masked by -1000 before the softmax."""
    z_s, z_t, y = logits(b, k)
    for t in TEMPS:
        gt = F.one_hot(y, k).bool()
        p_s, p_t = F.softmax(z_s / t, 1), F.softmax(z_t / t, 1)
        bs = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
        bt = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
        tckd = (bt * (bt.log() - bs.log())).sum(1) * t * t
        qt = F.softmax(z_t / t - 1000 * gt, 1)
        nckd = F.kl_div(F.log_softmax(z_s / t - 1000 * gt, 1), qt, reduction="none").sum(1) * t * t
        torch.testing.assert_close(dkd_loss(z_s, z_t, y, 1.0, 2.0, t), (tckd + 2 * nckd).mean(), rtol=1e-8,
                                   atol=1e-10)
        torch.testing.assert_close(dkd_loss(z_s, z_t, y, 0.3, 0.0, t), 0.3 * tckd.mean(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("b,k", SHAPES)
def test_dkd_is_zero_for_per_row_shifted_logits(b, k):
    _, z_t, y = logits(b, k)
    assert dkd_loss(z_t + 5 * torch.randn(b, 1, dtype=z_t.dtype), z_t, y, temperature=2.0).abs() < 1e-12


# ---- DIST -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,k", SHAPES)
def test_dist_terms_lie_in_0_2(b, k):
    for seed in range(3):
        z_s, z_t, _ = logits(b, k, seed)
        for s in (z_s, -z_t, 50 * z_s, 0 * z_s):       # random, anti-correlated, near one-hot, uniform
            for tau in (0.5, 1.0, 4.0):
                for term in dist_parts(s, z_t, tau):
                    assert 0 <= term.item() <= 2
    # an anti-correlated pair reaches the top of the range: rows [a, b] vs [b, a] with a != b
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]], dtype=torch.float64)
    inter, intra = dist_parts(z.flip(1), z)
    torch.testing.assert_close(inter, torch.tensor(2.0, dtype=z.dtype))
    assert 0 <= intra <= 2


@pytest.mark.parametrize("b,k", SHAPES)
def test_dist_is_zero_when_student_equals_teacher_and_positive_otherwise(b, k):
    z_s, z_t, _ = logits(b, k)
    for tau in (0.5, 1.0, 4.0):
        assert dist_loss(z_t.clone(), z_t, tau=tau).abs() < 1e-12
        assert dist_loss(torch.zeros_like(z_t), torch.zeros_like(z_t), tau=tau).abs() < 1e-12  # zero variance
        assert dist_loss(z_s, z_t, tau=tau) > 1e-6


@pytest.mark.parametrize("b,k", SHAPES)
def test_dist_is_invariant_to_per_row_constants(b, k):
    z_s, z_t, _ = logits(b, k)
    shifted = dist_loss(z_s + 7 * torch.randn(b, 1, dtype=z_s.dtype), z_t - 3 * torch.randn(b, 1, dtype=z_s.dtype))
    torch.testing.assert_close(shifted, dist_loss(z_s, z_t), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("b,k", [(3, 2), (8, 5), (32, 100)])
def test_dist_matches_the_plain_pearson_formula(b, k):
    """Independent oracle: plain Pearson (torch.corrcoef), tau^2 and the two weights. The eps guard moves the
    result by O(eps / variance): ~2e-6 relative here for tau=4, where 32 near-uniform softmax values barely vary."""
    z_s, z_t, _ = logits(b, k)
    for beta, gamma, tau in [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)]:
        y_s, y_t = F.softmax(z_s / tau, 1), F.softmax(z_t / tau, 1)
        inter = 1 - torch.stack([torch.corrcoef(torch.stack([y_s[i], y_t[i]]))[0, 1] for i in range(b)]).mean()
        intra = 1 - torch.stack([torch.corrcoef(torch.stack([y_s[:, c], y_t[:, c]]))[0, 1] for c in range(k)]).mean()
        want = tau * tau * (beta * inter + gamma * intra)
        torch.testing.assert_close(dist_loss(z_s, z_t, beta, gamma, tau), want, rtol=2e-5, atol=0)


# ---- all losses: dtypes, batch sizes, gradients, stability, registry ----------------------------------------------

ALL = {"kd": lambda s, t, y: kd_loss(s, t, 2.0), "dkd": lambda s, t, y: dkd_loss(s, t, y, temperature=2.0),
       "dist": lambda s, t, y: dist_loss(s, t, tau=2.0)}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e3])           # 1e3: far beyond where exp() overflows
def test_every_loss_is_a_finite_scalar_with_finite_gradients(name, dtype, b, k, scale):
    z_s, z_t, y = logits(b, k, dtype=dtype, scale=scale)
    z_s.requires_grad_(True)
    loss = ALL[name](z_s, z_t, y)
    assert loss.shape == () and loss.dtype == dtype and torch.isfinite(loss) and loss >= -1e-6
    loss.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()


def test_registry_holds_the_three_losses_with_the_method_defaults():
    assert LOSSES.names() == ["dist", "dkd", "kd"]
    z_s, z_t, y = logits(8, 10)
    torch.testing.assert_close(LOSSES.get("kd")(z_s, z_t, y), kd_loss(z_s, z_t, 1.0))
    torch.testing.assert_close(LOSSES.get("dkd")(z_s, z_t, y), dkd_loss(z_s, z_t, y, 1.0, 2.0, 1.0))
    torch.testing.assert_close(LOSSES.get("dist")(z_s, z_t, y), dist_loss(z_s, z_t, 1.0, 1.0, 1.0))
    assert LOSSES.get("kd")(z_s, z_t, y) != kd_loss(z_s, z_t, 2.0)       # T really is 1
    assert LOSSES.get("dkd")(z_s, z_t, y) != dkd_loss(z_s, z_t, y, 1.0, 1.0)  # beta really is 2


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(UsageError) as e:
        LOSSES.get("kdd")
    msg = str(e.value)
    assert "unknown distillation loss 'kdd'" in msg and "did you mean" in msg
    assert "choose one of: dist, dkd, kd" in msg


@pytest.mark.parametrize("bad", [(torch.zeros(4, 1), torch.zeros(4, 1)), (torch.zeros(4, 3), torch.zeros(5, 3)),
                                 (torch.zeros(4), torch.zeros(4))])
def test_bad_shapes_are_rejected(bad):
    for fn in (lambda s, t: kd_loss(s, t), lambda s, t: dist_loss(s, t),
               lambda s, t: dkd_loss(s, t, torch.zeros(s.shape[0], dtype=torch.long))):
        with pytest.raises(ValueError):
            fn(*bad)
