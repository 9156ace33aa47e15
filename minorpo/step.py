"""One optimizer step and one evaluation pass, shared by train.py and bench.py (the same code is timed).

train_step reads top to bottom: forward (label log-probs), loss (loss.py), backward, clip, guard, optimizer step.

Decisions:
- Gradient accumulation is exact: every micro-batch's loss is normalised by the chosen-token and pair counts
  of the whole optimizer batch (summed over micro-batches and ranks), so the summed gradients equal one big
  batch's; dividing each micro-batch's own mean by k would weigh a short micro-batch's tokens more. DDP and
  FSDP average gradients over ranks, so the loss is scaled by the world size to turn that back into the sum.
- The guard: a non-finite loss or gradient norm skips the update (gradients are dropped), so weights are
  never touched by NaN; train.py counts the skips and stops after too many in a row.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from minorpo import loss, packing


class ResponseLogps(nn.Module):
    """The model plus the response-only head: forward(input_ids, labels) -> (label log-probs, mask), (N, T-1).
    DDP wraps one module and prepares the gradient reduction in its forward(), so this forward() is the training
    pass: hidden states, then the head at label positions only (loss.chunked_label_logps), not the model's
    forward(), whose logits over the whole vocabulary the loss never needs."""

    def __init__(self, model, chunk_size=4096):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, labels, position_ids=None, doc=None, branch=None, index=None, prompt_labels=None):
        """The padded layout (input_ids (N, T)), or the packed one (input_ids (R, L) and the rest, from
        packing.pack); either way the label log-probs and mask come back in the padded layout (N, T-1).
        prompt_labels (loss.sft_tokens: prompt_and_response, batches.collate) are scored too: in the mask."""
        if prompt_labels is not None:
            labels = torch.where(prompt_labels != loss.IGNORE_INDEX, prompt_labels, labels)
        if doc is None:
            hidden = self.model.hidden_states(input_ids)  # (N, T, H)
        else:
            mask = packing.attention_mask(doc, branch)  # (R, 1, L, L): built once, shared by every layer
            hidden = self.model.hidden_states(input_ids, position_ids=position_ids, attn_mask=mask)  # (R, L, H)
        return loss.chunked_label_logps(hidden, self.model.lm_head.weight, labels, self.chunk_size, index)


def adamw(trained, lr, weight_decay, fused):
    """AdamW over {name: parameter}: weight decay on matrices only, never on norms and biases (1-D)."""
    return torch.optim.AdamW([{"params": [p for p in trained.values() if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trained.values() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), fused=fused)


def all_reduce(tensor):
    """Sum a tensor over the data-parallel ranks (in place); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def batch_counts(micro_batches, objective):
    """(tokens the NLL covers: labels, and prompt_labels if any, of its rows; pairs) over the micro-batches: (2,)."""
    num_tokens, num_pairs = 0, 0
    for batch in micro_batches:
        rows = len(batch["labels"]) // 2 if objective == "orpo" else len(batch["labels"])
        covered = batch["labels"][:rows, 1:] != loss.IGNORE_INDEX
        if "prompt_labels" in batch:  # loss.sft_tokens: prompt_and_response
            covered |= batch["prompt_labels"][:rows, 1:] != loss.IGNORE_INDEX
        num_tokens += int(covered.sum())
        num_pairs += rows
    return torch.tensor([num_tokens, num_pairs], dtype=torch.float64)


