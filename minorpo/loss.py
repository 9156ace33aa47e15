"""The ORPO and SFT losses as the paper writes them, from the log-probabilities of the label tokens.

Reference: Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
Model", arXiv:2403.07691. The equations, in the order the code computes them (y_w: the chosen answer,
y_l: the rejected one, x: the prompt; m: an answer's number of tokens):

    log p(y_t | x, y<t) = log_softmax(logits_t)[y_t]                  label_logps (the definition)
    log P(y|x)    = (1/m) sum_t log p(y_t | x, y<t)          Eq. 3    sequence_logps ("mean"; or "sum")
    odds(y|x)     = P(y|x) / (1 - P(y|x))                    Eq. 4    log_odds: log P - log(1 - P),
                                                                      with log(1 - P) = log1mexp(log P)
    log OR        = log odds(y_w|x) - log odds(y_l|x)        Eq. 5    odds_ratio_loss
    L_OR          = -log sigma(log OR)                       Eq. 7    odds_ratio_loss
    L_SFT         = -(sum of log p(y_w,t | x, y_w,<t) over the chosen tokens) / (their count)
                                                             Eq. 2    orpo_objective
    L_ORPO        = L_SFT + lambda * L_OR                    Eq. 6    orpo_objective (sft_objective: L_SFT alone)

The gradient of L_OR is Eq. 8-10 (see odds_ratio_loss). Metric names (metrics.jsonl): sft_loss = L_SFT,
orpo_loss = L_OR (EulerForge's names), total_loss = L_ORPO, log_odds_ratio = the mean log OR.

Training computes label_logps too, through chunked_label_logps: the output head only at the label
positions, a chunk of tokens at a time, each chunk under activation checkpointing (see there).

Decisions:
- L_SFT is the NLL of the chosen response only: prompt tokens and the rejected response are masked
  (training on rejected answers would teach bad answers). How it averages, and why: orpo_objective.
  loss.sft_tokens: prompt_and_response adds the chosen row's prompt tokens to it (TRL's nll_loss, the
  authors' code); L_OR always compares the responses alone.
- The normalisers are passed in: the NLL is divided by the chosen-token count of the whole optimizer
  batch, L_OR by its pair count, so micro-batch losses and metrics SUM to the whole batch's (step.py).
- A row without label tokens is an error, not a NaN: the data module filters such rows, and a mean
  over zero tokens is 0/0, whose NaN gradient would ruin the weights.

Sum versus mean (loss.logp_reduction). Two answers of equal quality, -1.0 per token, 200 and 260
tokens long (`python -m minorpo.loss` computes this table with the functions below):

                      mean (the paper, Eq. 3, default)     sum (the teaching contrast)
    log P (200 tok)   -1.0, P = 0.37                       -200, P = e^-200 (about 1e-87)
    log(1 - P)        -0.459                               -1e-87: 0 in fp32, nothing beside -200 in fp64
    log odds          -0.541 (for both answers)            -200 and -260: odds = P, no odds left
    log OR            0                                    +60 or -60, by length alone
    L_OR              ln 2 = 0.693, a useful gradient      8.8e-27 (no gradient) or 60 (be shorter)

With the sum the odds ratio collapses into a likelihood ratio that punishes length; with the mean
it compares per-token quality, which is what the paper means by "odds of generating y".
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minorpo.batches import IGNORE_INDEX  # -100: the label of a position that is not trained

LOGP_SUM_WARNING = (
    "loss.logp_reduction=sum: sequence log-probs are sums over the response, not the paper's "
    "per-token mean (Eq. 3). Then P(y|x) is astronomically small (200 tokens at -1.0 each: "
    "P = e^-200), log(1 - P) = 0, and the odds ratio collapses into a likelihood ratio that "
    "punishes length: two answers of equal per-token quality, 200 and 260 tokens long, get "
    "log OR = +60 or -60, so L_OR is about 0 (no gradient) or about 60 (a push towards shorter "
    "answers). This is the teaching contrast; use logp_reduction=mean to train.")


def _at_least_fp32(dtype):
    return torch.promote_types(dtype, torch.float32)  # bf16 -> fp32; fp64 (gradcheck) stays fp64


def label_logps(logits, labels):
    """log p(label) of every label under the logits that predict it: the definition.

    logits (..., V) and labels (...), aligned: logits[..., t, :] scores labels[..., t], IGNORE_INDEX where
    nothing is trained. For a model's logits (N, T, V) and labels (N, T), position t predicts token t+1:
    label_logps(logits[:, :-1], labels[:, 1:]). Returns logps (...), at least fp32, 0 where ignored, and
    mask (...) bool."""
    mask = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits.to(_at_least_fp32(logits.dtype)), dim=-1)  # (..., V)
    logps = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # the label's log-prob
    return logps.masked_fill(~mask, 0.0), mask


def _check_every_row_has_labels(mask):
    """Raise a ValueError naming the first row of mask (N, T-1) that has no label token."""
    has_labels = mask.any(dim=1)
    if not has_labels.all():  # one device sync per step; correctness first
        row = int((~has_labels).nonzero()[0])
        raise ValueError(
            f"row {row} of the batch has no label tokens (its response is empty or was truncated "
            f"away); the data filter should have removed it. A mean over zero tokens is NaN.")


def sequence_logps(token_logps, mask, reduction="mean"):
    """Per-sequence log-prob of the response, (N, T-1) -> (N,). "mean" is the paper's length-normalised
    log P (Eq. 3); "sum" the plain log-likelihood, kept to show why the paper normalises (see above)."""
    _check_every_row_has_labels(mask)
    # Eq. 3: log P(y|x) = (1/m) sum_t log p(y_t | x, y<t) over the m response tokens
    summed = (token_logps * mask).sum(dim=1)
    if reduction == "sum":
        return summed
    if reduction == "mean":
        return summed / mask.sum(dim=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def log1mexp(x):
    """log(1 - e^x) for x < 0, accurate everywhere (Maechler 2012, "Accurately Computing log(1-exp(-|a|))").

    Near 0, 1 - e^x cancels: log(-expm1(x)) keeps its digits (naive log1p(-exp(x)) is -inf in fp32 for
    every x > -3e-8). Far from 0, e^x is small and log1p(-e^x) is exact; the switch is at -ln 2. Each
    branch sees a clamped input, so the branch torch.where discards makes no inf whose gradient (0 * inf)
    would be NaN. x is capped at minus the smallest normal float, so log1mexp(0) is finite (log_odds).
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    return torch.where(near_zero,
                       torch.log(-torch.expm1(x.clamp(min=-math.log(2)))),
                       torch.log1p(-torch.exp(x.clamp(max=-math.log(2)))))


