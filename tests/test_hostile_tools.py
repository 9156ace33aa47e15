"""Issue 30's hostile and new-user cases for the settings and the tools (chat, bench.py, plot): each runs the
real entry point where it makes sense and looks at what it printed and left on disk."""
import json
import os
import shlex
import shutil

import pytest
from conftest import tiny_base
import torch

from minorpo import checkpoint, config, lora, tiny
from minorpo.files import save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORPO = os.path.join(ROOT, "presets", "orpo.yml")


def test_help_gives_the_phases_syntax_as_an_override_that_works(run_limited):
    p = run_limited(["train.py", "--help"], timeout=120)
    assert p.returncode == 0, p.stderr
    example = next(line for line in p.stdout.splitlines() if "e.g. 'training.phases=" in line)
    [override] = shlex.split(example.split("e.g.", 1)[1].split("  (")[0])  # as a shell would pass it
    phases = config.load(ORPO, [override])["training"]["phases"]
    assert phases[0] == {"step": 0, "trainable": ["lora", "attn_lora"]} and len(phases) == 2


def test_an_empty_target_list_for_a_trained_lora_group_names_that_key(run_many, one_line_error, tmp_path,
                                                                      tiny_model):
    phases = "training.phases=[{step: 0, trainable: [lora, attn_lora]}]"
    runs = run_many({key: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path}", f"model_name={tiny_model}",
                           phases, f"lora.{key}=[]"]
                     for key in ("targets", "attn_targets")}, timeout=120)
    for key, p in runs.items():
        one_line_error(p, f"`lora.{key}` is empty", f"lora.{key}=[", "training.phases")
        assert "start_layer" not in p.stderr
    assert os.listdir(tmp_path) == []  # refused before anything was written


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_base(str(tmp_path_factory.mktemp("tools") / "tiny-base"))


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


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A LoRA run's final/ as train.py writes it: the merged model, the adapter alone in adapter/."""
    final = tmp_path_factory.mktemp("lora-run") / "final"
    model = checkpoint.load_model(tiny_model)
    lora.inject_lora(model, rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    lora.save_adapter(model, str(final / "adapter"), base_model_name=os.path.abspath(tiny_model))
    checkpoint.write_model(lora.merge_lora(model), str(final), tokenizer_from=tiny_model)
    return final


def adapter_copy(trained, to, config=None, tensors=None):
    shutil.copytree(trained / "adapter", to)
    if config:
        path = to / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        save_safetensors(tensors, str(to / "adapter_model.safetensors"))
    return to


def test_chat_checks_every_adapter_and_never_merges_one_twice(tiny_model, trained, tmp_path, run_many,
                                                             one_line_error):
    layer = "base_model.model.model.layers.0.mlp.gate_proj"
    cases = {  # name: (model, adapter folder, what the error line names)
        "merged again": (trained, trained / "adapter", ["already holds this adapter", "drop --adapter"]),
        "copied onto final": (trained, adapter_copy(trained, tmp_path / "copy"), ["was trained on", tiny_model]),
        "bad r": (tiny_model, adapter_copy(trained, tmp_path / "r", {"r": "4"}), ["adapter_config.json", "r='4'"]),
        "wrong r": (tiny_model, adapter_copy(trained, tmp_path / "r8", {"r": 8}), ["has shape", "r=8"]),
        "foreign layer": (tiny_model, adapter_copy(trained, tmp_path / "x", tensors={
            layer.replace("gate_proj", "nothing") + ".lora_A.weight": torch.zeros(4, 64)}), ["nothing", "linear"]),
        "half a pair": (tiny_model, adapter_copy(trained, tmp_path / "half", tensors={
            f"{layer}.lora_A.weight": torch.zeros(4, tiny.TINY_MODEL["hidden_size"])}), ["lora_A and lora_B"]),
    }
    runs = {name: ["-m", "minorpo.chat", model, "--adapter", adapter] for name, (model, adapter, _) in cases.items()}
    runs.update({"base + adapter": ["-m", "minorpo.chat", tiny_model, "--adapter", trained / "adapter"],
                 "final alone": ["-m", "minorpo.chat", trained]})
    done = run_many({name: [*args, "--prompt", "Sort: 3 1 2", "--max-new-tokens", "8"]
                     for name, args in runs.items()}, timeout=180)
    for name, (_, adapter, needles) in cases.items():
        one_line_error(done[name], f"--adapter {adapter}", *needles)
    assert done["base + adapter"].returncode == 0, done["base + adapter"].stderr
    assert done["base + adapter"].stdout == done["final alone"].stdout  # merged once, as train.py merged it


def test_chat_says_once_that_later_turns_are_outside_a_single_turn_demo_models_training(tiny_model, tmp_path,
                                                                                       run_many):
    demo = shutil.copytree(tiny_model, tmp_path / "final")
    (demo / "config.yml").write_text("data:\n  path: tiny\n")  # as final/config.yml of the demo's runs says
    (tmp_path / "stdin.txt").write_text("Sort: 3 1 2\nReverse: a b\nRepeat: c\n")
    wrapper = ("import os, runpy, sys; os.dup2(os.open(sys.argv[1], os.O_RDONLY), 0); sys.argv[1:2] = []; "
               "runpy.run_module('minorpo.chat', run_name='__main__')")
    done = run_many({name: ["-c", wrapper, tmp_path / "stdin.txt", model, "--max-new-tokens", "4"]
                     for name, model in (("demo", demo), ("other", tiny_model))}, timeout=180)
    assert done["demo"].returncode == 0 and done["other"].returncode == 0, done["demo"].stderr
    assert done["demo"].stderr.count("later turns are outside its training") == 1
    assert done["demo"].stdout == done["other"].stdout  # the same weights: every message answered alike
    assert "outside its training" not in done["other"].stderr
