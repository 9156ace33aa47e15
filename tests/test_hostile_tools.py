"""Issue 30's hostile and new-user cases for the settings and the tools (chat, bench.py, plot): each runs the
real entry point where it makes sense and looks at what it printed and left on disk."""
import json
import os
import shlex
import shutil

import pytest

from minorpo import config, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORPO = os.path.join(ROOT, "presets", "orpo.yml")


def test_help_gives_the_phases_syntax_as_an_override_that_works(run_limited):
    p = run_limited(["train.py", "--help"], timeout=120)
    assert p.returncode == 0, p.stderr
    example = next(line for line in p.stdout.splitlines() if "e.g. 'training.phases=" in line)
    [override] = shlex.split(example.split("e.g.", 1)[1].split("  (")[0])  # as a shell would pass it
    phases = config.load(ORPO, [override])["training"]["phases"]
    assert phases[0] == {"step": 0, "trainable": ["lora", "attn_lora"]} and len(phases) == 2


def test_an_empty_target_list_for_a_trained_lora_group_names_that_key(run_many, one_line_error, tmp_path):
    phases = "training.phases=[{step: 0, trainable: [lora, attn_lora]}]"
    runs = run_many({key: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path}", phases, f"lora.{key}=[]"]
                     for key in ("targets", "attn_targets")}, timeout=120)
    for key, p in runs.items():
        one_line_error(p, f"`lora.{key}` is empty", f"lora.{key}=[", "training.phases")
        assert "start_layer" not in p.stderr
    assert os.listdir(tmp_path) == []  # refused before anything was written


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny.ensure_model(str(tmp_path_factory.mktemp("tools") / "tiny-model"))


def test_chat_without_im_end_names_the_tokenizer_file_and_its_own_option(tiny_model, tmp_path, run_many,
                                                                         one_line_error):
    model = shutil.copytree(tiny_model, tmp_path / "no-im-end")
    path = model / "tokenizer.json"
    path.write_text(path.read_text().replace("<|im_end|>", "<|im_fin|>"))
    runs = run_many({template: ["-m", "minorpo.chat", model, "--template", template, "--prompt", "Sort: 2 1",
                                "--max-new-tokens", "4"] for template in ("chatml", "raw")}, timeout=120)
    one_line_error(runs["chatml"], f"{model}/tokenizer.json", "<|im_end|>", "--template raw")
    assert "data.template" not in runs["chatml"].stderr
    assert runs["raw"].returncode == 0, runs["raw"].stderr  # the fix it names works