def log_odds(seq_logps):
    """log odds(y|x) from log P(y|x), elementwise."""
    # Eq. 4: odds(y|x) = P / (1 - P), so log odds = log P - log(1 - P).
    # P = 1 exactly (mean log-prob 0.0: fp32 gets there when every target logit is far above the rest)
    # means log(1 - P) = log1mexp(0) = -inf, log odds +inf and a NaN gradient. log1mexp caps its input
    # at -1.2e-38 (fp32's smallest normal float), so log(1 - P) is about -87, the log odds about +87.
    return seq_logps - log1mexp(seq_logps)


def odds_ratio_loss(chosen_logps, rejected_logps):
    """L_OR per pair and the log odds ratio per pair, from (P,) sequence log-probs each.

    The gradient is dL_OR = -delta(d) * h(d) with delta(d) = 1 / (1 + odds(y_w)/odds(y_l)) and
    h(d) = dlog P(y_w) / (1 - P(y_w)) - dlog P(y_l) / (1 - P(y_l)) (Eq. 8-10). The paper writes Eq. 8
    as delta * h: its appendix derivation drops the minus of Eq. 7's -log sigma. 1/(1-P) grows as
    P -> 1, but delta falls as fast, so the gradient stays finite: dL_OR / dlog P(y_w) -> -odds(y_l).
    """
    # Eq. 5: log OR = log odds(y_w|x) - log odds(y_l|x)
    log_odds_ratio = log_odds(chosen_logps) - log_odds(rejected_logps)
    # Eq. 7: L_OR = -log sigma(log OR); logsigmoid is stable for either sign
    return -F.logsigmoid(log_odds_ratio), log_odds_ratio


