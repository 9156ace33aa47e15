"""Run folders in-process: what recover() cleans after a kill, and what it and check_run_folder leave alone."""
import os

import pytest

from minorpo import runs
from minorpo.files import UserError


def make(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_recover_finishes_a_folder_swap_and_removes_temporaries_only(tmp_path):
    run = str(tmp_path / "run")
    make(f"{run}/.final.0123abcd.old/model.safetensors", "old final")  # killed between the two renames
    make(f"{run}/.step_000004.89abcdef.tmp/state.json")  # killed while writing a checkpoint
    make(f"{run}/metrics.jsonl.0badf00d.tmp")  # killed inside atomic_write
    make(f"{run}/notes.0123abcd.tmp", "the user's")  # not a name minorpo writes
    make(f"{run}/.cache.0123abcd.tmp/x", "the user's")
    os.symlink(str(tmp_path), f"{run}/.step_000009.0123abcd.tmp")
    lines = runs.recover(run)
    assert open(f"{run}/final/model.safetensors").read() == "old final"
    assert not os.path.exists(f"{run}/.step_000004.89abcdef.tmp")
    assert not os.path.exists(f"{run}/metrics.jsonl.0badf00d.tmp")
    assert os.path.exists(f"{run}/notes.0123abcd.tmp") and os.path.exists(f"{run}/.cache.0123abcd.tmp/x")
    assert os.path.islink(f"{run}/.step_000009.0123abcd.tmp") and os.path.isdir(str(tmp_path))
    assert len(lines) == 3 and "restored" in lines[0]


def test_a_symlinked_checkpoint_is_not_a_checkpoint(tmp_path):
    make(str(tmp_path / "elsewhere" / "state.json"))
    make(str(tmp_path / "run" / "step_000001" / "state.json"))
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "run" / "step_000002"))
    assert runs.checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "step_000001")]


def test_a_run_folder_that_is_a_link_is_refused(tmp_path):
    os.makedirs(tmp_path / "real")
    os.symlink(str(tmp_path / "real"), str(tmp_path / "run"))
    with pytest.raises(UserError, match="symbolic link"):
        runs.check_run_folder(str(tmp_path / "run"), None, str(tmp_path / "model"), [])


def test_a_metrics_line_nested_too_deep_is_dropped_not_a_traceback(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    make(path, '{"step": 1}\n' + "[" * 100000 + "\n" + '{"step": 2}\n{"step": 3}\n')
    warnings = runs.MetricsLog(path, "orpo").keep_up_to(2)
    assert len(warnings) == 1 and ":2:" in warnings[0]
    assert open(path).read() == '{"step": 1}\n{"step": 2}\n'


def test_checkpoints_are_ordered_by_step_and_rotation_keeps_the_newest(tmp_path):
    run = str(tmp_path / "run")
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        make(f"{run}/step_{step:06d}/state.json")
    assert [os.path.basename(p) for p in runs.checkpoints(run)] == \
        ["step_999998", "step_999999", "step_1000000", "step_1000001"]
    runs.rotate(run, 2)
    assert sorted(os.listdir(run)) == ["step_1000000", "step_1000001"]  # no temporary name left either


def test_recover_removes_a_checkpoint_whose_deletion_was_killed_and_names_a_foreign_one(tmp_path):
    run = str(tmp_path / "run")
    make(f"{run}/step_000002/weights.safetensors")  # rmtree killed after state.json went
    make(f"{run}/step_000003/optimizer.safetensors")
    make(f"{run}/step_000003/notes.txt", "the user's")
    make(f"{run}/step_000004/state.json")
    lines = runs.recover(run)
    assert sorted(os.listdir(run)) == ["step_000003", "step_000004"]
    assert os.path.exists(f"{run}/step_000003/notes.txt")
    assert len(lines) == 2 and "step_000002" in lines[0] and "no state.json" in lines[1] and "step_000003" in lines[1]
