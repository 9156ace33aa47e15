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
    # L_OR = ln(1 + e^-0.974077) = 0.320300; sigma(-log OR) = 0.274069;
    # dL/da = -sigma(-log OR) / (1 - e^a) = -0.696544, dL/db = +sigma(-log OR) / (1 - e^b) = 0.433570.
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
    for reduction in ("mean", "sum"):
        base = orpo_loss(*rows_of(chosen, rejected), 0.1, reduction)[1]["orpo_loss"]
        doubled = orpo_loss(*rows_of(chosen * 2, rejected), 0.1, reduction)[1]["orpo_loss"]  # same mean
        assert (abs(base - doubled) < 1e-12) if reduction == "mean" else (abs(base - doubled) > 0.1)


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


# ---- the chunked output head ----

def head_batch(dtype=torch.float32, rows=3, tokens=7, width=8, vocab=11):
    """Hidden states, head weight and labels with a masked prompt, right padding and odd row lengths."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, tokens, width, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, tokens), generator=g)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, 3:] = IGNORE_INDEX
    return hidden, weight, labels  # 5 + 3 + 1 = 9 label tokens after the shift


def full_logits_logps(hidden, weight, labels):
    """The plain way: every position's full logits, log_softmax in fp32, gather the next token."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = F.log_softmax((hidden[:, :-1] @ weight.T).float(), dim=-1)  # (N, T-1, V)
    return logprobs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * mask, mask


@pytest.mark.parametrize("chunk_size", [1, 4, 4096])  # 4 does not divide the 9 label tokens
def test_chunked_head_equals_full_logits(chunk_size):
    hidden, weight, labels = head_batch()
    grad_out = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    expected, expected_mask = full_logits_logps(hidden, weight, labels)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), (hidden, weight))
    logps, mask = token_logps(hidden, weight, labels, chunk_size)
    grads = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    assert logps.dtype == torch.float32 and mask.tolist() == expected_mask.tolist()
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_frozen_head_gets_no_gradient():
    hidden, weight, labels = head_batch()
    weight.requires_grad_(False)
    expected, _ = full_logits_logps(hidden, weight, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), hidden)
    logps, _ = token_logps(hidden, weight, labels, chunk_size=4)
    logps.sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=0, atol=1e-5)


def test_head_saves_no_logits_for_backward():
    # 4 rows x 64 tokens x 1000-token vocabulary: fp32 logits would be 1 MB; the inputs are 20 KB.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 65, 4, generator=g, requires_grad=True)
    weight = torch.randn(1000, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 65), generator=g)
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logps(hidden, weight, labels, chunk_size=64)
    assert 0 < sum(saved_bytes) < 64_000


def test_gradcheck_chunked_head():
    hidden, weight, labels = head_batch(torch.float64, width=3, vocab=6)
    assert torch.autograd.gradcheck(lambda h, w: token_logps(h, w, labels, chunk_size=2)[0], (hidden, weight))


def test_bf16_head_keeps_input_dtypes_and_fp32_logps():
    hidden, weight, labels = head_batch()
    expected, _ = full_logits_logps(hidden, weight, labels)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    weight16 = weight.detach().bfloat16().requires_grad_()
    logps, _ = token_logps(hidden16, weight16, labels, chunk_size=4)
    logps.sum().backward()
    assert logps.dtype == torch.float32
    assert hidden16.grad.dtype == torch.bfloat16 and weight16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logps, expected.detach(), rtol=0, atol=0.1)  # bf16 rounding of the inputs
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    torch.testing.assert_close(hidden16.grad.float(), expected_grads[0], rtol=0, atol=0.1)
    torch.testing.assert_close(weight16.grad.float(), expected_grads[1], rtol=0, atol=0.1)


# ---- a tiny stand-in causal model: micro-batches and the concatenated forward ----

class TinyCausalLM(torch.nn.Module):
    """Embedding, one causal attention head (SDPA, is_causal, no padding mask), output head."""

    def __init__(self, vocab=13, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Parameter(torch.randn(vocab, width) * 0.5)

    def forward(self, ids, labels):
        x = self.embed(ids)
        q, k, v = self.qkv(x)[:, None].chunk(3, dim=-1)  # (N, 1, T, width) each
        hidden = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, 0]
        return token_logps(hidden, self.head, labels, chunk_size=5)