def orpo_objective(token_logps, mask, orpo_lambda, reduction="mean", num_chosen_tokens=None,
              num_pairs=None, sft_mask=None):
    """The ORPO objective (Eq. 6) over 2P rows: P chosen rows, then the P rejected rows in the same order.

    token_logps (2P, T-1) and mask (2P, T-1) as label_logps returns them, mask the response tokens. sft_mask
    (P, T-1): the chosen tokens L_SFT covers, mask[:P] (the chosen responses) unless given (loss.sft_tokens:
    prompt_and_response passes the prompt tokens too, token_logps holding theirs). num_chosen_tokens and
    num_pairs are the counts of the whole optimizer batch (all micro-batches; all ranks if the
    gradients are summed over ranks); they default to this batch's own counts. Returns the loss
    (a scalar with gradient) and detached scalar metrics, each normalised by those counts so that
    summing a metric over the micro-batches gives the whole batch's value:
      sft_loss        sum of the NLL over sft_mask / num_chosen_tokens
      orpo_loss       sum of L_OR / num_pairs
      total_loss      sft_loss + orpo_lambda * orpo_loss
      log_odds_ratio  sum of log OR / num_pairs (the mean log odds ratio)
      pref_accuracy   count of pairs with log OR > 0 / num_pairs
      chosen_logps    sum of the chosen sequence log-probs / num_pairs (same for rejected_logps)
    """
    if token_logps.shape[0] % 2:
        raise ValueError(f"expected chosen rows then rejected rows, got an odd {token_logps.shape[0]} rows")
    pairs = token_logps.shape[0] // 2
    seq_logps = sequence_logps(token_logps, mask, reduction)  # (2P,)
    chosen_logps, rejected_logps = seq_logps[:pairs], seq_logps[pairs:]
    chosen_mask = mask[:pairs] if sft_mask is None else sft_mask  # the chosen tokens L_SFT covers
    num_chosen_tokens = chosen_mask.sum() if num_chosen_tokens is None else num_chosen_tokens
    num_pairs = pairs if num_pairs is None else num_pairs

    # L_SFT = -(sum of log p(y_w,t | x, y_w,<t) over every chosen token of the batch) / (their count).
    # The paper's Eq. 2 averages over each sequence's tokens, then (Eq. 6's expectation) over sequences,
    # so every answer weighs the same. This is a token-weighted mean over the batch, the usual causal-LM
    # loss, in which a long answer weighs more; its numerator and denominator are plain sums, which is
    # what makes gradient accumulation and DDP exact. TRL's ORPOTrainer also counts the prompt tokens
    # in its NLL, as does the paper's code unless --disable_prompt_loss is set: loss.sft_tokens.
    sft = -(token_logps[:pairs] * chosen_mask).sum() / num_chosen_tokens
    or_losses, log_odds_ratio = odds_ratio_loss(chosen_logps, rejected_logps)
    orpo = or_losses.sum() / num_pairs
    # Eq. 6: L_ORPO = L_SFT + lambda * L_OR
    total = sft + orpo_lambda * orpo
    metrics = {
        "sft_loss": sft, "orpo_loss": orpo, "total_loss": total,
        "log_odds_ratio": log_odds_ratio.sum() / num_pairs,
        "pref_accuracy": (log_odds_ratio > 0).sum() / num_pairs,
        "chosen_logps": chosen_logps.sum() / num_pairs,
        "rejected_logps": rejected_logps.sum() / num_pairs,
    }
    return total, {name: value.detach() for name, value in metrics.items()}


def sft_objective(token_logps, mask, num_tokens=None):
    """orpo_objective's token-weighted L_SFT over every row (training.type sft); num_tokens as there.
    Returns the loss and detached metrics sft_loss and total_loss (the same: there is no second term)."""
    _check_every_row_has_labels(mask)
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    loss = -(token_logps * mask).sum() / num_tokens
    return loss, {"sft_loss": loss.detach(), "total_loss": loss.detach()}


# ---- The output head at label positions only, a chunk of tokens at a time ----

