"""train.py end to end, in subprocesses, on the embedded tiny model and data (a few dozen steps each)."""
import json
import os

import pytest
import torch
import yaml
from conftest import _run, tiny_base
from safetensors.torch import load_file

from minorpo import chat, checkpoint, files, lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["training.log_every=5", "training.eval_every=0", "training.warmup_steps=2", "sample.max_new_tokens=8"]


def train(out, *overrides, preset="orpo", check=True):
    p = _run([os.path.join(ROOT, "train.py"), os.path.join(ROOT, "presets", f"{preset}.yml"), f"output_dir={out}",
              *FAST, *overrides])
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("orpo")
    p = train(out, "training.max_steps=40", "training.eval_every=40")
    return out, p.stdout


def test_orpo_run_lowers_loss_and_writes_outputs(orpo_run):
    out, stdout = orpo_run
    start, *rows = metrics(out / "orpo")
    assert start["step"] == 0 and "eval/rejected_logps" in start and "train/total_loss" not in start
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[-1]["train/total_loss"] < rows[0]["train/total_loss"]
    assert rows[-1]["train/orpo_loss"] < rows[0]["train/orpo_loss"] < 0.71  # from about ln 2: it cannot tell yet
    for key in ("train/sft_loss", "train/orpo_loss", "train/log_odds_ratio", "train/pref_accuracy", "train/chosen_logps",
                "train/rejected_logps", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert key in rows[0], key
    assert {"eval/pref_accuracy", "eval/rejected_logps", "eval/total_loss"} <= set(rows[-1])
    lam = yaml.safe_load((out / "orpo" / "config.yml").read_text())["training"]["orpo_lambda"]
    assert rows[-1]["train/total_loss"] == pytest.approx(rows[-1]["train/sft_loss"] + lam * rows[-1]["train/orpo_loss"])
    assert (out / "orpo" / "config.yml").is_file()
    assert sorted(os.listdir(out / "orpo" / "final")) == ["adapter", "config.json", "config.yml", "metrics.jsonl",
                                                     "model.safetensors", "tokenizer.json"]  # the demo trains LoRA
    assert "example pair (trained tokens marked)" in stdout and "[sample] after training" in stdout


def test_final_checkpoint_loads_back_and_generates(orpo_run):
    out, _ = orpo_run
    model = checkpoint.load_model(str(out / "orpo" / "final"))
    base = checkpoint.load_model(str(out / "tiny-base"))
    layer, base_layer = model.model.layers[0].mlp.up_proj, base.model.layers[0].mlp.up_proj
    assert not torch.equal(layer.weight, base_layer.weight)  # it trained (LoRA, merged into the weight)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)  # the head is not a LoRA target
    new = model.generate([1, 2, 3], max_new_tokens=5)
    assert len(new) == 5 and all(0 <= i < model.config.vocab_size for i in new)


def test_lora_run_saves_merged_model_and_peft_adapter(tmp_path):
    train(tmp_path, "training.max_steps=6", "training.learning_rate=1e-2", "lora.rank=4",
          "training.phases=[{step: 0, trainable: [lora, attn_lora]}]")
    final = tmp_path / "orpo" / "final"
    assert sorted(os.listdir(final / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # base + adapter, merged here, equals the merged checkpoint that train.py wrote
    model = checkpoint.load_model(str(tmp_path / "tiny-base"))
    chat.load_adapter(model, str(final / "adapter"))
    lora.merge_lora(model)
    saved = load_file(str(final / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.allclose(tensor, saved[name], atol=1e-6), name
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"],
                           checkpoint.load_model(str(tmp_path / "tiny-base")).model.layers[0].mlp.up_proj.weight)


def test_resume_ends_with_the_same_weights(tmp_path):
    common = ["training.max_steps=10", "training.grad_accum_steps=2", "training.batch_size=4"]
    train(tmp_path, *common, "training.save_every=4", "run_name=through")
    assert sorted(p for p in os.listdir(tmp_path / "through") if p.startswith("step_")) == [
        "step_000004", "step_000008", "step_000010"]  # every save_every steps, and at the end
    p = train(tmp_path, *common, f"training.resume_from={tmp_path / 'through' / 'step_000004'}", "run_name=resumed")
    assert "continuing at step 4" in p.stdout
    a = load_file(str(tmp_path / "through" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [5, 10]


def overflowing_model(tmp_path):
    """The tiny model with one norm weight at 3e38: finite on disk, but every forward overflows to inf."""
    from minorpo import tiny
    base = tiny_base(str(tmp_path / "base"))
    model = checkpoint.load_model(base)
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)
    os.makedirs(tmp_path / "overflow")
    checkpoint.write_model(model, str(tmp_path / "overflow"), tokenizer_from=base)
    return str(tmp_path / "overflow")


def test_guard_stops_a_run_that_keeps_going_non_finite(tmp_path):
    # Every step is non-finite, is skipped, and the run stops after max_bad_steps of them, without final/.
    p = train(tmp_path, f"model_name={overflowing_model(tmp_path)}", "training.max_steps=20",
              "training.max_bad_steps=3", check=False)
    assert p.returncode != 0
    assert "[guard] 3 non-finite steps in a row: stopping" in p.stderr
    assert p.stdout.count("update skipped") == 3
    assert not (tmp_path / "orpo" / "final").exists()


def test_a_run_whose_every_step_was_skipped_writes_no_final(tmp_path):
    p = train(tmp_path, f"model_name={overflowing_model(tmp_path)}", "training.max_steps=3",
              "training.max_bad_steps=10", check=False)
    assert p.returncode != 0
    assert "every one of the 3 steps was skipped" in p.stderr
    assert not (tmp_path / "orpo" / "final").exists()


def test_sft_then_orpo_chains(tmp_path):
    train(tmp_path, "training.max_steps=10", preset="sft")
    rows = metrics(tmp_path / "sft")
    assert "train/orpo_loss" not in rows[0] and "eval/rejected_logps" in rows[-1]  # SFT still watches pairs
    sft_final = tmp_path / "sft" / "final"
    p = train(tmp_path, f"model_name={sft_final}", "training.max_steps=5")
    assert f"[model] {sft_final}" in p.stdout
    first = metrics(tmp_path / "orpo")[0]["train/sft_loss"]
    assert first < metrics(tmp_path / "sft")[0]["train/sft_loss"]  # it starts from the SFT weights


def test_bad_input_is_one_line_without_traceback(tmp_path, run_many, one_line_error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    cases = {  # name: (override, what the one error line names)
        "a typo in a key": ("training.orpo_lamda=0.2", ["did you mean `training.orpo_lambda`"]),
        "no such model": ("model_name=/no/such/model", ["/no/such/model"]),
        "no such data": ("data.path=/no/such.jsonl", ["/no/such.jsonl"]),
        "a malformed row": (f"data.path={bad}", [f"{bad}:2", "rejected"]),
    }
    results = run_many({name: ["train.py", "presets/orpo.yml", f"output_dir={tmp_path / name}", *FAST,
                               "training.max_steps=1", override] for name, (override, _) in cases.items()})
    for name, (_, needles) in cases.items():
        one_line_error(results[name], *needles)
        assert len(results[name].stderr.strip().splitlines()) == 1, (name, results[name].stderr)


def test_lora_orpo_on_a_tiny_qwen35_hybrid(tmp_path):
    from minorpo import tiny
    from minorpo.qwen35 import Qwen35, Qwen35Config
    config = Qwen35Config(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=4,  # 3 DeltaNet
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,  # + 1 gated attention
                          linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                          linear_value_head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path / "qwen35-tiny"
    with files.atomic_folder(str(folder)) as tmp:
        checkpoint.write_model(Qwen35(config, seed=0), tmp)
        tiny.build_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
    train(tmp_path, f"model_name={folder}", "training.max_steps=15", "training.learning_rate=1e-2",
          "training.phases=[{step: 0, trainable: [lora, attn_lora]}]",
          "lora.attn_targets=[q_proj, v_proj, in_proj_qkv]")
    rows = metrics(tmp_path / "orpo")
    assert rows[-1]["train/total_loss"] < rows[0]["train/total_loss"]
    adapter = json.loads((tmp_path / "orpo" / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["down_proj", "gate_proj", "in_proj_qkv", "q_proj", "up_proj", "v_proj"]
    model = checkpoint.load_model(str(tmp_path / "orpo" / "final"))
    assert isinstance(model, Qwen35) and len(model.generate([1, 2, 3], max_new_tokens=3)) == 3
