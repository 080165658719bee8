"""Preference loss (worker/alignment/losses.py) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worker.alignment.losses import (
    PreferenceLossOutput,
    beta_from_diffusers_example,
    beta_to_diffusers_example,
    epsilon_error_scale,
    per_sample_mse,
    preference_loss,
)

LN2 = math.log(2.0)
NEG_LOG_SIGMOID_1 = 0.313261687518  # -log σ(1) = log(1 + e^-1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- per_sample_mse ---------------------------------------------------------------------------


def test_per_sample_mse_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[1.0, -1.0], [2.0, 0.0]]])
    # sample 0: (0 + 4 + 0 + 16) / 4 = 5;  sample 1: (1 + 1 + 4 + 0) / 4 = 1.5
    out = per_sample_mse(pred, target)
    assert out.shape == (2,)
    torch.testing.assert_close(out, t(5.0, 1.5))


def test_per_sample_mse_upcasts_half_precision_to_float32():
    pred = torch.full((2, 3, 4, 4), 300.0, dtype=torch.float16)
    target = torch.zeros_like(pred)
    out = per_sample_mse(pred, target)
    # 300² = 90000 overflows float16 (max 65504) but not float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, t(90000.0, 90000.0))


def test_per_sample_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        per_sample_mse(torch.zeros(2, 3), torch.zeros(2, 4))


# --- preference_loss: the pinned convention ---------------------------------------------------


def test_hand_computed_pair_with_beta_two():
    # Δθ - Δref = (1 - 2) - (1.5 - 1.5) = -1;  -(β/2)·(-1) = 1 with β = 2;  loss = -log σ(1)
    out = preference_loss(t(1.0), t(2.0), t(1.5), t(1.5), beta=2.0)
    assert isinstance(out, PreferenceLossOutput)
    assert out.loss.item() == pytest.approx(NEG_LOG_SIGMOID_1, abs=1e-6)
    assert out.per_sample_loss.shape == (1,)
    assert out.reward_margin.item() == pytest.approx(1.0)
    assert out.implicit_acc.item() == 1.0
    assert out.model_mse.item() == pytest.approx(1.5)
    assert out.ref_mse.item() == pytest.approx(1.5)


def test_diffusers_example_convention_is_the_same_loss():
    # diffusers' example: -logsigmoid(beta_dpo * (ref_diff - model_diff)), beta_dpo = 2500
    m_w, m_l, r_w, r_l = t(0.1010, 0.2000), t(0.1000, 0.1990), t(0.1005, 0.2000), t(0.1002, 0.1998)
    diffusers_beta = 2500.0
    diffusers_loss = -F.logsigmoid(diffusers_beta * ((r_w - r_l) - (m_w - m_l))).mean()
    ours = preference_loss(m_w, m_l, r_w, r_l, beta=beta_from_diffusers_example(diffusers_beta))
    torch.testing.assert_close(ours.loss, diffusers_loss)
    assert beta_from_diffusers_example(2500) == 5000.0
    assert beta_to_diffusers_example(5000) == 2500.0
    assert beta_to_diffusers_example(beta_from_diffusers_example(1234.5)) == 1234.5


def test_beta_to_zero_gives_ln2():
    out = preference_loss(t(1.0, 0.3), t(2.0, 0.1), t(1.5, 0.2), t(1.5, 0.9), beta=0.0)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-7)
    tiny = preference_loss(t(1.0, 0.3), t(2.0, 0.1), t(1.5, 0.2), t(1.5, 0.9), beta=1e-9)
    assert tiny.loss.item() == pytest.approx(LN2, abs=1e-7)


def test_at_the_reference_the_loss_is_ln2_for_any_beta():
    err = t(0.3, 0.7, 0.1)
    out = preference_loss(err, err.flip(0), err, err.flip(0), beta=5000.0)
    torch.testing.assert_close(out.per_sample_loss, torch.full((3,), LN2))
    assert out.reward_margin.item() == 0.0
    assert out.implicit_acc.item() == 0.0  # ties are not wins


def test_smaller_winner_error_lowers_the_loss():
    base = preference_loss(t(1.0), t(2.0), t(1.5), t(1.5), beta=2.0).loss.item()
    better = preference_loss(t(0.9), t(2.0), t(1.5), t(1.5), beta=2.0).loss.item()
    worse_loser = preference_loss(t(1.0), t(2.1), t(1.5), t(1.5), beta=2.0).loss.item()
    assert better < base
    assert worse_loser < base


def test_gradient_signs():
    m_w = torch.tensor([1.0], requires_grad=True)
    m_l = torch.tensor([2.0], requires_grad=True)
    out = preference_loss(m_w, m_l, t(1.5), t(1.5), beta=2.0)
    out.loss.backward()
    # z = -(β/2)(m_w - m_l - 0) = 1;  d(-log σ(z))/dz = -σ(-z);  dz/dm_w = -1,  dz/dm_l = +1
    sigma_minus_one = 1.0 / (1.0 + math.e)
    assert m_w.grad.item() == pytest.approx(sigma_minus_one, abs=1e-6)
    assert m_w.grad.item() > 0
    assert m_l.grad.item() == pytest.approx(-sigma_minus_one, abs=1e-6)
    assert m_l.grad.item() < 0


def test_log_sigmoid_is_per_sample_then_mean_never_of_the_batch_mean():
    # β = 2: z = -(D_w - D_l). Pair 1 z = 10, pair 2 z = -10: the batch mean of z is 0.
    out = preference_loss(t(0.0, 10.0), t(10.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=2.0)
    # per sample: log(1 + e^-10) = 4.5398899e-5 and 10 + log(1 + e^-10) = 10.0000453989
    torch.testing.assert_close(out.per_sample_loss, t(4.5398899e-5, 10.0000453989))
    assert out.loss.item() == pytest.approx(5.0000453989, abs=1e-5)
    wrong = -F.logsigmoid(out.reward_margin)  # log-sigmoid of the batch mean: ln 2
    assert wrong.item() == pytest.approx(LN2, abs=1e-7)
    assert abs(out.loss.item() - wrong.item()) > 4.0


def test_diagnostics_on_a_hand_made_batch():
    # D^w = m_w - r_w, D^l = m_l - r_l
    m_w, m_l = t(1.0, 3.0, 2.0, 0.5), t(2.0, 1.0, 2.0, 1.5)
    r_w, r_l = t(1.0, 1.0, 1.0, 1.0), t(1.0, 1.0, 1.0, 1.0)
    # D^w = [0, 2, 1, -0.5]; D^l = [1, 0, 1, 0.5]; D^w - D^l = [-1, 2, 0, -1]
    out = preference_loss(m_w, m_l, r_w, r_l, beta=4.0)
    assert out.implicit_acc.item() == pytest.approx(0.5)  # pairs 1 and 4
    # z = -2 (D^w - D^l) = [2, -4, 0, 2]; mean 0
    assert out.reward_margin.item() == pytest.approx(0.0)
    # -log σ(z) = log(1 + e^-z)
    expected = [math.log1p(math.exp(-z)) for z in (2.0, -4.0, 0.0, 2.0)]
    torch.testing.assert_close(out.per_sample_loss, torch.tensor(expected))
    assert out.loss.item() == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert out.model_mse.item() == pytest.approx(0.5 * (1.625 + 1.625))
    assert out.ref_mse.item() == pytest.approx(1.0)
    for name in ("implicit_acc", "reward_margin", "model_mse", "ref_mse"):
        assert not getattr(out, name).requires_grad


def test_weights_scale_the_logit_per_pair():
    # w = [1, 0, 3]: z = w · 1 for the pair of the first test
    ones = t(1.0, 1.0, 1.0)
    out = preference_loss(
        ones, 2 * ones, 1.5 * ones, 1.5 * ones, beta=2.0, weights=t(1.0, 0.0, 3.0)
    )
    expected = [math.log1p(math.exp(-z)) for z in (1.0, 0.0, 3.0)]
    torch.testing.assert_close(out.per_sample_loss, torch.tensor(expected))
    assert out.reward_margin.item() == pytest.approx(4.0 / 3.0)
    unweighted = preference_loss(ones, 2 * ones, 1.5 * ones, 1.5 * ones, beta=2.0, weights=None)
    torch.testing.assert_close(unweighted.per_sample_loss, torch.full((3,), NEG_LOG_SIGMOID_1))


def test_large_beta_is_numerically_stable():
    # SD-scale β: logits of ±2500 must not overflow
    out = preference_loss(t(0.0, 1.0), t(1.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=5000.0)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.per_sample_loss, t(0.0, 2500.0))


def test_half_precision_errors_are_computed_in_float32():
    half = torch.tensor([1.0], dtype=torch.float16)
    out = preference_loss(half, 2 * half, 1.5 * half, 1.5 * half, beta=2.0)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(NEG_LOG_SIGMOID_1, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": -1.0},
        {"beta": float("inf")},
        {"beta": 1.0, "weights": torch.ones(3)},
    ],
)
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        preference_loss(t(1.0, 2.0), t(1.0, 2.0), t(1.0, 2.0), t(1.0, 2.0), **kwargs)


def test_mismatched_or_non_vector_errors_are_rejected():
    with pytest.raises(ValueError):
        preference_loss(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0), beta=1.0)
    with pytest.raises(ValueError):
        preference_loss(
            torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1), beta=1.0
        )
    with pytest.raises(ValueError):
        preference_loss(t(), t(), t(), t(), beta=1.0)


def test_epsilon_error_scale_by_hand():
    ac = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    assert epsilon_error_scale(ac, t, "epsilon").tolist() == [1.0, 1.0, 1.0]
    assert epsilon_error_scale(ac, t, "v_prediction").tolist() == pytest.approx([0.9, 0.5, 0.2])
    # SNR = a / (1 - a): 9, 1, 0.25
    assert epsilon_error_scale(ac, t, "sample").tolist() == pytest.approx([9.0, 1.0, 0.25])
    with pytest.raises(ValueError, match="prediction_type"):
        epsilon_error_scale(ac, t, "flow")


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_scaled_target_error_equals_the_noise_prediction_error(kind):
    # One network output, read three ways: the ε-error recovered through the scale must be the
    # error of the ε-prediction that the same output implies.
    g = torch.Generator().manual_seed(0)
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([3, 250, 500, 990])
    a = ac[t].view(-1, 1, 1, 1)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = eps + 0.3 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    if kind == "v_prediction":
        target, pred = (
            a.sqrt() * eps - (1 - a).sqrt() * x0,
            a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat,
        )
    else:
        target, pred = x0, x0_hat
    scaled = per_sample_mse(pred, target) * epsilon_error_scale(ac, t, kind).double()
    assert torch.allclose(scaled, per_sample_mse(eps_hat, eps), rtol=1e-5)


# --- DPO-Positive anchor -------------------------------------------------------------------------


def test_winner_anchor_by_hand():
    # m_w=3, r_w=1 (D^w=+2: the winner got worse), m_l=2, r_l=1 (D^l=+1); β/2 = 1, λ = 0.5:
    # inside = (2 - 1) + 0.5 * max(0, 2) = 2, logit = -2, loss = -log σ(-2) = log(1 + e^2)
    out = preference_loss(t(3.0), t(2.0), t(1.0), t(1.0), beta=2.0, winner_anchor=0.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6)
    # without the anchor: logit -1
    plain = preference_loss(t(3.0), t(2.0), t(1.0), t(1.0), beta=2.0)
    assert plain.loss.item() == pytest.approx(math.log1p(math.exp(1.0)), rel=1e-6)


def test_winner_anchor_is_silent_when_the_winner_improves():
    # D^w = -1 < 0: max(0, D^w) = 0, the anchored loss is plain DPO's
    args = (t(1.0, 0.5), t(2.0, 0.7), t(2.0, 0.9), t(2.0, 0.7))
    anchored = preference_loss(*args, beta=3.0, winner_anchor=10.0)
    plain = preference_loss(*args, beta=3.0)
    assert torch.allclose(anchored.per_sample_loss, plain.per_sample_loss)


def test_winner_anchor_gradient_pulls_the_winner_error_down_harder():
    m_w = torch.tensor([3.0], requires_grad=True)
    preference_loss(m_w, t(2.0), t(1.0), t(1.0), beta=2.0).loss.backward()
    plain_grad = m_w.grad.item()
    m_w.grad = None
    preference_loss(m_w, t(2.0), t(1.0), t(1.0), beta=2.0, winner_anchor=1.0).loss.backward()
    # d/dm_w of -log σ(-(m_w - r_w - D^l) - λ(m_w - r_w)) = σ(inside) (1 + λ): larger and positive
    assert 0 < plain_grad < m_w.grad.item()
    inside = (3.0 - 1.0) - (2.0 - 1.0) + 1.0 * (3.0 - 1.0)  # D^w - D^l + λ D^w = 3
    assert m_w.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(inside)).item() * 2.0)


def test_winner_anchor_is_validated():
    with pytest.raises(ValueError, match="winner_anchor"):
        preference_loss(t(1.0), t(1.0), t(1.0), t(1.0), beta=1.0, winner_anchor=-0.1)


def test_loss_scale_multiplies_each_pairs_loss_outside_the_sigmoid():
    one = torch.tensor([1.0])
    out = preference_loss(
        one, 2 * one, 1.5 * one, 1.5 * one, beta=2.0, loss_scale=torch.tensor([0.5])
    )
    assert out.loss.item() == pytest.approx(0.5 * 0.313262, abs=1e-6)  # -log σ(1) / 2
    with pytest.raises(ValueError, match="loss_scale"):
        preference_loss(one, one, one, one, beta=1.0, loss_scale=torch.ones(2))


def test_importance_corrected_has_weighteds_objective_and_importance_does_not():
    """Exact expectations over k on a small schedule, for a policy that has moved (Δ_k != 0):
    importance-corrected's E_p[(1/W) f(W Δ)] equals weighted's (1/T) Σ f(W Δ); importance's
    E_p[f(Δ)] is another objective."""
    from worker.alignment.credit import TimestepSampler

    abar = torch.tensor([0.99, 0.9, 0.6, 0.3, 0.1, 0.02], dtype=torch.float64)
    delta = torch.tensor([0.3, -0.5, -1.0, 0.2, -0.4, 0.6], dtype=torch.float64)  # D^w - D^l
    beta = 2.0
    W = TimestepSampler("dde", abar, mode="weighted").weights
    p = W / W.sum()

    def f(z: torch.Tensor) -> torch.Tensor:  # the per-pair loss of logit -β/2 z
        return -torch.nn.functional.logsigmoid(-0.5 * beta * z)

    weighted = f(W * delta).mean()
    corrected = (p * f(W * delta) / W).sum()
    importance = (p * f(delta)).sum()
    assert corrected.item() == pytest.approx(weighted.item(), rel=1e-12)
    assert abs(importance.item() - weighted.item()) > 1e-3

    # and the code path: the sampler hands W(k) for the drawn k, the trainer divides by it
    s = TimestepSampler("dde", abar, mode="importance-corrected")
    ks, ws = s.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ws, W[ks].float())
    assert (W[ks] > 0).all()
    k = int(ks[0])
    m_w = torch.tensor([1.0 + float(delta[k])])
    out = preference_loss(
        m_w,
        torch.tensor([1.0]),
        torch.tensor([1.0]),
        torch.tensor([1.0]),
        beta=beta,
        weights=ws[:1],
        loss_scale=1.0 / ws[:1],
    )
    assert out.loss.item() == pytest.approx((f(W[k] * delta[k]) / W[k]).item(), rel=1e-5)
