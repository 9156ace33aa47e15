"""Hostile and malformed data files. Each class goes once through the real train.py in a subprocess with a
memory cap and a hang guard; all those runs start together, one per core (the `runs` fixture), and each test
checks its own. Further cases of a class go through the functions train.py calls (data.read_jsonl and
data.make_examples) in this process, with the same message.

A malformed file stops the run with one line naming the file and the line; a row that cannot be trained
on (too long to read, identical answers after truncation) is filtered and reported, and the run goes on.
Every case starts from the embedded tiny pairs (2,000 good lines) and adds or breaks one line.
"""
import json
import os

import pytest

from minorpo import config, data, tiny
from minorpo.files import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"prompt": "Repeat: red blue", "chosen": "Sure: red blue.", "rejected": "Sure: blue red."}


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

BROKEN_IN_A_SUBPROCESS = "invalid_json"  # the other broken lines go through data.read_jsonl / make_examples here
SHARED = "Sure: " + "red " * 150  # chosen and rejected differ only past max_length


def args(folder, path, *overrides):
    """train.py for two steps on the data file `path`, writing only under folder."""
    return ["train.py", "presets/orpo.yml", f"data.path={path}", f"output_dir={folder}", "training.max_steps=2",
            "training.eval_every=0", "sample.max_new_tokens=4", *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_many):
    """{case: (CompletedProcess, the data path, the line number of interest)}: one train.py run per class,
    all at once, plus "root_before" and "root_after": the repository root's listing around them."""
    folders = {name: tmp_path_factory.mktemp(name) for name in
               ("long_row", "identical", "broken", "blank", "folder", "filtered")}
    cases = {  # case: (data path, line number); long_row appends a 50 MB line
        "long_row": pairs_with(folders["long_row"], json.dumps(dict(GOOD, prompt="red " * 12_500_000)).encode()),
        "identical": (tiny.ensure_pairs(str(folders["identical"] / "pairs.jsonl")), 2001),
        "broken": pairs_with(folders["broken"], BROKEN_LINES[BROKEN_IN_A_SUBPROCESS][0], at=7),
        "blank": (folders["blank"] / "pairs.jsonl", None),
        "folder": (folders["folder"] / "data", None),
        "filtered": (folders["filtered"] / "pairs.jsonl", None),
    }
    with open(cases["identical"][0], "a") as f:
        for _ in range(3):
            f.write(json.dumps(dict(GOOD, chosen=SHARED + "blue.", rejected=SHARED + "pink.")) + "\n")
    cases["blank"][0].write_text("\n   \n\n")
    cases["folder"][0].mkdir()
    cases["filtered"][0].write_text("".join(json.dumps(dict(GOOD, chosen=" ")) + "\n" for _ in range(20)))
    extra = {"identical": ["data.eval_fraction=0"]}  # every row in the training set
    root_before = sorted(os.listdir(ROOT))
    # The two runs that train start first (the longest). One cap for all: the 50 MB row is to be read in 1 MiB
    # chunks, never whole, and every run here fits in 3 GB.
    done = run_many({name: args(folders[name], path, *extra.get(name, [])) for name, (path, _) in cases.items()},
                    memory_gb=3)
    return {name: (done[name], *cases[name]) for name in cases} | {"root_before": root_before,
                                                                    "root_after": sorted(os.listdir(ROOT))}


def result(runs, case):
    """(CompletedProcess, data path, line number) of a case, once nothing was written outside tmp folders."""
    assert runs["root_after"] == runs["root_before"]  # nothing written outside the run folders
    return runs[case]


def test_a_broken_line_stops_the_run_with_one_line_naming_file_and_line(runs, one_line_error):
    p, path, number = result(runs, "broken")
    one_line_error(p, f"{path}:{number}: ", BROKEN_LINES[BROKEN_IN_A_SUBPROCESS][1])


@pytest.fixture(scope="module")
def preprocess():
    """read_jsonl and make_examples as train.py calls them under presets/orpo.yml, with the tiny model's tokenizer."""
    cfg = config.load(os.path.join(ROOT, "presets", "orpo.yml"))["data"]
    tokenizer = tiny.build_tokenizer()  # what tiny.ensure_model saves as the tiny model's tokenizer.json

    def run(path):
        rows = data.read_jsonl(str(path), max_length=cfg["max_length"])
        return data.make_examples(rows, tokenizer, cfg["task"], fmt=cfg["format"], template=cfg["template"],
                                  max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"],
                                  source=str(path))
    return run


@pytest.mark.parametrize("case", sorted(set(BROKEN_LINES) - {BROKEN_IN_A_SUBPROCESS}))
def test_other_broken_lines_raise_one_line_naming_file_and_line(preprocess, tmp_path, case):
    line, message = BROKEN_LINES[case]
    path, number = pairs_with(tmp_path, line, at=7)
    with pytest.raises(UserError) as error:
        preprocess(path)
    assert str(error.value).startswith(f"{path}:{number}: "), str(error.value)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_blank_file_is_one_line_error_naming_it(runs, one_line_error):
    p, path, _ = result(runs, "blank")
    one_line_error(p, f"{path}: no rows (the file is empty or blank)")


def test_a_data_path_that_is_a_folder_says_so(runs, one_line_error):
    p, folder, _ = result(runs, "folder")
    one_line_error(p, f"{folder}: a directory; expected a JSONL file", "`tiny`")


def test_rows_all_filtered_is_one_line_error_naming_the_filter(runs, one_line_error):
    p, path, _ = result(runs, "filtered")
    one_line_error(p, str(path), "no usable pairs left: filtered", "rows with an empty response (lines ")


def test_a_50_mb_row_is_skipped_unread_and_the_run_goes_on(runs):
    p, path, number = result(runs, "long_row")
    assert p.returncode == 0, p.stderr[-3000:]
    report = [line for line in p.stdout.splitlines() if line.startswith(f"[data] {path}") and "filtered" in line]
    assert len(report) == 1, p.stdout[-3000:]
    assert report[0].endswith(f"filtered 1 row longer than 1048576 bytes (line {number}); to keep such rows, shorten "
                              "them or raise data.max_length (now 128; the bound is max(1 MiB, 64 bytes x it))")


def test_pairs_identical_after_truncation_are_filtered_and_the_run_goes_on(runs):
    p, path, _ = result(runs, "identical")
    assert p.returncode == 0, p.stderr[-3000:]
    expected = (f"[data] {path}: filtered 3 rows with chosen and rejected identical after truncation (lines 2001, "
                "2002, 2003); to keep such rows, raise data.max_length (now 128) or lower data.max_prompt_length "
                "(now 64)")
    assert expected in p.stdout.splitlines(), p.stdout[-3000:]
