"""Issue 30's new-user cases: the README's commands on a user's own files, each through the real train.py,
looking at the disk afterwards; further cases of a class go through the function train.py calls."""
import json
import os

import pytest

from minorpo import data, tiny

FAST = ["training.log_every=2", "training.eval_every=0", "training.warmup_steps=2", "sample.max_new_tokens=4",
        "training.batch_size=4", "training.max_steps=2"]


def hh(row):
    """A tiny pair as Anthropic HH writes it: two transcripts, no prompt field."""
    return {side: f"\n\nHuman: {row['prompt']}\n\nAssistant: {row[side]}" for side in ("chosen", "rejected")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    rows = [json.loads(line) for line in open(tiny.ensure_pairs(str(folder / "pairs.jsonl")))][:200]

    def write(name, lines):
        (folder / name).write_text("".join(line + "\n" for line in lines))
        return folder / name
    return {"hh": write("hh.jsonl", [json.dumps(hh(r)) for r in rows]),
            "sft rows": write("sft.jsonl", [json.dumps({"prompt": r["prompt"], "response": r["chosen"]})
                                            for r in rows]),
            "bad held-out": write("bad.jsonl", [json.dumps(hh(rows[0])), '{"chosen": 5, "rejected": "x"}']),
            "empty rows": write("empty.jsonl", ["{}"] * 10_000_000 + ['{"not json']),
            "pairs": folder / "pairs.jsonl"}


def test_new_user_data_commands(files, tmp_path, run_many, one_line_error):
    """SFT on HH pairs trains and scores the held-out pairs; a layout that does not fit says which setting
    does; a file of ten million {} lines stops at line 1 (its last line, not JSON, is never read)."""
    jobs = {"sft on hh": ["presets/sft.yml", f"data.path={files['hh']}", "training.eval_every=2"],
            "sft, bad held-out row": ["presets/sft.yml", f"data.path={files['hh']}",
                                      f"data.eval_path={files['bad held-out']}"],
            "orpo on hh": ["presets/orpo.yml", f"data.path={files['hh']}"],
            "orpo on sft rows": ["presets/orpo.yml", f"data.path={files['sft rows']}"],
            "ten million {}": ["presets/orpo.yml", f"data.path={files['empty rows']}"],
            "truncated": ["presets/orpo.yml", f"data.path={files['pairs']}", "data.max_length=24",
                          "data.max_prompt_length=8"]}
    done = run_many({name: ["train.py", *a[:1], f"output_dir={tmp_path / name}", *FAST, *a[1:]]
                     for name, a in jobs.items()})
    p = done["sft on hh"]
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "sft on hh" / "sft" / "metrics.jsonl")]
    assert "eval/pref_accuracy" in rows[-1] and "eval/rejected_logps" in rows[-1]  # the pairs were scored
    assert os.path.isdir(tmp_path / "sft on hh" / "sft" / "final")
    one_line_error(done["sft, bad held-out row"], f"{files['bad held-out']}:2:", 'field "chosen"', "task sft expects")
    one_line_error(done["orpo on hh"], f"{files['hh']}:1:", 'missing field "prompt"',
                   "did you mean data.task=preference")
    one_line_error(done["orpo on sft rows"], f"{files['sft rows']}:1:", 'missing field "chosen"',
                   "did you mean presets/sft.yml (training.type=sft data.task=sft)")
    one_line_error(done["ten million {}"], f"{files['empty rows']}:1:", 'missing field "prompt"')
    for name in ("sft, bad held-out row", "orpo on hh", "orpo on sft rows", "ten million {}"):
        assert not os.path.exists(tmp_path / name / "orpo") and not os.path.exists(tmp_path / name / "sft")
    p = done["truncated"]
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith(f"[data] {files['pairs']}: "))
    assert " truncated to data.max_length=24, lines " in line
    assert line.endswith(", ...; raise data.max_length to keep them whole)")


@pytest.mark.parametrize("row, task, fmt, hint", [
    ({"chosen": "a b", "rejected": "a c"}, "prompted_preference", "raw", "did you mean data.task=preference"),
    ({"text": "a"}, "preference", "raw", "did you mean presets/sft.yml"),
    ({"messages": [{"role": "user", "content": "a"}]}, "prompted_preference", "raw", "did you mean presets/sft.yml"),
    ({"prompt": "a", "completion": "b"}, "sft", "raw", 'did you mean "response" for the field "completion"'),
    ({"input_ids": [1], "labels": [1]}, "sft", "raw", "did you mean data.format=processed"),
    ({"prompt": "a", "response": "b"}, "sft", "processed", "did you mean data.format=raw"),
    ({"input_ids": [1], "labels": [1]}, "preference", "processed", "did you mean presets/sft.yml"),
])
def test_a_layout_that_does_not_fit_the_rows_names_the_setting_that_does(tmp_path, row, task, fmt, hint):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + "not json\n")  # read no further than the first bad row
    with pytest.raises(data.DataError, match="missing field") as e:
        data.read_jsonl(str(path), task=task, fmt=fmt)
    assert str(e.value).startswith(f"{path}:1: ") and hint in str(e.value)


def test_rerunning_the_set_up_command_is_refused_before_the_config_and_says_how_to_start_over(tmp_path, run_limited,
                                                                                                 one_line_error):
    """And the step line says its numbers are a mean since the last line; [progress] gives the last step's."""
    args = ["train.py", "presets/orpo.yml", f"output_dir={tmp_path}", *FAST]
    first = run_limited(args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "step     2 | mean of 2 steps: loss " in first.stdout
    assert "[progress] step 2/2 | this step's loss " in first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "orpo").rglob("*") if p.is_file()}
    again = run_limited(args)
    one_line_error(again, f"{tmp_path / 'orpo'} already holds a run, with no checkpoint to continue from",
                   "start over with a new run_name, or delete")
    assert again.stdout == "" and again.stderr.count("\n") == 1  # the one line, before the printed config
    assert {p: p.read_bytes() for p in (tmp_path / "orpo").rglob("*") if p.is_file()} == before
