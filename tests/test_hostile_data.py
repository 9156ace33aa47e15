"""Hostile and malformed data files, each through the real train.py in a subprocess with a memory cap.

A malformed file stops the run with one line naming the file and the line; a row that cannot be trained
on (too long to read, identical answers after truncation) is filtered and reported, and the run goes on.
Every case starts from the embedded tiny pairs (2,000 good lines) and adds or breaks one line.
"""
import json
import os

import pytest

from minorpo import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "Repeat: red blue", "chosen": "Sure: red blue.", "rejected": "Sure: blue red."}


def train(run_limited, tmp_path, path, *overrides, memory_gb=6):
    """Run train.py for two steps on the data file `path`, writing only under tmp_path."""
    before = sorted(os.listdir(ROOT))
    p = run_limited(["train.py", "presets/orpo.yml", f"data.path={path}", f"output_dir={tmp_path}",
                     "training.max_steps=2", "training.eval_every=0", "sample.max_new_tokens=4", *overrides],
                    memory_gb=memory_gb)
    assert sorted(os.listdir(ROOT)) == before  # nothing written outside tmp_path
    return p


def pairs_with(tmp_path, line, at=None):
    """The tiny pairs with `line` (bytes) inserted as line `at` (appended by default): (path, its line number)."""
    path = tiny.ensure_pairs(str(tmp_path / "pairs.jsonl"))
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    at = len(lines) + 1 if at is None else at
    lines.insert(at - 1, line + b"\n")
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return path, at


BROKEN_LINES = {  # case: (the line, what the error says)
    "not_utf8": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not UTF-8"),
    "lone_surrogate": (b'{"prompt": "a\\ud800", "chosen": "a", "rejected": "b"}', "a lone surrogate"),
    "deep_nesting": (b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "JSON nested too deeply"),
    "not_an_object": (b'["Repeat: red blue", "Sure: red blue.", "Sure: blue red."]',
                      "expected a JSON object {...}, got list"),
    "wrong_type": (b'{"prompt": "Repeat: red", "chosen": 5, "rejected": "Sure: red."}',
                   'field "chosen" must be a string or a list of {"role", "content"} messages'),
    "bad_role": (json.dumps(dict(GOOD, prompt=[{"role": "tool", "content": "x"}])).encode(),
                 'role system (first only), user or assistant; got message 1: {"role": "tool"'),
    "system_not_first": (json.dumps(dict(GOOD, prompt=[{"role": "user", "content": "a"},
                                                       {"role": "system", "content": "b"}])).encode(),
                         'got message 2: {"role": "system"'),
    "invalid_json": (b'{"prompt": "Repeat: red", "chosen": "a"', "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LINES))
def test_a_broken_line_stops_the_run_with_one_line_naming_file_and_line(run_limited, one_line_error, tmp_path,
                                                                        case):
    line, message = BROKEN_LINES[case]
    path, number = pairs_with(tmp_path, line, at=7)
    one_line_error(train(run_limited, tmp_path, path), f"{path}:{number}: ", message)


def test_a_blank_file_is_one_line_error_naming_it(run_limited, one_line_error, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n   \n\n")
    one_line_error(train(run_limited, tmp_path, path), f"{path}: no rows (the file is empty or blank)")


def test_a_data_path_that_is_a_folder_says_so(run_limited, one_line_error, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    one_line_error(train(run_limited, tmp_path, folder), f"{folder}: a directory; expected a JSONL file", "`tiny`")


def test_rows_all_filtered_is_one_line_error_naming_the_filter(run_limited, one_line_error, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(GOOD, chosen=" ")) + "\n" for _ in range(20)))
    one_line_error(train(run_limited, tmp_path, path), str(path), "no usable pairs left: filtered",
                   "rows with an empty response (lines ")


def test_a_50_mb_row_is_skipped_unread_and_the_run_goes_on(run_limited, tmp_path):
    path, number = pairs_with(tmp_path, json.dumps(dict(GOOD, prompt="red " * 12_500_000)).encode())
    p = train(run_limited, tmp_path, path, memory_gb=3)
    assert p.returncode == 0, p.stderr[-3000:]
    report = [line for line in p.stdout.splitlines() if line.startswith(f"[data] {path}") and "filtered" in line]
    assert len(report) == 1, p.stdout[-3000:]
    assert report[0].endswith(f"filtered 1 row longer than 1048576 bytes (line {number}); to keep such rows, shorten "
                              "them or raise data.max_length (now 128; the bound is max(1 MiB, 64 bytes x it))")


def test_pairs_identical_after_truncation_are_filtered_and_the_run_goes_on(run_limited, tmp_path):
    shared = "Sure: " + "red " * 150
    path = tiny.ensure_pairs(str(tmp_path / "pairs.jsonl"))
    with open(path, "a") as f:
        for _ in range(3):
            f.write(json.dumps(dict(GOOD, chosen=shared + "blue.", rejected=shared + "pink.")) + "\n")
    p = train(run_limited, tmp_path, path, "data.eval_fraction=0")  # every row in the training set
    assert p.returncode == 0, p.stderr[-3000:]
    expected = (f"[data] {path}: filtered 3 rows with chosen and rejected identical after truncation (lines 2001, "
                "2002, 2003); to keep such rows, raise data.max_length (now 128) or lower data.max_prompt_length "
                "(now 64)")
    assert expected in p.stdout.splitlines(), p.stdout[-3000:]