def make_rows(specs, vocab=13):
    """Right-padded ids and labels from (prompt length, response length) per row."""
    g = torch.Generator().manual_seed(0)
    width = max(p + r for p, r in specs)
    ids = torch.zeros(len(specs), width, dtype=torch.long)
    labels = torch.full((len(specs), width), IGNORE_INDEX)
    for i, (p, r) in enumerate(specs):
        ids[i, :p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        labels[i, p:p + r] = ids[i, p:p + r]
    return ids, labels


PAIRS = [((3, 2), (3, 5)), ((2, 6), (2, 1)), ((4, 3), (4, 3)), ((1, 1), (1, 7))]  # (chosen, rejected)


def pair_batch(pairs):
    """2P rows: the chosen rows of every pair, then the rejected rows in the same order."""
    return make_rows([c for c, _ in pairs] + [r for _, r in pairs])


def pair_rows(ids, labels, pair_indices, num_pairs):
    """The rows of some pairs out of a 2P-row batch: their chosen rows, then their rejected rows."""
    rows = list(pair_indices) + [num_pairs + i for i in pair_indices]
    return ids[rows], labels[rows]


def test_micro_batches_give_the_whole_batch_gradient():
    model = TinyCausalLM().double()
    params = list(model.parameters())
    ids, labels = pair_batch(PAIRS)
    whole_loss, whole_metrics = orpo_loss(*model(ids, labels), orpo_lambda=0.3)
    whole_grads = torch.autograd.grad(whole_loss, params)

    num_chosen_tokens = sum(chosen[1] for chosen, _ in PAIRS)  # 12, counted over the whole batch
    summed_grads = [torch.zeros_like(p) for p in params]
    summed_metrics = dict.fromkeys(whole_metrics, 0.0)
    mean_of_micro_means = 0.0
    for micro in ([0], [1, 2, 3]):  # uneven micro-batches: 1 pair, then 3
        logps, mask = model(*pair_rows(ids, labels, micro, len(PAIRS)))
        loss, metrics = orpo_loss(logps, mask, 0.3, num_chosen_tokens=num_chosen_tokens,
                                  num_pairs=len(PAIRS))
        for total, grad in zip(summed_grads, torch.autograd.grad(loss, params)):
            total += grad
        for name in metrics:
            summed_metrics[name] += metrics[name]
        mean_of_micro_means += orpo_loss(logps, mask, 0.3)[0].item() / 2  # the naive `loss / k`
    for got, want in zip(summed_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name in whole_metrics:
        assert abs(summed_metrics[name] - whole_metrics[name]) < 1e-12, name
    assert abs(mean_of_micro_means - whole_loss.item()) > 1e-3  # so the counts matter here


def test_sft_micro_batches_give_the_whole_batch_gradient():
    model = TinyCausalLM().double()
    params = list(model.parameters())
    ids, labels = make_rows([(3, 2), (2, 6), (1, 1), (4, 3)])
    whole_loss, whole_metrics = sft_loss(*model(ids, labels))
    whole_grads = torch.autograd.grad(whole_loss, params)
    summed_grads = [torch.zeros_like(p) for p in params]
    summed_loss = 0.0
    for rows in ([0, 1, 2], [3]):
        loss, metrics = sft_loss(*model(ids[rows], labels[rows]), num_tokens=12)
        for total, grad in zip(summed_grads, torch.autograd.grad(loss, params)):
            total += grad
        summed_loss += metrics["sft_loss"]
    for got, want in zip(summed_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert abs(summed_loss - whole_metrics["sft_loss"]) < 1e-12
    assert whole_metrics["total_loss"] == whole_metrics["sft_loss"]


def test_one_concatenated_forward_equals_two_separate_forwards():
    # Chosen rows are short and rejected rows long, so the concatenated batch pads the chosen rows
    # further on the right; under a causal mask no real token sees that padding.
    model = TinyCausalLM().double()
    params = list(model.parameters())
    pairs = [((3, 2), (3, 6)), ((2, 3), (2, 5))]
    ids, labels = pair_batch(pairs)  # (4, 9)
    loss, metrics = orpo_loss(*model(ids, labels), orpo_lambda=0.3)
    grads = torch.autograd.grad(loss, params)

    chosen_width, rejected_width = 5, 9
    chosen_logps, chosen_mask = model(ids[:2, :chosen_width], labels[:2, :chosen_width])
    rejected_logps, rejected_mask = model(ids[2:, :rejected_width], labels[2:, :rejected_width])
    chosen = sequence_logps(chosen_logps, chosen_mask)
    rejected = sequence_logps(rejected_logps, rejected_mask)
    sft = -chosen_logps.sum() / chosen_mask.sum()
    separate_loss = sft + 0.3 * odds_ratio_loss(chosen, rejected)[0].mean()
    separate_grads = torch.autograd.grad(separate_loss, params)

    torch.testing.assert_close(loss, separate_loss, rtol=1e-12, atol=1e-12)
    assert abs(metrics["chosen_logps"] - chosen.mean()) < 1e-12
    assert abs(metrics["rejected_logps"] - rejected.mean()) < 1e-12
    for got, want in zip(grads, separate_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---- a row without label tokens is an error, not a NaN ----

def test_row_without_labels_raises_a_clear_error():
    logps, mask = rows_of([-1.0], [-2.0], [-1.5], [-0.5])
    mask[1] = False
    for call in (lambda: orpo_loss(logps, mask, 0.1), lambda: sft_loss(logps, mask),
                 lambda: sequence_logps(logps, mask, "sum")):
        with pytest.raises(ValueError, match=r"row 1 .*no label tokens.*data filter"):
            call()
