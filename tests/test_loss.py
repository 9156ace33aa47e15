"""Loss: checked against values derived by hand from the paper's formulas, never from the code.

Reference values come from the paper's Eq. 3-10 evaluated in 40-digit decimal arithmetic (`dec_*`
below) or from a plain full-logits computation. a and b are the chosen and rejected sequence
log-probs, log P(y_w|x) and log P(y_l|x).
"""
import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F

from minorpo.loss import (IGNORE_INDEX, LOGP_SUM_WARNING, log1mexp, log_odds, odds_ratio_loss,
                          orpo_loss, sequence_logps, sft_loss, token_logps)

getcontext().prec = 40
LN2 = 0.6931471805599453


def dec_log_odds(a):
    a = Decimal(a)
    return a - (1 - a.exp()).ln()  # Eq. 4: log P - log(1 - P)


def dec_odds(a):
    p = Decimal(a).exp()
    return p / (1 - p)


def pair(a, b, dtype=torch.float64):
    return (torch.tensor([a], dtype=dtype, requires_grad=True),
            torch.tensor([b], dtype=dtype, requires_grad=True))


# ---- the odds-ratio loss, Eq. 4-10 ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [-0.01, -0.5, -1.0, -3.0, -20.0])
def test_equal_logps_give_ln2(a, dtype):
    # log OR = 0, so L_OR = -log sigma(0) = ln 2 whatever the odds
    losses, log_odds_ratio = odds_ratio_loss(*pair(a, a, dtype))
    assert abs(losses.item() - LN2) < 1e-6 and log_odds_ratio.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_values_and_gradient_at_minus_half_minus_one(dtype):
    # log odds(-0.5) = -0.5 - ln(1 - e^-0.5) = 0.432752, log odds(-1) = -0.541325; log OR = 0.974077;
    # L_OR = ln(1 + e^-0.974077) = 0.320300. dL/da = -sigma(-logOR) / (1 - e^a), dL/db = +sigma(-logOR) / (1 - e^b).
    a, b = pair(-0.5, -1.0, dtype)
    losses, log_odds_ratio = odds_ratio_loss(a, b)
    losses.sum().backward()
    assert abs(log_odds_ratio.item() - 0.974077) < 1e-6
    assert abs(losses.item() - 0.320300) < 1e-6
    assert abs(a.grad.item() - (-0.696544)) < 1e-6
    assert abs(b.grad.item() - 0.433570) < 1e-6


def test_hand_values_at_minus_point_two_minus_point_three():
    losses, log_odds_ratio = odds_ratio_loss(*pair(-0.2, -0.3))
    assert abs(log_odds_ratio.item() - 0.457546) < 1e-6
    assert abs(losses.item() - 0.490318) < 1e-6
    assert abs(log_odds_ratio.item() - float(dec_log_odds(-0.2) - dec_log_odds(-0.3))) < 1e-12


def test_gradient_is_minus_delta_times_h_of_eq_8_to_10():
    # Through a parametrised model: d L_OR / d theta = -delta(d) * h(d), with
    # delta = 1 / (1 + odds(y_w)/odds(y_l)) (Eq. 9), h = dlogP_w/(1 - P_w) - dlogP_l/(1 - P_l) (Eq. 10).
    # The paper's Eq. 8 writes delta * h; the minus of Eq. 7 (L_OR = -log sigma) was dropped there.
    torch.manual_seed(0)
    theta = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)  # logits: 2 responses x 5 tokens
    tokens = torch.randint(0, 7, (2, 5))

    def logps():
        return F.log_softmax(theta, -1).gather(2, tokens[..., None]).squeeze(2).mean(1)  # Eq. 3

    losses, _ = odds_ratio_loss(logps()[:1], logps()[1:])
    (grad,) = torch.autograd.grad(losses.sum(), theta)
    a, b = (float(v) for v in logps().detach())
    grad_a = torch.autograd.grad(logps()[0], theta)[0]
    grad_b = torch.autograd.grad(logps()[1], theta)[0]
    delta = 1 / (1 + float(dec_odds(a) / dec_odds(b)))
    h = grad_a / (1 - math.exp(a)) - grad_b / (1 - math.exp(b))
    torch.testing.assert_close(grad, -delta * h, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad, delta * h)


