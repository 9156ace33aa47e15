"""Loss: checked against values derived by hand from the paper's formulas, never from the code.

Reference values come from the paper's Eq. 3-10 evaluated in 40-digit decimal arithmetic (`dec_*`
below) or by hand. The chunked head is checked against loss.label_logps, the plain full-logits
definition. a and b are the chosen and rejected sequence log-probs, log P(y_w|x) and log P(y_l|x).
"""
import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F

from minorpo import loss
from minorpo.loss import (IGNORE_INDEX, LOGP_SUM_WARNING, chunked_label_logps, label_logps, log1mexp, log_odds,
                          odds_ratio_loss, orpo_objective, sequence_logps, sft_objective)

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


# ---- label log-probs from full logits ----

def test_label_logps_of_a_model_reads_the_next_token_and_zeroes_ignored_positions():
    # vocabulary of 2; logits [0, ln 3] give p = [1/4, 3/4], logits [ln 3, 0] give [3/4, 1/4]
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [ln3, 0.0], [0.0, 0.0]]], dtype=torch.float64)  # (1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    logps, mask = label_logps(logits[:, :-1], labels[:, 1:])  # position t predicts token t+1
    assert mask.tolist() == [[True, True]]
    torch.testing.assert_close(logps, torch.tensor([[math.log(3 / 4), math.log(1 / 4)]], dtype=torch.float64))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    logps, mask = label_logps(logits[:, :-1], labels[:, 1:])
    assert mask.tolist() == [[False, True]]
    assert logps.tolist() == [[0.0, pytest.approx(math.log(3 / 4))]]


def test_label_logps_of_bf16_logits_are_fp32():
    logps, _ = label_logps(torch.zeros(1, 2, 4, dtype=torch.bfloat16), torch.tensor([[1, 2]]))
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, torch.full((1, 2), -math.log(4)))


