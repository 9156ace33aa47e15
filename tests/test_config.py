"""Config: presets load, overrides reach every depth, values parse as YAML, mistakes are named."""
import glob
import os
import re

import pytest
import yaml

from minorpo import config
from minorpo.config import ConfigError
from minorpo.files import UserError

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
    assert sorted(present) == sorted(config.flat(config.DEFAULTS)), "a preset must list every key"
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
    ("data.group_by_length=on", "`data.group_by_length` must be true or false", "'on'"),
    ("training.type=dpo", "`training.type` must be one of sft | orpo", "'dpo'"),
    ("lora.targets=q_proj", "`lora.targets` must be a list", "'q_proj'"),
    ("lora.targets=[1, 2]", "`lora.targets` must be a list of strings", "[1, 2]"),
    ("training.phases=[{step: 0, trainable: [everything]}]", "`training.phases` must be a list like", "'everything'"),
])
def test_wrong_type_names_key_expected_and_value(override, expected, shown):
    with pytest.raises(ConfigError) as e:
        config.load(ORPO, [override])
    assert expected in str(e.value)
    assert shown in str(e.value)


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_on_off_words_stay_words_on_the_command_line(word):
    assert config.load(ORPO, [f"training.compile={word}"])["training"]["compile"] == word


def documented_choices(path):
    """{dotted key: [words]} from a preset's comments that list choices as `a (...) | b: ... | c`."""
    found, section = {}, ""
    for line in open(path):
        key = line.split(":", 1)[0].strip()
        if not line.startswith(" "):
            section = key + "." if line.rstrip().endswith(":") else ""
        if " | " in line.split("#", 1)[-1] and "#" in line:
            words = [re.match(r"\s*([\w.]+)", part)[1] for part in line.split("#", 1)[1].split(" | ")]
            found[section + key] = words
    return found


def test_presets_orpo_yml_documents_exactly_the_choices_config_accepts():
    documented = {key: sorted(words) for key, words in documented_choices(ORPO).items()}
    assert documented == {key: sorted(words) for key, words in config.CHOICES.items()}


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_every_preset_documents_only_choices_config_accepts(path):
    for key, words in documented_choices(path).items():
        assert sorted(words) == sorted(config.CHOICES[key]), (os.path.basename(path), key)


def test_keys_a_preset_leaves_out_take_their_values_from_presets_orpo_yml_and_it_says_so(tmp_path, capsys):
    partial = config.load(write(tmp_path, "run_name: mine\ntraining:\n  orpo_lambda: 0.2\n"))
    assert "p.yml leaves out 51 keys (output_dir, model_name, seed, ...)" in capsys.readouterr().err
    assert partial == config.load(ORPO, ["run_name=mine", "training.orpo_lambda=0.2"])
    assert capsys.readouterr().err == ""  # a complete preset: nothing to say


@pytest.mark.parametrize("key,choice", [(k, c) for k, words in sorted(config.CHOICES.items()) for c in words])
def test_every_documented_choice_is_read_as_typed_on_the_command_line_and_in_a_file(key, choice):
    assert config.check(key, config.parse_yaml(choice, "cli"), "cli") == choice  # YAML keeps it a word
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {choice}\n"
    assert config.flat(config.parse_yaml(text, "p.yml"))[key] == choice


def test_on_off_words_stay_words_in_a_file(tmp_path):
    cfg = config.load(write(tmp_path, "training:\n  compile: on\n  orpo_lambda: 1\n"))
    assert cfg["training"]["compile"] == "on"


def test_orpo_lambda_is_required_for_orpo(tmp_path):
    with pytest.raises(ConfigError, match="orpo_lambda` is required"):
        config.load(write(tmp_path, "training:\n  type: orpo\n"))
    with pytest.raises(ConfigError, match="orpo_lambda` is required"):
        config.load(ORPO, ["training.orpo_lambda=null"])


@pytest.mark.parametrize("bad", ["0", "-0.1", ".inf", ".nan"])
def test_orpo_lambda_must_be_positive_and_finite(bad):
    with pytest.raises(ConfigError, match=re.escape("`training.orpo_lambda` must be in (0, 1000]")):
        config.load(ORPO, [f"training.orpo_lambda={bad}"])


def test_sft_preset_needs_no_orpo_lambda():
    assert config.load(os.path.join(ROOT, "presets", "sft.yml"))["training"]["orpo_lambda"] is None


def test_parse_args_splits_preset_and_overrides():
    assert config.parse_args(["presets/orpo.yml", "a.b=1", "c=2"]) == ("presets/orpo.yml", ["a.b=1", "c=2"])
    with pytest.raises(ConfigError, match="usage"):
        config.parse_args(["a=1"])
    with pytest.raises(ConfigError, match="usage"):
        config.parse_args(["x.yml", "y.yml"])


def test_resolved_config_saved_and_reloads_identically(tmp_path):
    cfg = config.load(ORPO, ["training.orpo_lambda=0.2", "training.learning_rate=1e-4"])
    config.save(cfg, str(tmp_path / "run"))
    path = str(tmp_path / "run" / "config.yml")
    assert config.load(path) == cfg
    assert "orpo_lambda: 0.2" in open(path).read()