def train_step(scorer, optimizer, micro_batches, objective, orpo_lambda=None, reduction="mean", max_grad_norm=1.0,
               autocast=contextlib.nullcontext, device="cpu", sync=lambda last: contextlib.nullcontext()):
    """Forward and backward over the micro-batches of one optimizer step, clip, guard, AdamW step. Returns the
    whole batch's metrics (floats), `grad_norm`, and `skipped`: 1.0 when a non-finite value dropped the update."""
    num_tokens, num_pairs = all_reduce(batch_counts(micro_batches, objective).to(device)).tolist()
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sums = {}
    for index, batch in enumerate(micro_batches):
        with sync(last=index == len(micro_batches) - 1):  # DDP: all-reduce in the last backward (distributed.py)
            with autocast():  # forward, then the loss normalised by the whole batch's counts
                token_logps, scored = scorer(**{name: t.to(device) for name, t in batch.items()})  # (N, T-1) each
                mask = batch["labels"][:, 1:].to(device) != loss.IGNORE_INDEX  # the responses; scored adds prompts
                step_loss, metrics = (  # ... when loss.sft_tokens is prompt_and_response: for the NLL alone
                    loss.orpo_objective(token_logps, mask, orpo_lambda, reduction, num_tokens, num_pairs,
                                        sft_mask=scored[:len(scored) // 2])
                    if objective == "orpo" else loss.sft_objective(token_logps, scored, num_tokens))
            (step_loss * world_size).backward()  # backward: gradients add up over the micro-batches
        sums = {name: sums.get(name, 0.0) + value for name, value in metrics.items()}
    # clip the global gradient norm to max_grad_norm (0: measure it, clip nothing)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    names = sorted(sums)  # the same order on every rank
    summed = all_reduce(torch.stack([torch.as_tensor(sums[name], dtype=torch.float32, device=device)
                                     for name in names]))
    metrics = {**dict(zip(names, summed.tolist())), "grad_norm": grad_norm.item()}  # whole-batch values
    finite = all(math.isfinite(value) for value in metrics.values())  # the guard
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # a skipped step drops its gradients
    metrics["skipped"] = 0.0 if finite else 1.0
    return metrics


@torch.no_grad()
def evaluate(scorer, batches, objective, orpo_lambda=None, reduction="mean", autocast=contextlib.nullcontext,
             device="cpu"):
    """Metrics over all the held-out batches, normalised over the whole held-out set (this process's).
    Pairs also get pref_accuracy_longer and pref_accuracy_shorter: the preference accuracy over the pairs whose
    chosen answer has more (fewer) response tokens than the rejected one, when the set holds both kinds."""
    was_training = scorer.training
    scorer.eval()
    num_tokens, num_pairs = batch_counts(batches, objective).tolist()
    sums, by_length = {}, torch.zeros(4)  # right and all pairs with a longer chosen answer, then with a shorter one
    for batch in batches:
        with autocast():
            token_logps, mask = scorer(**{name: t.to(device) for name, t in batch.items()})
            _, metrics = (loss.orpo_objective(token_logps, mask, orpo_lambda, reduction, num_tokens, num_pairs)
                          if objective == "orpo" else loss.sft_objective(token_logps, mask, num_tokens))
        sums = {name: sums.get(name, 0.0) + float(value) for name, value in metrics.items()}
        if objective == "orpo":
            by_length += length_counts(token_logps, mask, reduction)
    scorer.train(was_training)
    if by_length[1] and by_length[3]:
        sums.update(pref_accuracy_longer=float(by_length[0] / by_length[1]),
                    pref_accuracy_shorter=float(by_length[2] / by_length[3]))
    return sums


def length_counts(token_logps, mask, reduction):
    """(right, all) pairs whose chosen answer is longer, then (right, all) whose chosen is shorter: a (4,) tensor.
    Right: log odds ratio > 0. Length bias shows as a gap between the two accuracies."""
    pairs = len(mask) // 2
    seq_logps = loss.sequence_logps(token_logps, mask, reduction)
    _, log_odds_ratio = loss.odds_ratio_loss(seq_logps[:pairs], seq_logps[pairs:])
    chosen_tokens, rejected_tokens = mask[:pairs].sum(1), mask[pairs:].sum(1)
    right = log_odds_ratio > 0
    longer, shorter = chosen_tokens > rejected_tokens, chosen_tokens < rejected_tokens
    return torch.stack([(right & longer).sum(), longer.sum(), (right & shorter).sum(), shorter.sum()]).float().cpu()