def test_gradcheck_odds_ratio_loss():
    a = torch.tensor([-0.05, -0.7, -2.0, -9.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.3, -0.69, -4.0, -1e-3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: odds_ratio_loss(a, b)[0], (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [-1e-2, -1e-4, -1e-6, -1e-8])
def test_chosen_gradient_stays_finite_as_p_tends_to_one(a, dtype):
    # dL/da = -odds_l / (odds_l (1 - P_a) + P_a), which tends to -odds(y_l) as a -> 0-, never inf.
    b = -1.0
    a_t, b_t = pair(a, b, dtype)
    odds_ratio_loss(a_t, b_t)[0].sum().backward()
    pa, odds_l = Decimal(a_t.item()).exp(), dec_odds(b)
    expected = float(-odds_l / (odds_l * (1 - pa) + pa))
    assert math.isfinite(a_t.grad.item()) and math.isfinite(b_t.grad.item())
    assert abs(a_t.grad.item() - expected) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert abs(expected - float(-odds_l)) < 1e-1


def test_certain_response_is_finite():
    # A mean log-prob of exactly 0.0 happens in fp32 (every target logit far above the rest).
    a, b = pair(0.0, -1.0, torch.float32)
    losses, log_odds_ratio = odds_ratio_loss(a, b)
    losses.sum().backward()
    for value in (losses, log_odds_ratio, a.grad, b.grad):
        assert torch.isfinite(value).all()


# ---- log1mexp ----

@pytest.mark.parametrize("x", [-0.1, -1e-4, -1e-8, -0.69, -0.70, -5.0, -50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_against_high_precision(x, dtype):
    x_t = torch.tensor(x, dtype=dtype, requires_grad=True)
    exact_x = Decimal(x_t.item())  # the value the dtype actually holds
    expected = (1 - exact_x.exp()).ln()
    got = log1mexp(x_t)
    rel = abs((Decimal(got.item()) - expected) / expected)
    assert rel < (1e-6 if dtype == torch.float32 else 1e-14)
    # d/dx log(1 - e^x) = -e^x / (1 - e^x) = -1 / expm1(-x)
    got.backward()
    expected_grad = -1 / ((-exact_x).exp() - 1)
    assert abs((Decimal(x_t.grad.item()) - expected_grad) / expected_grad) < 1e-5


def test_log1mexp_is_finite_where_the_naive_form_is_not():
    x = torch.tensor(-1e-8)  # fp32: exp(x) rounds to 1.0
    assert torch.log1p(-torch.exp(x)).item() == -math.inf
    assert abs(log1mexp(x).item() - math.log(1e-8)) < 1e-5
    assert abs(log_odds(x).item() - (-1e-8 - math.log(1e-8))) < 1e-5


# ---- sum versus mean ----

def rows_of(*responses):
    """Per-token log-prob rows, right-padded with 0 and a False mask, from lists of token log-probs."""
    width = max(len(r) for r in responses)
    logps = torch.zeros(len(responses), width, dtype=torch.float64)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        logps[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, :len(r)] = True
    return logps, mask


def test_mean_is_length_invariant_and_sum_is_not():
    chosen, rejected = [-0.3, -1.2, -0.6], [-0.9, -1.5, -0.7, -1.1]
    base = {red: orpo_loss(*rows_of(chosen, rejected), 0.1, red)[1]["orpo_loss"] for red in ("mean", "sum")}
    doubled = {red: orpo_loss(*rows_of(chosen * 2, rejected), 0.1, red)[1]["orpo_loss"] for red in ("mean", "sum")}
    assert abs(base["mean"] - doubled["mean"]) < 1e-12
    assert abs(base["sum"] - doubled["sum"]) > 0.1


def test_sum_turns_length_into_a_log_odds_ratio_of_60():
    short, long = [-1.0] * 200, [-1.0] * 260
    _, m = orpo_loss(*rows_of(short, long), 0.1, "sum")
    assert abs(m["log_odds"] - 60) < 1e-9 and m["orpo_loss"] < 1e-25  # ln(1 + e^-60): no gradient
    _, m = orpo_loss(*rows_of(long, short), 0.1, "sum")
    assert abs(m["log_odds"] + 60) < 1e-9 and abs(m["orpo_loss"] - 60) < 1e-9
    _, m = orpo_loss(*rows_of(long, short), 0.1, "mean")
    assert abs(m["log_odds"]) < 1e-12 and abs(m["orpo_loss"] - LN2) < 1e-12
    assert "sum" in LOGP_SUM_WARNING and "60" in LOGP_SUM_WARNING


def test_sequence_logps_mean_and_sum():
    logps, mask = rows_of([-1.0, -2.0], [-3.0, -1.0, -2.0])
    assert sequence_logps(logps, mask, "sum").tolist() == [-3.0, -6.0]
    assert sequence_logps(logps, mask, "mean").tolist() == [-1.5, -2.0]


def test_orpo_metrics_by_hand():
    # pairs: (chosen -1, rejected -2) and (chosen [-2, -4] mean -3, rejected -1)
    logps, mask = rows_of([-1.0], [-2.0, -4.0], [-2.0], [-1.0])
    loss, m = orpo_loss(logps, mask, orpo_lambda=0.5)
    sft = (1 + 2 + 4) / 3  # chosen tokens only, token mean (Eq. 2)
    lors = [float(dec_log_odds(-1.0) - dec_log_odds(-2.0)), float(dec_log_odds(-3.0) - dec_log_odds(-1.0))]
    orpo = sum(math.log1p(math.exp(-r)) for r in lors) / 2
    assert abs(m["sft_loss"] - sft) < 1e-12 and abs(m["orpo_loss"] - orpo) < 1e-12
    assert abs(loss.item() - (sft + 0.5 * orpo)) < 1e-12 and abs(m["total_loss"] - loss.item()) < 1e-12
    assert abs(m["log_odds"] - sum(lors) / 2) < 1e-12 and m["pref_accuracy"] == 0.5
    assert m["chosen_logps"] == -2.0 and m["rejected_logps"] == -1.5
    assert not any(v.requires_grad for v in m.values())