# ---- the odds-ratio loss, Eq. 4-10 ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [-0.01, -0.5, -1.0, -3.0, -20.0])
def test_equal_logps_give_log_odds_ratio_0_and_loss_ln2(a, dtype):
    # log OR = 0, so L_OR = -log sigma(0) = ln 2 whatever the odds
    losses, log_odds_ratio = odds_ratio_loss(*pair(a, a, dtype))
    assert log_odds_ratio.item() == 0.0
    assert abs(losses.item() - LN2) < 1e-6


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
    # Through the full-logits path: d L_OR / d theta = -delta(d) * h(d), with
    # delta = 1 / (1 + odds(y_w)/odds(y_l)) (Eq. 9), h = dlogP_w/(1 - P_w) - dlogP_l/(1 - P_l) (Eq. 10).
    # The paper's Eq. 8 writes delta * h; the minus of Eq. 7 (L_OR = -log sigma) was dropped there.
    torch.manual_seed(0)
    theta = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)  # logits: 2 responses x 5 tokens
    labels = torch.randint(0, 7, (2, 6))
    labels[:, 0] = IGNORE_INDEX  # the prompt

    def logps():
        return sequence_logps(*label_logps(theta[:, :-1], labels[:, 1:]))  # Eq. 3, (2,)

    losses, _ = odds_ratio_loss(logps()[:1], logps()[1:])
    (grad,) = torch.autograd.grad(losses.sum(), theta)
    a, b = (float(v) for v in logps().detach())
    grad_a = torch.autograd.grad(logps()[0], theta)[0]
    grad_b = torch.autograd.grad(logps()[1], theta)[0]
    delta = 1 / (1 + float(dec_odds(a) / dec_odds(b)))
    h = grad_a / (1 - math.exp(a)) - grad_b / (1 - math.exp(b))
    torch.testing.assert_close(grad, -delta * h, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(grad, delta * h)


def test_odds_ratio_loss_passes_gradcheck():
    a = torch.tensor([-0.05, -0.7, -2.0, -9.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.3, -0.69, -4.0, -1e-3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: odds_ratio_loss(a, b)[0], (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [-1e-2, -1e-4, -1e-6, -1e-8])
def test_chosen_gradient_matches_its_closed_form_and_tends_to_minus_odds_rejected(a, dtype):
    # dL/da = -odds_l / (odds_l (1 - P_a) + P_a), which tends to -odds(y_l) as a -> 0-, never inf.
    b = -1.0
    a_t, b_t = pair(a, b, dtype)
    odds_ratio_loss(a_t, b_t)[0].sum().backward()
    pa, odds_l = Decimal(a_t.item()).exp(), dec_odds(b)
    expected = float(-odds_l / (odds_l * (1 - pa) + pa))
    assert math.isfinite(b_t.grad.item())
    assert abs(a_t.grad.item() - expected) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert abs(expected - float(-odds_l)) < 1e-1


@pytest.mark.parametrize("value", ["loss", "log_odds_ratio", "chosen_grad", "rejected_grad"])
def test_response_with_probability_one_gives_finite_values(value):
    # A mean log-prob of exactly 0.0 happens in fp32 (every target logit far above the rest).
    a, b = pair(0.0, -1.0, torch.float32)
    losses, log_odds_ratio = odds_ratio_loss(a, b)
    losses.sum().backward()
    got = {"loss": losses, "log_odds_ratio": log_odds_ratio, "chosen_grad": a.grad, "rejected_grad": b.grad}
    assert torch.isfinite(got[value]).all()


def test_probability_one_has_log_odds_minus_log_of_the_smallest_normal_float():
    # log1mexp caps log P at -tiny, so log(1 - P) = log(tiny) = -87.34 in fp32: log odds = +87.34
    expected = -math.log(torch.finfo(torch.float32).tiny)
    assert abs(log_odds(torch.tensor(0.0)).item() - expected) < 1e-4


# ---- log1mexp ----

@pytest.mark.parametrize("x", [-0.1, -1e-4, -1e-8, -0.69, -0.70, -5.0, -50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log1mexp_value_and_gradient_match_high_precision(x, dtype):
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


CHOSEN, REJECTED = [-0.3, -1.2, -0.6], [-0.9, -1.5, -0.7, -1.1]


def or_loss_with_chosen_repeated(repeats, reduction):
    """L_OR when the chosen response is repeated `repeats` times: the same per-token mean, longer."""
    return orpo_objective(*rows_of(CHOSEN * repeats, REJECTED), 0.1, reduction)[1]["orpo_loss"]


def test_mean_orpo_loss_ignores_the_length_of_a_response():
    assert abs(or_loss_with_chosen_repeated(1, "mean") - or_loss_with_chosen_repeated(2, "mean")) < 1e-12


def test_sum_orpo_loss_changes_with_the_length_of_a_response():
    assert abs(or_loss_with_chosen_repeated(1, "sum") - or_loss_with_chosen_repeated(2, "sum")) > 0.1


SHORT, LONG = [-1.0] * 200, [-1.0] * 260  # equal quality: -1.0 per token


def test_sum_gives_the_shorter_chosen_answer_log_odds_ratio_60_and_no_loss():
    _, metrics = orpo_objective(*rows_of(SHORT, LONG), 0.1, "sum")
    assert abs(metrics["log_odds_ratio"] - 60) < 1e-9
    assert metrics["orpo_loss"] < 1e-25  # ln(1 + e^-60): no gradient


def test_sum_gives_the_longer_chosen_answer_log_odds_ratio_minus_60_and_loss_60():
    _, metrics = orpo_objective(*rows_of(LONG, SHORT), 0.1, "sum")
    assert abs(metrics["log_odds_ratio"] + 60) < 1e-9
    assert abs(metrics["orpo_loss"] - 60) < 1e-9


def test_mean_gives_answers_of_equal_quality_log_odds_ratio_0_and_loss_ln2():
    _, metrics = orpo_objective(*rows_of(LONG, SHORT), 0.1, "mean")
    assert abs(metrics["log_odds_ratio"]) < 1e-12
    assert abs(metrics["orpo_loss"] - LN2) < 1e-12


def test_sum_warning_names_the_setting_and_the_log_odds_ratio_of_60():
    assert "logp_reduction=sum" in LOGP_SUM_WARNING
    assert "log OR = +60 or -60" in LOGP_SUM_WARNING


def test_sequence_logps_sum_and_mean_by_hand():
    logps, mask = rows_of([-1.0, -2.0], [-3.0, -1.0, -2.0])
    assert sequence_logps(logps, mask, "sum").tolist() == [-3.0, -6.0]
    assert sequence_logps(logps, mask, "mean").tolist() == [-1.5, -2.0]


def test_orpo_metrics_by_hand():
    # pairs: (chosen -1, rejected -2) and (chosen [-2, -4] mean -3, rejected -1)
    logps, mask = rows_of([-1.0], [-2.0, -4.0], [-2.0], [-1.0])
    loss, metrics = orpo_objective(logps, mask, orpo_lambda=0.5)
    sft = (1 + 2 + 4) / 3  # chosen tokens only, token-weighted mean over the batch
    log_ors = [float(dec_log_odds(-1.0) - dec_log_odds(-2.0)), float(dec_log_odds(-3.0) - dec_log_odds(-1.0))]
    orpo = sum(math.log1p(math.exp(-log_or)) for log_or in log_ors) / 2
    assert abs(metrics["sft_loss"] - sft) < 1e-12
    assert abs(metrics["orpo_loss"] - orpo) < 1e-12
    assert abs(loss.item() - (sft + 0.5 * orpo)) < 1e-12
    assert abs(metrics["total_loss"] - loss.item()) < 1e-12
    assert abs(metrics["log_odds_ratio"] - sum(log_ors) / 2) < 1e-12
    assert metrics["pref_accuracy"] == 0.5
    assert metrics["chosen_logps"] == -2.0
    assert metrics["rejected_logps"] == -1.5
    assert not any(value.requires_grad for value in metrics.values())


def test_sft_is_a_token_weighted_mean_not_a_mean_of_sequence_means():
    # chosen rows of 1 token (-1) and 2 tokens (-2, -4): (1 + 2 + 4) / 3 = 2.333, not (1 + 3) / 2 = 2
    logps, mask = rows_of([-1.0], [-2.0, -4.0], [-2.0], [-1.0])
    assert abs(orpo_objective(logps, mask, 0.5)[1]["sft_loss"] - 7 / 3) < 1e-12
    assert abs(sft_objective(logps[:2], mask[:2])[1]["sft_loss"] - 7 / 3) < 1e-12


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
    """The definition the chunked head must reproduce: loss.label_logps of the full logits."""
    return label_logps((hidden @ weight.T)[:, :-1], labels[:, 1:])


@pytest.mark.parametrize("chunk_size", [1, 4, 4096])  # 4 does not divide the 9 label tokens
def test_chunked_head_agrees_with_full_logits_in_value_and_gradient(chunk_size):
    hidden, weight, labels = head_batch()  # fp32
    grad_out = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))  # any upstream gradient
    expected, expected_mask = full_logits_logps(hidden, weight, labels)
    expected_hidden_grad, expected_weight_grad = torch.autograd.grad((expected * grad_out).sum(), (hidden, weight))
    logps, mask = chunked_label_logps(hidden, weight, labels, chunk_size)
    hidden_grad, weight_grad = torch.autograd.grad((logps * grad_out).sum(), (hidden, weight))
    assert logps.dtype == torch.float32
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(logps, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden_grad, expected_hidden_grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight_grad, expected_weight_grad, rtol=1e-6, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_hidden_states_the_full_logits_one():
    hidden, weight, labels = head_batch()
    weight.requires_grad_(False)
    expected, _ = full_logits_logps(hidden, weight, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), hidden)
    logps, _ = chunked_label_logps(hidden, weight, labels, chunk_size=4)
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
        chunked_label_logps(hidden, weight, labels, chunk_size=64)
    assert 0 < sum(saved_bytes) < 200_000  # a fifth of the logits: checkpointing keeps each chunk's inputs only


def test_training_runs_the_definition_itself(monkeypatch):
    """The chunked head calls label_logps on each chunk's logits: a learner stepping through a training step
    meets the definition (one call per chunk in the forward, one more per chunk recomputed in the backward)."""
    hidden, weight, labels = head_batch()  # 9 label tokens
    calls = []
    monkeypatch.setattr(loss, "label_logps", lambda logits, targets: calls.append(tuple(logits.shape)) or
                        label_logps(logits, targets))
    chunked_label_logps(hidden, weight, labels, chunk_size=4)[0].sum().backward()
    assert calls[:3] == [(4, 11), (4, 11), (1, 11)]  # (chunk, vocabulary) in the forward
    assert sorted(calls[3:]) == sorted(calls[:3])  # each chunk recomputed once in the backward (the last first)


def test_chunked_head_passes_gradcheck():
    hidden, weight, labels = head_batch(torch.float64, width=3, vocab=6)
    assert torch.autograd.gradcheck(lambda hidden, weight: chunked_label_logps(hidden, weight, labels, chunk_size=2)[0],
                                    (hidden, weight))


def test_bf16_head_gives_fp32_logps_and_bf16_gradients_near_the_fp32_ones():
    hidden, weight, labels = head_batch()
    expected, _ = full_logits_logps(hidden, weight, labels)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    weight16 = weight.detach().bfloat16().requires_grad_()
    logps, _ = chunked_label_logps(hidden16, weight16, labels, chunk_size=4)
    logps.sum().backward()
    assert logps.dtype == torch.float32
    assert hidden16.grad.dtype == torch.bfloat16
    assert weight16.grad.dtype == torch.bfloat16
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
        return chunked_label_logps(hidden, self.head, labels, chunk_size=5)


def make_rows(specs, vocab=13):
    """Right-padded ids and labels from (prompt length, response length) per row."""
    g = torch.Generator().manual_seed(0)
    width = max(p + r for p, r in specs)
    ids = torch.zeros(len(specs), width, dtype=torch.long)
    labels = torch.full((len(specs), width), IGNORE_INDEX)
    for row, (prompt, response) in enumerate(specs):
        ids[row, :prompt + response] = torch.randint(1, vocab, (prompt + response,), generator=g)
        labels[row, prompt:prompt + response] = ids[row, prompt:prompt + response]
    return ids, labels


PAIRS = [((3, 2), (3, 5)), ((2, 6), (2, 1)), ((4, 3), (4, 3)), ((1, 1), (1, 7))]  # (chosen, rejected)


def pair_batch(pairs):
    """2P rows: the chosen rows of every pair, then the rejected rows in the same order."""
    return make_rows([c for c, _ in pairs] + [r for _, r in pairs])


def pair_rows(ids, labels, pair_indices, num_pairs):
    """The rows of some pairs out of a 2P-row batch: their chosen rows, then their rejected rows."""
    rows = list(pair_indices) + [num_pairs + i for i in pair_indices]
    return ids[rows], labels[rows]


def test_orpo_micro_batches_give_the_whole_batch_gradient_and_metrics():
    model = TinyCausalLM().double()
    params = list(model.parameters())
    ids, labels = pair_batch(PAIRS)
    whole_loss, whole_metrics = orpo_objective(*model(ids, labels), orpo_lambda=0.3)
    whole_grads = torch.autograd.grad(whole_loss, params)

    num_chosen_tokens = sum(chosen[1] for chosen, _ in PAIRS)  # 12, counted over the whole batch
    summed_grads = [torch.zeros_like(p) for p in params]
    summed_metrics = dict.fromkeys(whole_metrics, 0.0)
    mean_of_micro_means = 0.0
    for micro in ([0], [1, 2, 3]):  # uneven micro-batches: 1 pair, then 3
        logps, mask = model(*pair_rows(ids, labels, micro, len(PAIRS)))
        loss, metrics = orpo_objective(logps, mask, 0.3, num_chosen_tokens=num_chosen_tokens,
                                  num_pairs=len(PAIRS))
        for total, grad in zip(summed_grads, torch.autograd.grad(loss, params)):
            total += grad
        for name in metrics:
            summed_metrics[name] += metrics[name]
        mean_of_micro_means += orpo_objective(logps, mask, 0.3)[0].item() / 2  # the naive `loss / k`
    for got, want in zip(summed_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name in whole_metrics:
        assert abs(summed_metrics[name] - whole_metrics[name]) < 1e-12, name
    assert abs(mean_of_micro_means - whole_loss.item()) > 1e-3  # so the counts matter here


def test_sft_micro_batches_give_the_whole_batch_gradient_and_loss():
    model = TinyCausalLM().double()
    params = list(model.parameters())
    ids, labels = make_rows([(3, 2), (2, 6), (1, 1), (4, 3)])
    whole_loss, whole_metrics = sft_objective(*model(ids, labels))
    whole_grads = torch.autograd.grad(whole_loss, params)
    summed_grads = [torch.zeros_like(p) for p in params]
    summed_loss = 0.0
    for rows in ([0, 1, 2], [3]):
        loss, metrics = sft_objective(*model(ids[rows], labels[rows]), num_tokens=12)
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
    loss, metrics = orpo_objective(*model(ids, labels), orpo_lambda=0.3)
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

@pytest.mark.parametrize("function", ["orpo_loss", "sft_loss", "sequence_logps"])
def test_row_without_labels_raises_an_error_naming_the_row(function):
    logps, mask = rows_of([-1.0], [-2.0], [-1.5], [-0.5])
    mask[1] = False
    call = {"orpo_loss": lambda: orpo_objective(logps, mask, 0.1), "sft_loss": lambda: sft_objective(logps, mask),
            "sequence_logps": lambda: sequence_logps(logps, mask, "sum")}[function]
    with pytest.raises(ValueError, match=r"row 1 .*no label tokens.*data filter"):
        call()


def test_python_m_minorpo_loss_prints_the_docstring_table_from_the_code():
    table = loss._sum_versus_mean_table().splitlines()
    rows = {line.split("  ")[0]: line for line in table[1:]}
    assert "-0.459" in rows["log(1 - P)"] and "-0.541 and -0.541" in rows["log odds"]
    assert "-200.000 and -260.000" in rows["log odds"]
    assert "+60 (chosen 200) or -60" in rows["log OR"]
    assert "0.693 or 0.693" in rows["L_OR"] and "8.76e-27 or 60" in rows["L_OR"]
    assert "8.8e-27 (no gradient) or 60" in loss.__doc__  # the docstring quotes the same numbers
