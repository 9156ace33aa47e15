"""Configuration: a YAML preset, then `key=value` overrides, each checked against presets/orpo.yml.

    python train.py presets/orpo.yml training.orpo_lambda=0.2 data.path=pairs.jsonl

presets/orpo.yml is the schema. Each key's value there is its default and sets its type; its comment (what
`--help` prints) gives the allowed words as `a | b | c` and the allowed numbers as an interval ([ ] include
the bound, ( ) exclude it). A preset may leave keys out, as a nanoGPT config overrides some of train.py's
globals, except training.orpo_lambda: as in EulerForge's ORPO tutorial an orpo preset must set it, since the
right value depends on whether the model had SFT first. Every number is checked finite and in range before
anything runs (`learning_rate=inf` would train for an hour and save NaN weights), and an unknown key gets a
"did you mean" (a silently ignored typo costs a whole run). files.read_yaml reads the preset strictly.
"""
import copy
import difflib
import math
import os
import re
import sys

import yaml

from minorpo.files import UserError, atomic_write, parse_yaml, read_yaml


class ConfigError(UserError):
    """A problem with a preset or an override; the message names the key and the fix."""


def flat(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}: every dotted key with its value."""
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def documented(text):
    """{dotted key: (value as written, comment)} for each `key: value  # comment` line of a preset's text."""
    found, section = {}, ""
    for line in text.splitlines():
        if match := re.match(r"^( *)(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line):
            indent, key, value, comment = match.groups()
            section = section if indent else "" if value else key + "."
            found[section + key if indent else key] = (value, comment or "")
    return found


PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
DEFAULTS, _text = read_yaml(os.path.join(PRESETS, "orpo.yml"))
FLAT_DEFAULTS = flat(DEFAULTS)  # {dotted key: default}; never changed (load copies DEFAULTS)
HELP = {key: line for key, line in documented(_text).items() if key in FLAT_DEFAULTS}
CHOICES = {key: [word.split()[0].rstrip(":") for word in comment.split(" | ")]
           for key, (_, comment) in HELP.items() if " | " in comment}
INTERVAL = re.compile(r"([\[(])(-?[\d.e+]+), (-?[\d.e+]+)([\])])")  # (0, 1] in a comment
RANGES = {key: match for key, (_, comment) in HELP.items() if (match := INTERVAL.search(comment))}
NULLABLE = {"training.orpo_lambda": float, "training.resume_from": str, "data.eval_path": str,  # None or this
            "training.epochs": float}
EXAMPLES = {"training.phases": "'training.phases=[{step: 0, trainable: [lora, attn_lora]}, "
                               "{step: 200, trainable: [lora, attn_lora, norm]}]'  (steps from 0 upwards)"}
GROUPS = ("lora", "attn_lora", "embed", "norm", "head", "all")  # trainable groups (minorpo/lora.py)


def shown(value):
    """A value as an error message shows it: its repr, cut short so that a hostile value stays one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def check(key, value, where):
    """Return `value` if it suits `key` (type, choice, range); else raise one line naming key, rule, value."""
    want = NULLABLE.get(key) or type(FLAT_DEFAULTS[key])
    if value is None and key in NULLABLE:
        return None
    value = float(value) if want is float and type(value) is int else value
    if type(value) is not want:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}[want]
        raise ConfigError(f"{where}: `{key}` must be {kind}{' or null' if key in NULLABLE else ''}, got {shown(value)}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: `{key}` must be one of {' | '.join(CHOICES[key])}, got {shown(value)}")
    if match := RANGES.get(key):
        opening, low, high, closing = match[1], float(match[2]), float(match[3]), match[4]
        if not (math.isfinite(value) and (low < value if opening == "(" else low <= value)
                and (value < high if closing == ")" else value <= high)):
            raise ConfigError(f"{where}: `{key}` must be in {match[0]}, got {value}")
    if isinstance(value, list) and key != "training.phases" and not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}: `{key}` must be a list of strings like [q_proj, v_proj], got {shown(value)}")
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and re.search("[\ud800-\udfff]", text) for text in texts):
        raise ConfigError(f"{where}: `{key}` holds a lone surrogate (\\ud800-\\udfff), which is not text; "
                          "write the character itself or fix the file's encoding")
    return value


def set_key(cfg, key, value, where):
    """Set one dotted key of the nested cfg, with a "did you mean" for an unknown one."""
    if isinstance(DEFAULTS.get(key), dict):
        raise ConfigError(f"{where}: `{key}` is a section: give its keys, like {key}.{next(iter(DEFAULTS[key]))}")
    if key not in FLAT_DEFAULTS:
        close = difflib.get_close_matches(key[:100], FLAT_DEFAULTS, n=1, cutoff=0.6)
        raise ConfigError(f"{where}: unknown config key `{key if len(key) <= 80 else key[:60] + '...'}`;" +
                          (f" did you mean `{close[0]}`?" if close else " `python train.py --help` lists them"))
    section, _, leaf = key.rpartition(".")  # sections are one level deep
    (cfg[section] if section else cfg)[leaf] = check(key, value, where)


def validate(cfg, given, where):
    """The checks that involve more than one key; `given` is the set of keys the preset or an override set."""
    train, data = cfg["training"], cfg["data"]
    if train["type"] == "orpo" and (train["orpo_lambda"] is None or "training.orpo_lambda" not in given):
        raise ConfigError(f"{where}: `training.orpo_lambda` is required for training.type: orpo (the paper used "
                          "0.1 to 0.25; 1.0 for ORPO alone); set e.g. training.orpo_lambda=0.1")
    if (train["type"] == "sft") != (data["task"] == "sft"):
        raise ConfigError(f"{where}: training.type: {train['type']} cannot train on data.task: {data['task']}; "
                          "sft trains on data.task=sft, orpo on preference or prompted_preference")
    if train["lr_schedule"] == "inverse_sqrt" and train["warmup_steps"] < 1:
        raise ConfigError(f"{where}: `training.lr_schedule: inverse_sqrt` decays as sqrt(warmup_steps / step), so it "
                          "needs `training.warmup_steps` of at least 1 (the paper used 200); set e.g. "
                          "training.warmup_steps=200")
    if data["max_prompt_length"] >= data["max_length"]:
        raise ConfigError(f"{where}: `data.max_prompt_length` ({data['max_prompt_length']}) must be smaller than "
                          f"`data.max_length` ({data['max_length']}) to leave room for the response")
    if 0 < cfg["sample"]["temperature"] < 0.01:
        raise ConfigError(f"{where}: `sample.temperature` must be 0 (greedy) or in [0.01, 100], "
                          f"got {cfg['sample']['temperature']}")
    if cfg["run_name"] in ("", ".", "..") or not re.fullmatch(r"[\w.+-]+", cfg["run_name"]):
        raise ConfigError(f"{where}: `run_name` must be a plain folder name (letters, digits, . _ + -), "
                          f"got {shown(cfg['run_name'])}")
    phases = train["phases"]
    good = all(isinstance(p, dict) and sorted(p) == ["step", "trainable"] and type(p["step"]) is int
               and isinstance(p["trainable"], list) and p["trainable"] and all(g in GROUPS for g in p["trainable"])
               for p in phases)
    steps = [p["step"] for p in phases] if good else []
    if not (steps and steps[0] == 0 and steps == sorted(set(steps))):  # from 0, strictly increasing
        raise ConfigError(f"{where}: `training.phases` must be a list like [{{step: 0, trainable: [lora]}}] with steps "
                          f"from 0 upwards and groups from {', '.join(GROUPS)}; got {shown(phases)}")
    for group, key in (("lora", "targets"), ("attn_lora", "attn_targets")):  # a group of no layers trains nothing
        example = ", ".join(FLAT_DEFAULTS[f"lora.{key}"])
        if not cfg["lora"][key] and any(group in p["trainable"] for p in phases):
            raise ConfigError(f"{where}: `training.phases` trains `{group}` but `lora.{key}` is empty; list its "
                              f"projections, e.g. lora.{key}=[{example}], or drop `{group}`")
    return cfg


def parse_args(argv):
    """Split ['preset.yml', 'a.b=1', ...] into the preset path and the overrides."""
    presets = [a for a in argv if "=" not in a]
    if len(presets) != 1 or presets[0].startswith("-"):
        raise ConfigError("command line: usage: python train.py PRESET.yml [key=value ...] "
                          "(python train.py --help lists the presets and keys)")
    return presets[0], [a for a in argv if "=" in a]


def load(path, overrides=()):
    """Read a preset, apply key=value overrides, check. Returns the resolved nested dict."""
    settings = [(key, value, path) for key, value in flat(read_yaml(path)[0]).items()]
    for assignment in overrides:
        key, text = assignment.split("=", 1)
        where = f"`{assignment}`" if len(assignment) <= 80 else f"`{assignment[:60]}...`"  # one short line
        settings.append((key.strip(), parse_yaml(text, where), where))
    cfg, given = copy.deepcopy(DEFAULTS), {key for key, _, _ in settings}
    for key, value, where in settings:
        set_key(cfg, key, value, where)
    if left_out := [key for key in FLAT_DEFAULTS if key not in given]:  # said, as they suit only the tiny demo
        print(f"[config] {path} leaves out {len(left_out)} keys ({', '.join(left_out[:3])}, ...); they take "
              "presets/orpo.yml's values, tuned for the tiny demo model", file=sys.stderr)
    return validate(cfg, given, path + (" + overrides" if overrides else ""))


def save(cfg, run_dir):
    """Write the resolved config to run_dir/config.yml (atomically), keys in presets/orpo.yml's order."""
    atomic_write(os.path.join(run_dir, "config.yml"), dump(cfg))


def dump(cfg):
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def help_text():
    """What `python train.py --help` prints: the shipped presets, then every key of presets/orpo.yml."""
    lines = ["usage: python train.py PRESET.yml [key=value ...]", "", "presets:"]
    lines += [f"  presets/{name}" for name in sorted(os.listdir(PRESETS)) if name.endswith(".yml")]
    lines += ["", "keys, with their values in presets/orpo.yml (override any with key=value):"]
    for key, (value, comment) in HELP.items():
        lines.append(f"  {key}={value or '...'}".ljust(40) + f" {comment}")
        if key in EXAMPLES:  # a value that is not one word: its syntax, as a shell takes it
            lines.append(f"      e.g. {EXAMPLES[key]}")
    lines += ["", "values are YAML (true, 3, 1e-4, [q_proj, v_proj]); quote an override that holds spaces, "
              "brackets or braces"]
    return "\n".join(lines)
