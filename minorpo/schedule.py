"""How long a run lasts and how fast it learns: training.epochs -> max_steps, and the learning rate at a step.

With s = it + 1 the number of the step being taken (1, 2, ...), w = training.warmup_steps, N = max_steps and
lr = training.learning_rate, every schedule warms up linearly, then (training.lr_schedule):

    warm-up        lr * s / w                                          while s <= w (all three)
    cosine         floor + (lr - floor) * (1 + cos(pi * p)) / 2          p = (s - 1 - w) / max(1, N - w), at most 1;
                                                                       floor = lr * min_lr_ratio
    inverse_sqrt   lr * min(s / w, sqrt(w / s))                        the paper's (ORPO, arXiv:2403.07691, and the
                                                                       authors' xfactlab/orpo: Hugging Face's
                                                                       inverse_sqrt with timescale w); needs w >= 1
    constant       lr * min(1, s / w)

Counting steps from 1 means the first update already moves (lr * 1 / w), where Hugging Face's schedulers give
the first step lr 0; from then on the two agree, one step apart.
"""
import math

SCHEDULES = ("cosine", "inverse_sqrt", "constant")


def lr_at(it, schedule, peak, warmup, max_steps, min_lr_ratio=0.0):
    """The learning rate of optimizer step `it` (0-based: the step about to be taken), by the formulas above."""
    s = it + 1
    if schedule not in SCHEDULES:
        raise ValueError(f"training.lr_schedule must be one of {' | '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "inverse_sqrt":
        return peak * min(s / warmup, math.sqrt(warmup / s))
    if s <= warmup:  # linear warm-up
        return peak * s / warmup
    if schedule == "constant":
        return peak
    floor = peak * min_lr_ratio
    progress = min(1.0, (s - 1 - warmup) / max(1, max_steps - warmup))  # cosine, 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def steps_per_epoch(num_batches, accum):
    """Optimizer steps the loop takes from one epoch's order of `num_batches` global micro-batches: it starts a new
    epoch when fewer than `accum` are left (they are not used), or takes all of them if there are fewer from the
    start (train.py's loop)."""
    return max(1, num_batches // accum)


def max_steps_for_epochs(epochs, num_batches, accum):
    """training.epochs as optimizer steps: ceil(epochs x steps_per_epoch), at least 1."""
    return max(1, math.ceil(epochs * steps_per_epoch(num_batches, accum) - 1e-9))


def epochs_line(epochs, max_steps, pairs, num_batches, batch_size, world, accum, old_max_steps):
    """The log line that says what training.epochs made of max_steps, and that it replaces training.max_steps."""
    per_step = batch_size * world * accum
    return (f"[schedule] training.epochs={epochs:g}: {max_steps:,} optimizer steps = ceil({epochs:g} x "
            f"{steps_per_epoch(num_batches, accum):,} steps an epoch; {pairs:,} training pairs in {num_batches:,} "
            f"micro-batches of batch_size {batch_size} x {world} process{'es' * (world > 1)}, {accum} a step, "
            f"{per_step:,} pairs a step); this replaces training.max_steps={old_max_steps:,}")
