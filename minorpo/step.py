"""One training step and one evaluation pass, shared by train.py and bench.py (the same code is timed).

    policy = Policy(model, chunk_size)               # (input_ids, labels) -> per-token log-probs
    metrics = train_step(policy, optimizer, micro_batches, objective, ...)

Decisions:
- Policy wraps the model and the response-only output head in one module whose forward() is the whole
  training forward pass, so DistributedDataParallel (which hooks forward) can wrap it.
- Gradient accumulation is exact: every micro-batch's loss is normalised by the chosen-token and pair
  counts of the whole optimizer batch (summed over micro-batches and data-parallel ranks), so the
  summed gradients equal those of one big batch (DESIGN.md). DDP averages gradients over ranks, so the
  loss is scaled by the world size to turn that average back into the sum.
- The guard: a non-finite loss or gradient norm skips the update (gradients are dropped), so weights are
  never touched by NaN; train.py counts the skips and stops after too many in a row.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from minorpo import loss as L


class Policy(nn.Module):
    """The model plus the response-only head: forward(input_ids, labels) -> (token_logps, mask), (N, T-1)."""

    def __init__(self, model, chunk_size=4096):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, labels):
        hidden = self.model.hidden_states(input_ids)  # (N, T, H)
        return L.chunked_label_logps(hidden, self.model.lm_head.weight, labels, self.chunk_size)


def adamw(trained, lr, weight_decay, fused):
    """AdamW over {name: parameter}: weight decay on matrices only, never on norms and biases (1-D)."""
    return torch.optim.AdamW([{"params": [p for p in trained.values() if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trained.values() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), fused=fused)


def all_reduce(x):
    """Sum x over the data-parallel ranks (in place); a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def batch_counts(micro_batches, objective):
    """(label tokens of the rows SFT trains on, pairs) summed over the micro-batches: a (2,) tensor."""
    tokens, pairs = 0, 0
    for b in micro_batches:
        n = b["labels"].shape[0] // 2 if objective == "orpo" else b["labels"].shape[0]
        tokens += int((b["labels"][:n, 1:] != L.IGNORE_INDEX).sum())
        pairs += n
    return torch.tensor([tokens, pairs], dtype=torch.float64)


def micro_loss(policy, batch, objective, orpo_lambda, reduction, num_tokens, num_pairs):
    """The loss of one micro-batch (normalised by whole-batch counts) and its additive metrics."""
    logps, mask = policy(batch["input_ids"], batch["labels"])
    if objective == "orpo":
        return L.orpo_loss(logps, mask, orpo_lambda, reduction, num_chosen_tokens=num_tokens, num_pairs=num_pairs)
    return L.sft_loss(logps, mask, num_tokens=num_tokens)


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(policy, optimizer, micro_batches, objective, orpo_lambda=None, reduction="mean",
               max_grad_norm=1.0, autocast=contextlib.nullcontext, device="cpu"):
    """Forward and backward over the micro-batches of one optimizer step, clip, guard, AdamW step.
    Returns the step's metrics (floats, summed over micro-batches and averaged over ranks) with
    `grad_norm` and `skipped` (1.0 when the update was dropped for a non-finite loss or gradient)."""
    num_tokens, num_pairs = all_reduce(batch_counts(micro_batches, objective).to(device)).tolist()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    totals = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # DDP: all-reduce gradients once, on the last micro-batch only
        sync = contextlib.nullcontext() if last or not hasattr(policy, "no_sync") else policy.no_sync()
        with sync:
            with autocast():
                loss, metrics = micro_loss(policy, _to(batch, device), objective, orpo_lambda, reduction,
                                           num_tokens, num_pairs)
            (loss * world).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    names = sorted(totals)
    values = all_reduce(torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=device)
                                      for k in names]))
    metrics = {k: v for k, v in zip(names, values.tolist())}  # sums over ranks of global-normalised parts
    metrics["grad_norm"] = grad_norm.item()
    ok = math.isfinite(metrics["grad_norm"]) and all(math.isfinite(v) for v in metrics.values())
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics["skipped"] = 0.0 if ok else 1.0
    return metrics


@torch.no_grad()
def evaluate(policy, batches, objective, orpo_lambda=None, reduction="mean", autocast=contextlib.nullcontext,
             device="cpu"):
    """Metrics over all the held-out batches, normalised over the whole held-out set."""
    was_training = policy.training
    policy.eval()
    num_tokens, num_pairs = batch_counts(batches, objective).tolist()  # this process's batches only
    totals = {}
    for batch in batches:
        with autocast():
            _, metrics = micro_loss(policy, _to(batch, device), objective, orpo_lambda, reduction,
                                    num_tokens, num_pairs)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    policy.train(was_training)
    return totals