@pytest.mark.parametrize("override,message", [
    ("training.weight_decay=-0.1", "`training.weight_decay` must be in [0, 10], got -0.1"),
    ("training.weight_decay=.inf", "`training.weight_decay` must be in [0, 10], got inf"),
    ("training.learning_rate=.inf", "`training.learning_rate` must be in (0, 1], got inf"),
    ("training.learning_rate=1e400", "`training.learning_rate` must be in (0, 1], got inf"),
    ("lora.dropout=1", "`lora.dropout` must be in [0, 1), got 1.0"),
    ("lora.alpha=0", "`lora.alpha` must be in (0, 1000000], got 0.0"),
    ("lora.alpha=.inf", "`lora.alpha` must be in (0, 1000000], got inf"),
    ("lora.rank=1000000", "`lora.rank` must be in [1, 65536], got 1000000"),
    ("lora.rank=1e30", "`lora.rank` must be an integer, got 1e+30"),
    ("training.min_lr_ratio=2", "`training.min_lr_ratio` must be in [0, 1], got 2.0"),
    ("training.batch_size=0", "`training.batch_size` must be in [1, 65536], got 0"),
    ("data.eval_fraction=1", "`data.eval_fraction` must be in [0, 1), got 1.0"),
    ("seed=9223372036854775808", "`seed` must be in [0, 2147483647], got 9223372036854775808"),
    ("sample.top_p=0", "`sample.top_p` must be in (0, 1], got 0.0"),
    ("sample.max_new_tokens=0", "`sample.max_new_tokens` must be in [1, 65536], got 0"),
])
def test_numbers_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(ORPO, [override])


def test_a_tiny_nonzero_temperature_is_refused_with_the_allowed_range():
    with pytest.raises(ConfigError, match=re.escape("must be 0 (greedy) or in [0.01, 100]")):
        config.load(ORPO, ["sample.temperature=1e-45"])


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", "/abs"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match="`run_name` must be a plain folder name"):
        config.load(ORPO, [f"run_name={name}"])


def test_max_prompt_length_must_leave_room_for_the_response():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        config.load(ORPO, ["data.max_prompt_length=200", "data.max_length=100"])


def test_orpo_refuses_sft_data():
    with pytest.raises(ConfigError, match="cannot train on data.task: sft"):
        config.load(ORPO, ["data.task=sft"])


def test_phases_must_start_at_step_zero():
    with pytest.raises(ConfigError, match="steps from 0 upwards"):
        config.load(ORPO, ["training.phases=[{step: 5, trainable: [lora]}]"])


def test_a_section_given_a_value_is_named():
    with pytest.raises(ConfigError, match="`training` is a section"):
        config.load(ORPO, ["training=3"])


def test_missing_preset_is_named(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load(str(tmp_path / "nope.yml"))


def test_broken_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"p\.yml:2: not valid YAML"):
        config.load(write(tmp_path, "training:\n  type: orpo: sft\n"))


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    with pytest.raises(UserError, match=r"p\.yml:3: duplicate key `max_steps`"):
        config.load(write(tmp_path, "training:\n  max_steps: 5\n  max_steps: 6\n"))


def test_billion_laughs_is_refused_at_the_first_anchor(tmp_path):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(UserError, match=r"p\.yml:1: YAML anchors and aliases") as e:
        config.load(write(tmp_path, laughs))
    assert len(str(e.value)) < 300


def test_a_preset_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.yml"
    path.write_bytes(b"run_name: a\nmodel_name: caf\xe9\n")
    with pytest.raises(UserError, match=r"p\.yml:2: not UTF-8"):
        config.load(str(path))


def test_a_huge_preset_is_refused_before_reading(tmp_path):
    path = tmp_path / "p.yml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(UserError, match="at most 1 MB"):
        config.load(str(path))


@pytest.mark.parametrize("override", ["run_name=a\udcff", "lora.targets=[q_proj, \"v\\ud800\"]"])
def test_a_lone_surrogate_is_refused_by_name(override):
    # what the shell hands Python for bytes that are not UTF-8, or a YAML escape for half a UTF-16 pair
    with pytest.raises(UserError, match="lone surrogate|unacceptable character #xdcff"):
        config.load(ORPO, [override])


def test_a_huge_integer_is_not_an_integer_and_a_long_value_is_cut_short():
    with pytest.raises(ConfigError) as e:
        config.load(ORPO, ["seed=" + "9" * 5000])
    assert "`seed` must be an integer" in str(e.value) and "characters)" in str(e.value)
    assert len(str(e.value)) < 300


def test_a_huge_unknown_key_is_named_in_one_short_line():
    with pytest.raises(ConfigError, match=r"unknown config key `xxxx+\.\.\.`") as e:
        config.load(ORPO, ["x" * 100000 + "=1"])
    assert len(str(e.value)) < 300


def test_help_lists_presets_and_every_key():
    text = config.help_text()
    assert "presets/orpo.yml" in text
    assert "presets/sft.yml" in text
    for key in config.flat(config.DEFAULTS):
        assert f"  {key}=" in text, key
