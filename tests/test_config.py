"""Config: presets load, overrides reach every depth, values parse as YAML, mistakes are named."""
import glob
import os
import re

import pytest
import yaml

from minorpo import config
from minorpo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "presets", "*.yml")))
ORPO = os.path.join(ROOT, "presets", "orpo.yml")


def write(tmp_path, text, name="p.yml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_loads_and_lists_every_key_with_a_comment(path):
    cfg = config.load(path)
    assert cfg["training"]["type"] in ("sft", "orpo")
    text = open(path).read()
    tree = yaml.safe_load(text)
    present = []
    for section, value in tree.items():
        present += [f"{section}.{k}" for k in value] if isinstance(value, dict) else [section]
    assert sorted(present) == sorted(config.all_keys()), "a preset must list every key"
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#") and not line.strip().startswith("- step"):
            if line.rstrip().endswith(":") or line.strip().startswith("trainable"):
                continue
            assert "#" in line, f"{os.path.basename(path)}: key without a comment: {line!r}"


def test_overrides_at_every_depth():
    cfg = config.load(ORPO, ["model_name=outputs/sft/final", "training.orpo_lambda=0.3",
                             "data.path=pairs.jsonl", "lora.rank=4"])
    assert cfg["model_name"] == "outputs/sft/final"
    assert cfg["training"]["orpo_lambda"] == 0.3
    assert cfg["data"]["path"] == "pairs.jsonl"
    assert cfg["lora"]["rank"] == 4


def test_values_parse_as_yaml():
    cfg = config.load(ORPO, ["data.group_by_length=false", "data.eval_path=null", "training.max_steps=3",
                             "lora.attn_targets=[q_proj, k_proj, v_proj]",
                             "training.phases=[{step: 0, trainable: [lora]}, {step: 5, trainable: [all]}]"])
    assert cfg["data"]["group_by_length"] is False
    assert cfg["data"]["eval_path"] is None
    assert cfg["training"]["max_steps"] == 3
    assert cfg["lora"]["attn_targets"] == ["q_proj", "k_proj", "v_proj"]
    assert cfg["training"]["phases"][1] == {"step": 5, "trainable": ["all"]}


@pytest.mark.parametrize("text,expected", [("1e-4", 1e-4), ("1", 1.0), ("3.0e-5", 3e-5), ("2E-3", 2e-3)])
def test_float_keys_accept_exponents_and_integers(text, expected):
    assert yaml.safe_load("1e-4") == "1e-4"  # why this matters: PyYAML (YAML 1.1) reads it as a string
    cfg = config.load(ORPO, [f"training.learning_rate={text}"])
    assert cfg["training"]["learning_rate"] == expected
    assert isinstance(cfg["training"]["learning_rate"], float)


def test_float_in_file_written_without_dot(tmp_path):
    cfg = config.load(write(tmp_path, "training:\n  learning_rate: 1e-4\n  orpo_lambda: 1\n"))
    assert cfg["training"]["learning_rate"] == 1e-4
    assert cfg["training"]["orpo_lambda"] == 1.0


def test_unknown_key_on_command_line_suggests_closest():
    with pytest.raises(ConfigError, match=r"training\.orpo_lamda.*did you mean `training\.orpo_lambda`"):
        config.load(ORPO, ["training.orpo_lamda=0.3"])
    with pytest.raises(ConfigError, match=r"model_nme.*did you mean `model_name`"):
        config.load(ORPO, ["model_nme=x"])
    with pytest.raises(ConfigError, match=r"traning\.max_steps.*did you mean `training\.max_steps`"):
        config.load(ORPO, ["traning.max_steps=3"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "data:\n  max_lenght: 100\n")
    with pytest.raises(ConfigError, match=r"p\.yml.*data\.max_lenght.*did you mean `data\.max_length`"):
        config.load(path)


@pytest.mark.parametrize("override,expected,shown", [
    ("training.max_steps=ten", "`training.max_steps` must be an integer", "'ten'"),
    ("training.max_steps=2.5", "`training.max_steps` must be an integer", "2.5"),
    ("training.learning_rate=fast", "`training.learning_rate` must be a number", "'fast'"),
    ("data.group_by_length=maybe", "`data.group_by_length` must be true or false", "'maybe'"),
    ("training.type=dpo", "`training.type` must be one of sft | orpo", "'dpo'"),
    ("lora.targets=q_proj", "`lora.targets` must be a list of strings", "'q_proj'"),
    ("training.phases=[{step: 0, trainable: [everything]}]", "`training.phases` trainable must be", "'everything'"),
])
def test_wrong_type_names_key_expected_and_value(override, expected, shown):
    with pytest.raises(ConfigError) as e:
        config.load(ORPO, [override])
    assert expected in str(e.value) and shown in str(e.value)


def test_orpo_lambda_required_and_positive(tmp_path):
    path = write(tmp_path, "training:\n  type: orpo\n")
    with pytest.raises(ConfigError, match="orpo_lambda` is required"):
        config.load(path)
    with pytest.raises(ConfigError, match="orpo_lambda` is required"):
        config.load(ORPO, ["training.orpo_lambda=null"])
    for bad in ("0", "-0.1"):
        with pytest.raises(ConfigError, match="orpo_lambda` must be positive"):
            config.load(ORPO, [f"training.orpo_lambda={bad}"])
    sft = config.load(os.path.join(ROOT, "presets", "sft.yml"))
    assert sft["training"]["orpo_lambda"] is None  # not needed for sft


def test_parse_args_accepts_plain_and_seed_spelling():
    preset, overrides = config.parse_args(["presets/orpo.yml", "a.b=1", "--set", "c=2", "--set=d=3"])
    assert preset == "presets/orpo.yml" and overrides == ["a.b=1", "c=2", "d=3"]
    preset, overrides = config.parse_args(["--preset", "x.yml", "--set", "model_name=m"])
    assert preset == "x.yml" and overrides == ["model_name=m"]
    with pytest.raises(ConfigError, match="no preset"):
        config.parse_args(["a=1"])
    with pytest.raises(ConfigError, match="`--set` needs a value"):
        config.parse_args(["x.yml", "--set"])


def test_set_spelling_end_to_end():
    preset, overrides = config.parse_args([ORPO, "--set", "training.orpo_lambda=0.25", "--set", "data.max_length=96"])
    cfg = config.load(preset, overrides)
    assert cfg["training"]["orpo_lambda"] == 0.25 and cfg["data"]["max_length"] == 96


def test_resolved_config_saved_and_reloads_identically(tmp_path):
    cfg = config.load(ORPO, ["training.orpo_lambda=0.2", "training.learning_rate=1e-4"])
    path = config.save(cfg, str(tmp_path / "run"))
    assert config.load(path) == cfg
    assert "orpo_lambda: 0.2" in open(path).read()


@pytest.mark.parametrize("override,message", [
    ("training.weight_decay=-0.1", "`training.weight_decay` must be >= 0, got -0.1"),
    ("lora.dropout=1", "`lora.dropout` must be < 1, got 1.0"),
    ("lora.alpha=0", "`lora.alpha` must be > 0, got 0.0"),
    ("training.min_lr_ratio=2", "`training.min_lr_ratio` must be <= 1, got 2.0"),
    ("training.batch_size=0", "`training.batch_size` must be >= 1, got 0"),
    ("data.eval_fraction=1", "`data.eval_fraction` must be < 1, got 1.0"),
])
def test_numbers_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(ORPO, [override])


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        config.load(ORPO, ["data.max_prompt_length=200", "data.max_length=100"])
    with pytest.raises(ConfigError, match="needs preference data"):
        config.load(ORPO, ["data.task=sft"])
    with pytest.raises(ConfigError, match="steps must start at 0"):
        config.load(ORPO, ["training.phases=[{step: 5, trainable: [lora]}]"])


def test_missing_or_broken_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match=r"p\.yml:2: not valid YAML"):
        config.load(write(tmp_path, "training:\n  type: orpo: sft\n"))
