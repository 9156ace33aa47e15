"""Configuration: a YAML preset, then `key=value` overrides, checked against DEFAULTS.

    python train.py presets/orpo.yml training.orpo_lambda=0.2 data.path=pairs.jsonl

Decisions:
- DEFAULTS is the schema: a key's type is its default's type; CHOICES and RANGES hold the allowed words
  and intervals. An unknown key gets a "did you mean": a silently ignored typo costs a whole run.
- A preset may come from someone else, so it is read strictly: at most 1 MB of UTF-8, no duplicate keys
  (the later would silently win), no anchors or aliases (a few nested aliases expand to gigabytes).
- Booleans are only true and false: YAML 1.1 would turn `compile: on` into True. `1e-4` is a number.
- Every number must be finite and in range before anything runs: `learning_rate=inf` would train for an
  hour and save NaN weights.
"""
import copy
import difflib
import math
import os
import re

import yaml

from minorpo.files import UserError, atomic_write


class ConfigError(UserError):
    """A problem with a preset or an override; the message names the key and the fix."""


GROUPS = ("lora", "attn_lora", "embed", "norm", "head", "all")  # trainable groups (minorpo/lora.py)
NULLABLE = {"training.orpo_lambda": float, "training.resume_from": str, "data.eval_path": str}  # None or this
DEFAULTS = {
    "run_name": "orpo", "output_dir": "outputs", "model_name": "tiny", "seed": 0, "device": "auto",
    "precision": "auto",
    "data": {"path": "tiny", "format": "raw", "task": "prompted_preference", "template": "chatml",
             "max_length": 512, "max_prompt_length": 256, "eval_fraction": 0.05, "eval_path": None,
             "group_by_length": True, "layout": "packed"},
    "training": {"type": "orpo", "orpo_lambda": None, "learning_rate": 5e-5, "min_lr_ratio": 0.1,
                 "warmup_steps": 10, "max_steps": 100, "batch_size": 8, "grad_accum_steps": 1,
                 "weight_decay": 0.0, "max_grad_norm": 1.0,
                 "phases": [{"step": 0, "trainable": ["lora", "attn_lora"]}],
                 "log_every": 10, "eval_every": 50, "save_every": 0, "keep_checkpoints": 3, "resume_from": None,
                 "max_bad_steps": 10, "compile": "auto", "gradient_checkpointing": False,
                 "fsdp": False},
    "loss": {"logp_reduction": "mean", "head_chunk_size": 4096},
    "lora": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": ["gate_proj", "up_proj", "down_proj"],
             "attn_targets": ["q_proj", "v_proj"], "start_layer": 0, "num_layers": 0},
    "sample": {"prompts": [], "max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0},
}
CHOICES = {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16"),
           "data.format": ("raw", "processed"), "data.task": ("sft", "preference", "prompted_preference"),
           "data.template": ("chatml", "raw"), "data.layout": ("packed", "padded"), "training.type": ("sft", "orpo"),
           "training.compile": ("auto", "on", "off"), "loss.logp_reduction": ("mean", "sum")}
BIG = 10**9
RANGES = {  # interval notation: [ and ] include the bound, ( and ) exclude it
    "seed": f"[0, {2**31 - 1}]", "data.max_length": "[2, 1048576]", "data.max_prompt_length": "[1, 1048576]",
    "data.eval_fraction": "[0, 1)", "training.orpo_lambda": "(0, 1000]", "training.learning_rate": "(0, 1]",
    "training.min_lr_ratio": "[0, 1]", "training.warmup_steps": f"[0, {BIG}]", "training.max_steps": f"[1, {BIG}]",
    "training.batch_size": "[1, 65536]", "training.grad_accum_steps": "[1, 65536]",
    "training.weight_decay": "[0, 10]", "training.max_grad_norm": "[0, 1000000]", "training.log_every": f"[1, {BIG}]",
    "training.eval_every": f"[0, {BIG}]", "training.save_every": f"[0, {BIG}]", "training.keep_checkpoints": "[1, 1000]",
    "training.max_bad_steps": "[1, 1000000]", "loss.head_chunk_size": "[1, 1048576]", "lora.rank": "[1, 65536]",
    "lora.alpha": "(0, 1000000]", "lora.dropout": "[0, 1)", "lora.start_layer": "[0, 4096]",
    "lora.num_layers": "[0, 4096]", "sample.max_new_tokens": "[1, 65536]", "sample.temperature": "[0, 100]",
    "sample.top_p": "(0, 1]",
}


