"""Data parallel: torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import _run, random_tiny_base
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["training.max_steps=4", "training.grad_accum_steps=2", "training.log_every=1", "training.eval_every=2",
          "training.learning_rate=1e-3", "training.phases=[{step: 0, trainable: [all]}]",  # full FT unless a test says
          "training.warmup_steps=1", "sample.max_new_tokens=4"]


def run(out, nproc, *overrides):
    """train.py under torchrun with nproc processes, or alone (nproc 1, as conftest runs entry points)."""
    args = [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "presets", "orpo.yml"), f"output_dir={out}", *COMMON,
            f"model_name={random_tiny_base()}", *overrides]
    if nproc == 1:
        p = _run(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def weights(folder):
    return load_file(os.path.join(folder, "final", "model.safetensors"))


def train_rows(run_dir, every=False):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows if every else [r for r in rows if "train/tokens" in r]


def assert_close(a, b, atol=1e-4):
    """Weights after a few AdamW steps. AdamW divides each gradient by sqrt(its second moment) + 1e-8, so an element
    whose gradient is near 0 turns a rounding difference of the summation order (ranks add in another order) into
    an update difference of up to the learning rate; 1e-4 bounds that over these 4 steps at lr 1e-3 (1.8e-5 seen).
    A wrong normalisation shows in the losses, which the tests compare at 1e-5."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    run(tmp_path, 1, "training.batch_size=8", "run_name=single")
    stdout = run(tmp_path, 2, "training.batch_size=4", "run_name=ddp")
    assert_close(weights(tmp_path / "single"), weights(tmp_path / "ddp"))
    # each rank took its own half of every batch: together they saw exactly the single run's tokens
    single, ddp = train_rows(tmp_path / "single"), train_rows(tmp_path / "ddp")
    assert [r["train/tokens"] for r in ddp] == [r["train/tokens"] for r in single]
    assert all(r["train/tokens"] > 0 for r in ddp)
    for a, b in zip(single, ddp):  # metrics are summed over ranks: the same numbers
        assert a["train/total_loss"] == pytest.approx(b["train/total_loss"], rel=1e-5, abs=1e-5)
    # only rank 0 logs and writes: one log line and one metrics row per step, one final folder
    assert stdout.count("step     3 |") == 1
    assert len(ddp) == 4
    assert len(train_rows(tmp_path / "ddp", every=True)) == 5  # plus the step-0 evaluation
    assert sorted(os.listdir(tmp_path / "ddp")) == ["config.yml", "final", "metrics.jsonl", "metrics.svg"]


def test_resumed_two_process_run_continues_exactly(tmp_path):
    run(tmp_path, 2, "training.batch_size=4", "training.save_every=2", "run_name=through")
    stdout = run(tmp_path, 2, "training.batch_size=4", "run_name=resumed",
                 f"training.resume_from={tmp_path / 'through' / 'step_000002'}")
    assert "continuing at step 2" in stdout
    assert_close(weights(tmp_path / "through"), weights(tmp_path / "resumed"), atol=0)


def test_a_last_batch_smaller_than_the_ranks_is_dropped(tmp_path):
    from minorpo import tiny
    # 13 pairs in global batches of 2 x 2 ranks: the last batch holds 1 pair, too few for 2 ranks
    path = tiny.ensure_pairs(str(tmp_path / "pairs.jsonl"), n=13)
    run(tmp_path, 2, f"data.path={path}", "data.eval_fraction=0", "training.batch_size=2",
        "training.grad_accum_steps=1", "training.max_steps=8", "run_name=short")  # over 2 epochs
    assert [r["train/tokens"] > 0 for r in train_rows(tmp_path / "short")] == [True] * 8
