"""Nothing a user does loses their work: each case runs the real train.py and looks at the disk afterwards."""
import hashlib
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import seed_tiny_base
import torch
from safetensors.torch import load_file

from minorpo import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["training.log_every=2", "training.eval_every=0", "training.warmup_steps=2", "sample.max_new_tokens=4",
        "training.batch_size=4"]


def train(run_limited, out, *overrides):
    return run_limited(["train.py", "presets/orpo.yml", f"output_dir={out}", *FAST, *overrides])


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def all_finite(folder):
    for parent, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".safetensors"):
                for key, t in load_file(os.path.join(parent, name)).items():
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        return f"{name}:{key}"
    return None


@pytest.fixture(scope="module")
def finished(tmp_path_factory, run_limited):
    """A finished 6-step run with checkpoints at steps 3 and 6, copied afresh for each test."""
    out = tmp_path_factory.mktemp("finished")
    p = run_limited(["train.py", "presets/orpo.yml", f"output_dir={out}", *FAST, "training.max_steps=6",
              "training.save_every=3"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture
def done(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def test_every_refused_start_names_the_way_out_and_changes_nothing_on_disk(run_many, done, one_line_error):
    """Starts that would overwrite or mix runs, all at once against one finished run: each is one line
    naming the folder or setting, and no byte under the output folder changes (config.yml included: a
    refused setting is never recorded)."""
    run, resume = done / "orpo", f"training.resume_from={done / 'orpo' / 'step_000006'}"
    lines = (done / "tiny-data" / "sign-offs.jsonl").read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    (done / "other.jsonl").write_text(json.dumps({**row, "chosen": row["chosen"] + " extra"}) + "\n" + "".join(lines[1:]))
    other_model = tiny.ensure_model(str(done / "other-model"), seed=1, pretrain_steps=0)
    cases = {  # name: (overrides, what the error line names)
        "same run_name": (["training.max_steps=2"], [str(run), "already holds a run", "run_name", resume]),
        "model inside the run": ([f"model_name={run / 'final'}", "training.max_steps=2"],
                                 ["overlap", "its own input model"]),
        "changed orpo_lambda": ([resume, "training.orpo_lambda=0.5"], ["training.orpo_lambda was 3.0, now 0.5"]),
        "changed weight_decay": ([resume, "training.weight_decay=0.1"], ["training.weight_decay was 0.0, now 0.1"]),
        "changed lora.alpha": ([resume, "lora.alpha=8"], ["lora.alpha was 32.0, now 8.0"]),
        "changed batch_size": ([resume, "training.batch_size=8"], ["training.batch_size was 4, now 8"]),
        "other data, same rows": ([resume, f"data.path={done / 'other.jsonl'}"], ["data was"]),
        "another base model": ([resume, f"model_name={other_model}"], ["base model was"]),
        "an older checkpoint": ([f"training.resume_from={run / 'step_000003'}"],
                                ["not the latest checkpoint", "step_000006"]),
        "at max_steps already": ([resume, "training.max_steps=6"], ["at step 6", "raise training.max_steps"]),
    }
    # a refused resume holds the run folder until its settings are checked (one run at a time): those that may
    # start a new run_name from the checkpoint do so, all at once; the one that needs final/ stays in orpo
    elsewhere = {name: [f"run_name=new{i}"] if name.startswith(("changed", "other", "another")) else []
                 for i, name in enumerate(cases)}
    before, before_names = snapshot(done), os.listdir(done)
    results = run_many({name: ["train.py", "presets/orpo.yml", f"output_dir={done}", *FAST, "training.max_steps=8",
                               *overrides, *elsewhere[name]] for name, (overrides, _) in cases.items()})
    failures = []
    for name, (overrides, needles) in cases.items():
        try:
            one_line_error(results[name], *needles, *(["step_000006"] if resume in overrides else []))
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert snapshot(done) == before and sorted(os.listdir(done)) == sorted(before_names)


IMPOSSIBLE = [("training.learning_rate=.inf", "training.learning_rate"),
              ("training.weight_decay=.inf", "training.weight_decay"), ("lora.alpha=.inf", "lora.alpha"),
              ("training.orpo_lambda=.inf", "training.orpo_lambda"), ("sample.top_p=0", "sample.top_p"),
              ("sample.temperature=1e-45", "sample.temperature"),
              ("sample.max_new_tokens=600", "sample.max_new_tokens")]


def test_an_impossible_setting_stops_before_training_and_writes_no_run(run_many, done, one_line_error):
    results = run_many({key: ["train.py", "presets/orpo.yml", f"output_dir={done}", *FAST, override,
                              "training.max_steps=2", f"run_name=new{i}"]
                        for i, (override, key) in enumerate(IMPOSSIBLE)})
    for i, (_, key) in enumerate(IMPOSSIBLE):
        one_line_error(results[key], f"`{key}`")
        assert not (done / f"new{i}").exists()


def test_a_failing_optional_step_after_final_says_final_is_safe(run_limited, tmp_path):
    # Sampling after training is optional: make it fail and check final/ is complete and the exit nonzero.
    argv = ["train.py", "presets/orpo.yml", f"output_dir={tmp_path}", "training.max_steps=2", *FAST]
    code = f"""
import runpy, sys
import minorpo.model
generate, calls = minorpo.model.Qwen.generate, []
def fails_after_training(self, *args, **kwargs):  # the 3 samples before training pass, the 4th fails
    calls.append(1)
    if len(calls) > 3:
        raise RuntimeError("boom")
    return generate(self, *args, **kwargs)
minorpo.model.Qwen.generate = fails_after_training
sys.argv = {argv!r}
runpy.run_path("train.py", run_name="__main__")
"""
    p = run_limited(["-c", code])
    assert p.returncode != 0
    assert "final/ is complete and safe" in p.stderr
    assert "Traceback" not in p.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "orpo" / "final"))


def test_resume_drops_a_cut_metrics_line_cleans_leftovers_and_rotates(run_limited, done):
    run = done / "orpo"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a line cut by a crash
    (run / ".step_000009.0123abcd.tmp").mkdir()  # what a run killed while saving leaves
    p = train(run_limited, done, "training.max_steps=10", "training.save_every=2", "training.keep_checkpoints=2",
              f"training.resume_from={run / 'step_000006'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "unreadable line (cut by a crash?) is dropped" in p.stdout
    assert "[recover] removed" in p.stdout
    assert not (run / ".step_000009.0123abcd.tmp").exists()
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [2, 4, 6, 8, 10]
    assert sorted(n for n in os.listdir(run) if n.startswith("step_")) == ["step_000006", "step_000008", "step_000010"]


def test_a_resumable_setting_is_applied(run_limited, done):
    p = train(run_limited, done, "training.max_steps=8", "training.log_every=1",
              f"training.resume_from={done / 'orpo' / 'step_000006'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(done / "orpo" / "metrics.jsonl")][-2:] == [7, 8]


def test_an_unwritable_output_dir_is_one_line(run_limited, tmp_path, one_line_error):
    (tmp_path / "a_file").write_text("not a folder")
    p = train(run_limited, tmp_path / "a_file", "training.max_steps=2")
    one_line_error(p, "a_file")


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path):
    cmd = [sys.executable, "train.py", "presets/orpo.yml", f"output_dir={tmp_path}", *FAST, "training.max_steps=5000"]
    seed_tiny_base(cmd)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait for the loop to start
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in err
    resume = err.strip().splitlines()[-1].strip()
    assert resume.startswith("python train.py presets/orpo.yml") and "training.resume_from=" in resume
    folder = resume.split("training.resume_from=")[1]
    assert os.path.isfile(os.path.join(folder, "state.json"))
    assert all_finite(folder) is None


def test_bf16_precision_trains_on_the_cpu_with_fp32_lora_masters(run_limited, tmp_path):
    p = train(run_limited, tmp_path, "precision=bf16", "training.max_steps=3", "training.save_every=3",
              "training.phases=[{step: 0, trainable: [lora, attn_lora]}]")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "bf16" in p.stdout
    masters = load_file(str(tmp_path / "orpo" / "step_000003" / "weights.safetensors"))
    assert {t.dtype for t in masters.values()} == {torch.float32}
    merged = load_file(str(tmp_path / "orpo" / "final" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert all_finite(tmp_path / "orpo") is None


def test_sigterm_saves_a_checkpoint_and_prints_a_quoted_command_that_resumes(tmp_path, run_limited):
    """What a cluster scheduler sends before it takes the machine back is handled as the first Ctrl-C, and the
    command it prints survives the shell with the README's phases override (spaces, brackets, braces)."""
    phases = "training.phases=[{step: 0, trainable: [all]}]"
    args = ["train.py", "presets/orpo.yml", f"output_dir={tmp_path / 'a b'}", *FAST, phases, "training.max_steps=5000"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait for the loop to start
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, -signal.SIGTERM), err[-2000:]
    assert "Traceback" not in err and "[interrupt] SIGTERM: stopping after this step" in err
    command = shlex.split(err.strip().splitlines()[-1])  # as a shell reads the pasted line
    folder = command[-1].split("training.resume_from=")[1]
    assert command == ["python", *args, f"training.resume_from={folder}"]
    assert os.path.isfile(os.path.join(folder, "state.json")) and all_finite(folder) is None
    step = int(folder.rsplit("_", 1)[1])
    p = run_limited([*command[1:-2], f"training.max_steps={step + 2}", command[-1]])  # it continues
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"continuing at step {step} of {step + 2}" in p.stdout and os.path.isdir(tmp_path / "a b" / "orpo" / "final")