def _chunk_logps(hidden_rows, head_weight, targets):
    """label_logps of one chunk: hidden_rows (C, H) @ head_weight.T are its logits (C, V), the one big tensor."""
    return label_logps(hidden_rows @ head_weight.T, targets)[0]  # (C,)


def chunked_label_logps(hidden, head_weight, labels, chunk_size=4096, index=None):
    """label_logps(hidden[:, :-1] @ head_weight.T, labels[:, 1:]), the head computed only where a label is set.

    hidden (N, T, H) final hidden states, head_weight (V, H), labels (N, T). Returns logps (N, T-1), at least
    fp32, 0 where ignored, and mask (N, T-1) bool. Gradients reach hidden, and head_weight when it trains.
    The packed layout (minorpo/packing.py): hidden is (R, L, H) and index (N, T) names the flat position in
    it of each token of labels' layout.

    Why chunks under checkpointing: full logits for 16 rows x 1024 tokens x Qwen's 151,936-token vocabulary
    are 10 GB in fp32. Only response tokens need the head (a quarter to a half of a batch), and each chunk of
    them runs the definition under activation checkpointing: its (chunk, V) logits are freed after the forward
    and recomputed in the backward, so the head's memory is a few chunks whatever the batch size.
    What a hand-written backward (softmax - onehot, computed in place: minorpo before this design) would save,
    measured on the CPU with `python bench.py --shape tiny-qwen-vocab` (Qwen's 151,936-token vocabulary on
    tiny layers, so the head is most of the step; one chunk of 340 tokens): 0.85 s instead of 1.14 s a LoRA
    step and 1.11 s instead of 1.53 s a full one (about 1.35x), and one chunk of fp32 logits less at the peak
    (about 200 MB here: the log-softmax keeps its own copy). Lower loss.head_chunk_size to win the memory back.
    On the real step the head is a smaller share, and the definition a learner reads is the one that trains.
    """
    labels = labels[:, 1:]  # (N, T-1): position t predicts token t+1
    mask = labels != IGNORE_INDEX
    if index is None:
        hidden_rows = hidden[:, :-1][mask]  # (M, H), M = number of label tokens
    else:  # each label token is predicted from its predecessor in its own branch: index[:, :-1]
        hidden_rows = hidden.flatten(0, 1)[index[:, :-1][mask]]  # (M, H)
    targets = labels[mask]  # (M,)
    logps = torch.cat([checkpoint(_chunk_logps, hidden_rows[start:start + chunk_size], head_weight,
                                  targets[start:start + chunk_size], use_reentrant=False)
                       for start in range(0, max(1, len(targets)), chunk_size)])  # (M,); one empty chunk if M = 0
    return logps.new_zeros(mask.shape).masked_scatter(mask, logps), mask


def _sum_versus_mean_table():
    """The docstring's table, computed by the functions above: two answers at -1.0 a token, 200 and 260 long."""
    mask = torch.arange(260)[None] < torch.tensor([[200], [260]])  # (2, 260): the 200-token answer, the 260-token one
    token_logps = torch.full((2, 260), -1.0) * mask
    lines = [f"{'':18}{'mean (the paper, Eq. 3)':<36}sum"]
    cells = {}
    for reduction in ("mean", "sum"):
        seq = sequence_logps(token_logps, mask, reduction)  # (2,)
        for_short, for_long = odds_ratio_loss(seq[:1], seq[1:]), odds_ratio_loss(seq[1:], seq[:1])
        cells[reduction] = [f"{seq[0]:.1f} (200 tok), {seq[1]:.1f} (260 tok)",
                            f"{log1mexp(seq[0]):.3g} (200 tok)",
                            f"{log_odds(seq[0]):.3f} and {log_odds(seq[1]):.3f}",
                            f"{for_short[1].item():+.3g} (chosen 200) or {for_long[1].item():+.3g}",
                            f"{for_short[0].item():.3g} or {for_long[0].item():.3g}"]
    for i, name in enumerate(("log P", "log(1 - P)", "log odds", "log OR", "L_OR")):
        lines.append(f"{name:<18}{cells['mean'][i]:<36}{cells['sum'][i]}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m minorpo.loss: the sum-versus-mean table in fp32, as training computes it
    print(_sum_versus_mean_table())