def flat(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}: every dotted key with its value."""
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors, aliases, duplicate keys, dates, or on/off/yes/no booleans."""
    yaml_implicit_resolvers = {c: [(tag, rx) for tag, rx in rs if tag.rsplit(":", 1)[1] not in ("bool", "int", "timestamp")]
                               for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: YAML anchors and aliases (& and *) "
                              "are not allowed in a preset; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key `{key}`; "
                                  "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]{1,30}$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def parse_yaml(text, name):
    """Parse YAML text strictly; `name` (a file, or `key=value` on the command line) starts every error."""
    loader = None
    try:
        loader = _StrictLoader(text)  # already reads the text: it refuses control characters
        loader.name = name
        return loader.get_single_data()
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:  # also a key no mapping can hold
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{name}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                          f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    finally:
        if loader:
            loader.dispose()


SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: not a character, cannot be written as UTF-8


def shown(value):
    """A value as an error message shows it: its repr, cut short so that a hostile value stays one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def check(key, value, where):
    """Return `value` if it suits `key` (type, choice, range); else raise one line naming key, rule, value."""
    want = NULLABLE.get(key) or type(flat(DEFAULTS)[key])
    if value is None and key in NULLABLE:
        return None
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}[want]
        raise ConfigError(f"{where}: `{key}` must be {kind}{' or null' if key in NULLABLE else ''}, got {shown(value)}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: `{key}` must be one of {' | '.join(CHOICES[key])}, got {shown(value)}")
    if key in RANGES:
        low, high = (float(x) for x in RANGES[key][1:-1].split(","))
        interval = RANGES[key]
        inside = (low < value if interval[0] == "(" else low <= value) and \
                 (value < high if interval[-1] == ")" else value <= high)
        if not (inside and math.isfinite(value)):
            raise ConfigError(f"{where}: `{key}` must be in {interval}, got {value}")
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and SURROGATE.search(text) for text in texts):
        raise ConfigError(f"{where}: `{key}` holds a lone surrogate (\\ud800-\\udfff), which is not text; "
                          "write the character itself or fix the file's encoding")
    if isinstance(value, list) and key != "training.phases" and not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}: `{key}` must be a list of strings like [q_proj, v_proj], got {shown(value)}")
    return value


def set_key(cfg, key, value, where):
    """Set one dotted key of the nested cfg, with a "did you mean" for an unknown one."""
    keys = flat(DEFAULTS)
    if isinstance(DEFAULTS.get(key), dict):
        raise ConfigError(f"{where}: `{key}` is a section: give its keys, like {key}.{next(iter(DEFAULTS[key]))}")
    if key not in keys:
        close = difflib.get_close_matches(key[:100], keys, n=1, cutoff=0.6)
        raise ConfigError(f"{where}: unknown config key `{key if len(key) <= 80 else key[:60] + '...'}`;" +
                          (f" did you mean `{close[0]}`?" if close else " `python train.py --help` lists them"))
    *sections, leaf = key.split(".")
    node = cfg
    for section in sections:
        node = node[section]
    node[leaf] = check(key, value, where)


def validate(cfg, where):
    """The checks that involve more than one key."""
    train, data = cfg["training"], cfg["data"]
    if train["type"] == "orpo" and train["orpo_lambda"] is None:
        raise ConfigError(f"{where}: `training.orpo_lambda` is required for training.type: orpo (the paper used "
                          "0.1 to 0.25; 1.0 for ORPO alone); set e.g. training.orpo_lambda=0.1")
    if (train["type"] == "sft") != (data["task"] == "sft"):
        raise ConfigError(f"{where}: training.type: {train['type']} cannot train on data.task: {data['task']}; "
                          "sft trains on data.task=sft, orpo on preference or prompted_preference")
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
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: preset file not found (presets/ has the shipped ones)")
    if os.path.getsize(path) > 1 << 20:
        raise ConfigError(f"{path}: a preset is at most 1 MB; this one is {os.path.getsize(path):,} bytes")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text; save the preset as UTF-8") from None
    tree = parse_yaml(text, path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a preset is a mapping of keys to values, like presets/orpo.yml")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in flat(tree).items():
        set_key(cfg, key, value, path)
    for assignment in overrides:
        key, text = assignment.split("=", 1)
        where = f"`{assignment}`" if len(assignment) <= 80 else f"`{assignment[:60]}...`"  # one short line
        set_key(cfg, key.strip(), parse_yaml(text, where), where)
    return validate(cfg, path + (" + overrides" if overrides else ""))


def dump(cfg):
    """The resolved config as YAML text, keys in DEFAULTS' order."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def save(cfg, run_dir):
    """Write the resolved config to run_dir/config.yml (atomically)."""
    atomic_write(os.path.join(run_dir, "config.yml"), dump(cfg))


def help_text():
    """What `python train.py --help` prints: the shipped presets, then every key as presets/orpo.yml sets it,
    with the comment that explains it."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
    lines = ["usage: python train.py PRESET.yml [key=value ...]", "", "presets:"]
    lines += [f"  presets/{name}" for name in sorted(os.listdir(folder)) if name.endswith(".yml")]
    lines += ["", "keys, with their values in presets/orpo.yml (override any with key=value):"]
    keys, section = flat(DEFAULTS), ""
    with open(os.path.join(folder, "orpo.yml")) as f:
        for line in f:
            match = re.match(r"^( *)(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
            if not match:
                continue
            indent, key, value, comment = match.groups()
            if not indent:
                section = "" if value else key + "."
            if section + key in keys:
                lines.append(f"  {section + key}={value or '...'}".ljust(40) + f" {comment or ''}")
    return "\n".join(lines)
