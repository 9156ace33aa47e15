"""training.lr_schedule (the value at a step against its formula) and training.epochs (max_steps from passes)."""
import json
import math
import os

import pytest
from conftest import _run

from minorpo import batches, config, schedule, tiny
from minorpo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORPO = os.path.join(ROOT, "presets", "orpo.yml")


def cosine_before_lr_schedule(it, peak, warmup, max_steps, min_lr_ratio):
    """train.py's get_lr as it was before training.lr_schedule (commit d6cc264): cosine must stay exactly this."""
    floor = peak * min_lr_ratio
    if it < warmup:
        return peak * (it + 1) / warmup
    progress = (it - warmup) / max(1, max_steps - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - floor)


@pytest.mark.parametrize("it", [0, 1, 98, 199, 200, 201, 799, 5000])
def test_inverse_sqrt_is_lr_times_min_of_step_over_warmup_and_root_of_warmup_over_step(it):
    s = it + 1  # the step being taken, counted from 1
    expected = 5e-6 * min(s / 200, math.sqrt(200 / s))
    assert schedule.lr_at(it, "inverse_sqrt", 5e-6, 200, 10**6) == pytest.approx(expected, rel=1e-12)


def test_inverse_sqrt_by_hand_at_a_few_steps():
    lr = lambda it: schedule.lr_at(it, "inverse_sqrt", 1.0, 4, 100)  # noqa: E731
    assert [lr(0), lr(1), lr(3)] == [0.25, 0.5, 1.0]  # warm-up: 1/4, 2/4, 4/4
    assert lr(15) == pytest.approx(0.5)  # step 16: sqrt(4 / 16)
    assert lr(99) == pytest.approx(0.2)  # step 100: sqrt(4 / 100)


@pytest.mark.parametrize("warmup,max_steps,ratio", [(20, 400, 0.1), (0, 50, 0.0), (5, 5, 0.5), (100, 2000, 0.1)])
def test_cosine_is_what_it_was(warmup, max_steps, ratio):
    for it in range(0, max_steps + 3):
        assert schedule.lr_at(it, "cosine", 1e-3, warmup, max_steps, ratio) == pytest.approx(
            cosine_before_lr_schedule(it, 1e-3, warmup, max_steps, ratio), rel=1e-12, abs=0)


def test_constant_warms_up_then_holds():
    assert [schedule.lr_at(it, "constant", 2.0, 4, 10) for it in (0, 2, 3, 4, 9, 50)] == [0.5, 1.5, 2.0, 2.0, 2.0, 2.0]
    assert schedule.lr_at(0, "constant", 2.0, 0, 10) == 2.0


def test_inverse_sqrt_without_warmup_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"training\.warmup_steps` of at least 1.*training\.warmup_steps=200"):
        config.load(ORPO, ["training.lr_schedule=inverse_sqrt", "training.warmup_steps=0"])
    with pytest.raises(ConfigError, match="`training.lr_schedule` must be one of cosine | inverse_sqrt | constant"):
        config.load(ORPO, ["training.lr_schedule=linear"])


@pytest.mark.parametrize("bad", ["0", "-1", ".inf", "2000000"])
def test_epochs_must_be_positive_and_finite(bad):
    with pytest.raises(ConfigError, match=r"`training\.epochs` must be in \(0, 1000000\]"):
        config.load(ORPO, [f"training.epochs={bad}"])


def loop_epochs(num_batches, accum, max_steps):
    """(the epochs it took batches from, the position in the last) after max_steps steps of train.py's loop over
    epochs of num_batches micro-batches."""
    epoch, position, used = 0, 0, set()
    for _ in range(max_steps):
        if position + accum > num_batches:  # with fewer than accum batches an epoch, even epoch 0 is skipped
            epoch, position = epoch + 1, 0
        position += accum
        used.add(epoch)
    return len(used), position


@pytest.mark.parametrize("pairs,batch_size,world,accum", [(45, 4, 1, 2), (33, 4, 2, 3), (100, 8, 4, 1), (7, 4, 1, 5),
                                                          (17, 2, 8, 1)])
def test_whole_epochs_end_where_the_loop_would_start_the_next(pairs, batch_size, world, accum):
    order = batches.batch_order([10] * pairs, batch_size * world, 0, 0, True, ranks=world)  # short last one dropped
    for epochs in (1, 2, 3):
        steps = schedule.max_steps_for_epochs(epochs, len(order), accum)
        passes, position = loop_epochs(len(order), accum, steps)
        assert passes == epochs, (epochs, steps)  # as many epochs as asked for...
        assert position + accum > len(order)  # ...the last one whole: the next step would start another


def test_a_fraction_of_an_epoch_rounds_the_steps_up():
    assert schedule.max_steps_for_epochs(1.5, 12, 2) == 9  # 6 steps an epoch
    assert schedule.max_steps_for_epochs(0.1, 30, 1) == 3  # not 4 (0.1 x 30 is 3.0000000000000004 in floats)
    assert schedule.max_steps_for_epochs(0.01, 12, 2) == 1


def test_epochs_set_the_steps_a_run_takes_and_resume_keeps_them(tmp_path):
    data = tiny.ensure_pairs(str(tmp_path / "data" / "pairs.jsonl"), n=50)  # 45 training pairs, 5 held out
    common = [os.path.join(ROOT, "train.py"), ORPO, f"output_dir={tmp_path}", f"data.path={data}",
              "training.batch_size=4", "training.grad_accum_steps=2", "training.epochs=1.5", "training.max_steps=400",
              "training.log_every=3", "training.eval_every=0", "training.save_every=4", "sample.max_new_tokens=4"]
    p = _run(common + ["run_name=through"])
    assert p.returncode == 0, p.stderr[-3000:]
    # 45 pairs: 12 micro-batches of 4 (the last holds 1), 2 a step: 6 steps an epoch, 1.5 epochs: 9 steps
    line = next(line for line in p.stdout.splitlines() if line.startswith("[schedule]"))
    assert line.startswith("[schedule] training.epochs=1.5: 9 optimizer steps = ceil(1.5 x 6 steps an epoch; "
                           "45 training pairs in 12 micro-batches")
    assert line.endswith("this replaces training.max_steps=400")
    with open(tmp_path / "through" / "step_000009" / "state.json") as f:
        state = json.load(f)
    assert (state["step"], state["epoch"], state["position"]) == (9, 1, 6)  # the second epoch half done
    p = _run(common + ["run_name=resumed", f"training.resume_from={tmp_path / 'through' / 'step_000004'}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "continuing at step 4 of 9" in p.stdout
    weights = [open(tmp_path / run / "final" / "model.safetensors", "rb").read() for run in ("through", "resumed")]
    assert weights[0] == weights[1]


def test_the_new_keys_that_change_the_trajectory_are_in_the_resume_fingerprint():
    from minorpo import runs
    fingerprint = runs.trajectory(config.flat(config.load(ORPO)), [], {}, 1)
    for key in ("loss.sft_tokens", "training.lr_schedule", "training.warmup_steps", "data.overlong"):
        assert key in fingerprint, key  # a resume that changes one is refused
    assert "training.epochs" not in fingerprint and "training.max_steps" not in fingerprint  # the length may change
