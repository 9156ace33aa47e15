"""FSDP2 (training.fsdp=true): torchrun with 2 CPU processes (gloo) equals one process with the same global
batch, for full fine-tuning and LoRA; a resumed sharded run continues exactly; one dead rank stops them all."""
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import _run, seed_tiny_base
from safetensors.torch import load_file
from test_ddp import COMMON, ROOT, assert_close, run, train_rows, weights

LORA = "training.phases=[{step: 0, trainable: [lora, attn_lora]}]"


def memory(stdout):
    """{rank: (parameters, gradients, AdamW) MiB} from the [memory] lines."""
    return {int(m[1]): tuple(map(float, m.groups()[2:]))
            for m in re.finditer(r"\[memory\] rank (\d) of (\d) holds parameters ([\d.]+) MiB \+ gradients ([\d.]+) "
                                 r"MiB \+ AdamW ([\d.]+) MiB", stdout)}


def test_fsdp_full_fine_tuning_equals_one_process_and_shards_memory(tmp_path):
    single = run(tmp_path, 1, "training.batch_size=8", "run_name=single")
    sharded = run(tmp_path, 2, "training.batch_size=4", "training.fsdp=true", "run_name=fsdp")
    assert_close(weights(tmp_path / "single"), weights(tmp_path / "fsdp"))  # grad_accum_steps=2: accumulation too
    for a, b in zip(train_rows(tmp_path / "single"), train_rows(tmp_path / "fsdp")):  # summed over ranks
        assert a["train/total_loss"] == pytest.approx(b["train/total_loss"], rel=1e-5, abs=1e-5)
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) < 1e-4  # the global norm, over both shards
    whole, halves = memory(single), memory(sharded)
    assert list(whole) == [0] and sorted(halves) == [0, 1]  # every rank reports what it holds
    for rank in (0, 1):  # each rank holds about half of every parameter, gradient and moment
        for part, full in zip(halves[rank], whole[0]):
            assert abs(part - full / 2) < 0.02 * full, (rank, halves, whole)
    assert sorted(os.listdir(tmp_path / "fsdp")) == ["config.yml", "final", "metrics.jsonl", "metrics.svg"]


def test_fsdp_lora_equals_one_process(tmp_path):
    run(tmp_path, 1, "training.batch_size=8", LORA, "run_name=single")
    run(tmp_path, 2, "training.batch_size=4", LORA, "training.fsdp=true", "run_name=fsdp")
    assert_close(weights(tmp_path / "single"), weights(tmp_path / "fsdp"))  # merged
    adapter = [load_file(str(tmp_path / name / "final" / "adapter" / "adapter_model.safetensors"))
               for name in ("single", "fsdp")]
    assert adapter[0] and any(t.abs().sum() > 0 for k, t in adapter[1].items() if "lora_B" in k)  # it trained
    assert_close(*adapter)


def test_fsdp_phase_switch_after_an_evaluation_equals_one_process(tmp_path):
    # eval_every=2: the evaluation at step 2 leaves the root's weights gathered, then `all` starts training
    phases = "training.phases=[{step: 0, trainable: [norm]}, {step: 2, trainable: [all]}]"
    run(tmp_path, 1, "training.batch_size=8", phases, "run_name=single")
    run(tmp_path, 2, "training.batch_size=4", phases, "training.fsdp=true", "run_name=fsdp")
    for a, b in zip(train_rows(tmp_path / "single"), train_rows(tmp_path / "fsdp")):  # stale: 4.78 for 5.49
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) < 1e-4
    # AdamW's first update of a weight is about +-lr whatever its gradient's size, so a near-zero gradient's
    # rounding (another reduction order) can move one weight in thousands by a few 1e-5 (2e-4 seen on the embedding)
    assert_close(weights(tmp_path / "single"), weights(tmp_path / "fsdp"), atol=5e-4)  # half an update


def test_resumed_fsdp_run_continues_exactly(tmp_path):
    run(tmp_path, 2, "training.batch_size=4", "training.fsdp=true", "training.save_every=2", "run_name=through")
    checkpoint = tmp_path / "through" / "step_000002"
    whole = weights(tmp_path / "through")["model.embed_tokens.weight"].shape
    assert load_file(str(checkpoint / "weights.safetensors"))["model.embed_tokens.weight"].shape == whole  # not a shard
    stdout = run(tmp_path, 2, "training.batch_size=4", "training.fsdp=true", "run_name=resumed",
                 f"training.resume_from={checkpoint}")
    assert "continuing at step 2" in stdout
    assert_close(weights(tmp_path / "through"), weights(tmp_path / "resumed"), atol=0)


def test_the_guard_stops_every_fsdp_rank(tmp_path):
    from test_train import overflowing_model  # every step's loss overflows: each one is skipped
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), os.path.join(ROOT, "presets", "orpo.yml"), f"output_dir={tmp_path}",
           *COMMON, "training.batch_size=4", "training.fsdp=true", f"model_name={overflowing_model(tmp_path)}",
           "training.max_steps=20", "training.max_bad_steps=3"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    # every rank decides at the same step (the guard reads all-reduced numbers); the first to exit ends the run
    assert "[guard] 3 non-finite steps in a row: stopping" in p.stderr
    assert p.stdout.count("update skipped") == 3
    assert not (tmp_path / "orpo" / "final").exists()


def test_fsdp_without_torchrun_is_refused_in_one_line(tmp_path):
    p = _run([os.path.join(ROOT, "train.py"), os.path.join(ROOT, "presets", "orpo.yml"), f"output_dir={tmp_path}",
              "training.fsdp=true"])
    assert p.returncode != 0 and "training.fsdp=true needs torchrun" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def _rank_pid(parent, rank):
    """The pid of the worker with RANK=rank among torchrun's children (Linux /proc)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def test_a_killed_rank_stops_the_others(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), os.path.join(ROOT, "presets", "orpo.yml"), f"output_dir={tmp_path}",
           *COMMON, "training.max_steps=100000", "training.batch_size=4", "training.fsdp=true"]
    seed_tiny_base(cmd)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:  # training has started on both ranks: they are in collectives
            if line.startswith("step     2 |"):
                break
        survivor, victim = _rank_pid(p.pid, 0), _rank_pid(p.pid, 1)
        assert survivor and victim
        os.kill(victim, signal.SIGKILL)
        rest, _ = p.communicate(timeout=60)  # the bound: torchrun sees a worker die and stops the others
        assert p.returncode != 0, rest[-3000:]
        assert not _running(survivor), rest[-3000:]
    finally:
        p.kill()
