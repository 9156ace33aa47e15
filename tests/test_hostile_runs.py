"""Issue 30's hostile cases for train.py's run folder and inputs: each runs the real train.py and looks at
the disk afterwards."""
import fcntl
import json
import os
import shutil
import socket
import struct

import pytest
from conftest import tiny_base

from minorpo import tiny

FAST = ["training.log_every=2", "training.eval_every=0", "training.warmup_steps=2", "sample.max_new_tokens=4",
        "training.batch_size=4"]


def train(run_limited, out, *overrides, **kwargs):
    return run_limited(["train.py", "presets/orpo.yml", f"output_dir={out}", *FAST, *overrides], **kwargs)


def poison(path, tensor, value):
    """Write `value` into the first element of an F32 tensor of a safetensors file, in place."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        assert header[tensor]["dtype"] == "F32"
        f.seek(8 + size + header[tensor]["data_offsets"][0])
        f.write(struct.pack("<f", value))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_base(str(tmp_path_factory.mktemp("runs") / "tiny-base"))


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_model_whose_weights_hold_nan_or_inf_is_refused_at_load_naming_file_and_tensor(
        tiny_model, tmp_path, run_limited, one_line_error, value):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    poison(model / "model.safetensors", "model.embed_tokens.weight", value)  # a row no token may reach
    p = train(run_limited, tmp_path / "out", f"model_name={model}", "training.max_steps=2")
    one_line_error(p, f"{model}/model.safetensors", "model.embed_tokens.weight", "NaN or inf", "download")
    assert not os.path.exists(tmp_path / "out" / "orpo" / "final")
    assert "[save]" not in p.stdout and "step " not in p.stdout  # no training step ran


LIMITED = """import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # what `ulimit -f 1024` sets; a full disk is alike
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_file_size_limit_is_one_line_naming_the_path_and_leaves_no_half_folder(tmp_path, run_limited,
                                                                                  one_line_error):
    out = tmp_path / "out"
    tiny_base(str(out / "tiny-base"))  # 3 MB: written here, before the limit
    tiny.ensure_pairs(str(out / "tiny-data" / "sign-offs.jsonl"))
    p = run_limited(["-c", LIMITED, "presets/orpo.yml", f"output_dir={out}", *FAST, "training.max_steps=2"])
    one_line_error(p, "File too large", f"{out / 'orpo' / 'final' / 'model.safetensors'}")
    assert sorted(os.listdir(out / "orpo")) == ["config.yml", "metrics.jsonl"]  # no final/, no temporary folder


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_variables_without_torchrun_are_one_line_and_a_bounded_announced_wait(tmp_path, run_limited,
                                                                                   one_line_error, tiny_model):
    peer = {"MASTER_ADDR": "127.0.0.1", "MINORPO_RENDEZVOUS_TIMEOUT": "2"}
    cases = {"leftover": {"RANK": "0", "WORLD_SIZE": "2"},
             "rank 0 alone": {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port()), **peer},
             "rank 1 alone": {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port()), **peer}}
    jobs = {name: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path / name}", f"model_name={tiny_model}"]
            for name in cases}
    with pytest.MonkeyPatch.context() as m:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            m.delenv(name, raising=False)
        done = {name: run_limited(jobs[name], env=cases[name], timeout=120) for name in cases}
    one_line_error(done["leftover"], "RANK is set but MASTER_ADDR is not", "torchrun", "unset RANK")
    for name in ("rank 0 alone", "rank 1 alone"):
        port = cases[name]["MASTER_PORT"]
        assert f"waiting up to 2 s for all 2 ranks to join at 127.0.0.1:{port}" in done[name].stdout
        one_line_error(done[name], f"did not join at 127.0.0.1:{port} within 2 s", "unset RANK")
    assert not any(os.path.exists(tmp_path / name) for name in cases)  # nothing written


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, run_limited):
    """A finished 4-step run of a model folder of its own, with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_model, out / "model")
    p = train(run_limited, out, f"model_name={out / 'model'}", "training.max_steps=4", "training.save_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def copy_run(finished, to):
    shutil.copytree(finished, to)
    return to, [f"model_name={to / 'model'}", f"training.resume_from={to / 'orpo' / 'step_000004'}",
                "training.max_steps=6", "training.save_every=2"]


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_a_changed_config_json_or_tokenizer_json_of_the_base_model(finished, tmp_path, run_many,
                                                                                   one_line_error):
    runs = {name: copy_run(finished, tmp_path / name) for name in ("config.json", "tokenizer.json", "same")}
    config = runs["config.json"][0] / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-5}))
    tokenizer = runs["tokenizer.json"][0] / "model" / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=4))
    before = {name: files_of(out / "orpo") for name, (out, _) in runs.items()}
    done = run_many({name: ["train.py", "presets/orpo.yml", f"output_dir={out}", *FAST, *args]
                     for name, (out, args) in runs.items()})
    for name in ("config.json", "tokenizer.json"):
        one_line_error(done[name], f"base model {name} was")
        assert files_of(runs[name][0] / "orpo") == before[name]  # nothing rewritten
    assert done["same"].returncode == 0, done["same"].stderr[-2000:]  # an unchanged copy continues
    assert os.path.isdir(runs["same"][0] / "orpo" / "step_000006")


def test_a_resume_after_a_crash_bounds_memory_for_zeroed_metrics_and_removes_a_half_deleted_checkpoint(
        finished, tmp_path, run_limited):
    out, args = copy_run(finished, tmp_path / "out")
    (out / "orpo" / "step_000002" / "state.json").unlink()  # a rotation killed halfway through its deletion
    metrics = out / "orpo" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    with open(metrics, "ab") as f:  # what a crash on some file systems leaves: a sparse tail of zeros
        f.truncate(os.path.getsize(metrics) + (16 << 30))  # more than the 6 GB the run may hold
    p = train(run_limited, out, *args, memory_gb=6)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"[warning] {metrics}:{len(rows) + 1}: an unreadable line (cut by a crash?) is dropped" in p.stdout
    kept = [json.loads(line) for line in metrics.read_text().splitlines()]  # small again, every line a row
    assert kept[:len(rows)] == [json.loads(row) for row in rows] and kept[-1]["step"] == 6
    assert f"[recover] removed {out / 'orpo' / 'step_000002'}: a checkpoint without state.json" in p.stdout
    assert sorted(n for n in os.listdir(out / "orpo") if n.startswith(("step_", "."))) == \
        ["step_000004", "step_000006"]


def test_a_refused_resume_rewrites_nothing_and_a_checkpoint_at_max_steps_gets_its_final(finished, tmp_path, run_many,
                                                                                         one_line_error):
    """A damaged state.json found after the settings check leaves config.yml and metrics.jsonl as they were
    (a changed resumable setting is not recorded); a run whose final/ was never written gets it from its last
    checkpoint, the same model the run would have saved."""
    damaged, args = copy_run(finished, tmp_path / "damaged")
    state = damaged / "orpo" / "step_000004" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "position": 10 ** 6}))
    before = files_of(damaged / "orpo")
    no_final, _ = copy_run(finished, tmp_path / "no final")
    shutil.rmtree(no_final / "orpo" / "final")
    resume = [f"model_name={no_final / 'model'}", f"training.resume_from={no_final / 'orpo' / 'step_000004'}"]
    done = run_many({"damaged": ["train.py", "presets/orpo.yml", f"output_dir={damaged}", *FAST, *args,
                                 "training.log_every=1"],
                     "no final": ["train.py", "presets/orpo.yml", f"output_dir={no_final}", *FAST, *resume,
                                  "training.max_steps=4"]})
    one_line_error(done["damaged"], f"{state}: position 1000000 past the")
    assert files_of(damaged / "orpo") == before
    p = done["no final"]
    assert p.returncode == 0, p.stderr[-2000:]
    assert "continuing at step 4 of 4 (training.max_steps: writing final/ only)" in p.stdout
    written, saved = files_of(no_final / "orpo" / "final"), files_of(finished / "orpo" / "final")
    assert written.pop("config.yml") != saved.pop("config.yml")  # its own paths (resume_from, output_dir)
    adapter = "adapter/adapter_config.json"  # names the base model folder each run used
    assert json.loads(written.pop(adapter))["base_model_name_or_path"] == os.path.abspath(no_final / "model")
    assert json.loads(saved.pop(adapter))["base_model_name_or_path"] == os.path.abspath(finished / "model")
    assert written == saved  # the weights, tokenizer, config.json and metrics.jsonl, byte for byte


def test_a_run_folder_is_claimed_by_one_process_at_a_time(tmp_path, run_limited, run_many, one_line_error):
    """A folder another live run holds is refused in one line naming its process, before the config is printed;
    the lock a killed run left behind is free; two starts together: one trains, the other is refused."""
    held, stale = tmp_path / "held" / "orpo", tmp_path / "stale" / "orpo"
    held.mkdir(parents=True)
    stale.mkdir(parents=True)
    (stale / ".lock").write_text("999999\n")  # no process holds it: a run killed with SIGKILL left it
    with open(held / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        done = run_many({"held": ["train.py", "presets/orpo.yml", f"output_dir={held.parent}", *FAST,
                                  "training.max_steps=2"],
                         "stale": ["train.py", "presets/orpo.yml", f"output_dir={stale.parent}", *FAST,
                                   "training.max_steps=2"]})
    one_line_error(done["held"], f"{held} is in use: process 4242 is running there", "choose another run_name")
    assert done["held"].stdout == "" and os.listdir(held) == [".lock"]
    assert done["stale"].returncode == 0, done["stale"].stderr[-2000:]
    assert not (stale / ".lock").exists() and (stale / "final").is_dir()
    together = run_many({i: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path / 'together'}", *FAST,
                             "training.max_steps=4", "training.log_every=1"] for i in range(2)})
    assert sorted(p.returncode == 0 for p in together.values()) == [False, True]
    refused = next(p for p in together.values() if p.returncode)
    one_line_error(refused, str(tmp_path / "together" / "orpo"))
    assert "is in use: process" in refused.stderr or "already holds a run" in refused.stderr
    steps = [json.loads(line)["step"] for line in open(tmp_path / "together" / "orpo" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # one run's rows, not two interleaved
    assert not (tmp_path / "together" / "orpo" / ".lock").exists()


def test_impossible_accumulation_and_held_out_pairs_that_are_the_training_pairs_are_refused(tmp_path, run_many,
                                                                                            one_line_error):
    pairs = tiny.ensure_pairs(str(tmp_path / "pairs.jsonl"), n=40)
    shutil.copyfile(pairs, tmp_path / "copy.jsonl")
    cases = {"accumulation": [f"data.path={pairs}", "data.eval_fraction=0", "training.grad_accum_steps=20"],
             "same file": [f"data.path={pairs}", f"data.eval_path={tmp_path / '.' / 'pairs.jsonl'}"],
             "a copy": [f"data.path={pairs}", f"data.eval_path={tmp_path / 'copy.jsonl'}"]}
    done = run_many({name: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path / 'out'}", f"run_name=r{i}",
                            *FAST, "training.max_steps=2", *a] for i, (name, a) in enumerate(cases.items())})
    one_line_error(done["accumulation"], "training.grad_accum_steps=20", "40 training examples make 10 of "
                   "training.batch_size=4", "lower grad_accum_steps to 10 or less")
    one_line_error(done["same file"], "is the same file as data.path", "data.eval_path=null")
    one_line_error(done["a copy"], f"data.eval_path={tmp_path / 'copy.jsonl'} is a copy of data.path={pairs}")
    assert not any((tmp_path / "out" / f"r{i}").exists() for i in range(3))  # no run folder left behind


def test_a_finished_resume_names_the_setting_that_set_the_length(finished, tmp_path, run_limited, one_line_error):
    """Nothing left to train is refused naming training.max_steps, or training.epochs when that set the length
    (one after the other: the run folder takes one process at a time)."""
    out, args = copy_run(finished, tmp_path / "run")
    for key, setting in (("max_steps", "training.max_steps=4"), ("epochs", "training.epochs=0.001")):
        p = train(run_limited, out, *args[:2], setting)
        one_line_error(p, "step_000004 is at step 4", f"nothing to train; raise training.{key}")
