"""Configuration: a YAML preset, then `key=value` overrides, validated against one schema.

    python train.py presets/orpo.yml training.orpo_lambda=0.2 data.path=pairs.jsonl
    python train.py presets/orpo.yml --set model_name=outputs/sft/final      # the seed tool's spelling

Decisions:
- Every key has a type and a default in SCHEMA below; the presets list every key with a comment.
  An unknown key (in the file or on the command line) is an error with a "did you mean" suggestion,
  because a silently ignored typo costs a whole training run.
- Override values are parsed as YAML, so `true`, `null`, `3` and `[q_proj, v_proj]` mean on the
  command line what they mean in a file. PyYAML follows YAML 1.1, where `1e-4` (no dot) is a *string*;
  float keys therefore accept any string that Python's float() reads.
- The resolved config is a plain nested dict: train.py reads values out of it and passes them to
  the library functions as arguments, so no library module depends on the config's shape.
"""
import copy
import difflib
import os

import yaml

from minorpo.files import atomic_write


class ConfigError(ValueError):
    """A problem with a preset or an override; the message names the key and the fix."""


# Allowed trainable groups (minorpo/lora.py implements them).
GROUPS = ("lora", "attn_lora", "embed", "norm", "head", "all")

# A spec is a Python type, a tuple of allowed strings, or one of the markers below.
OPT_STR = "string or null"
STR_LIST = "list of strings"
PHASES = "list of {step, trainable}"

SCHEMA = {
    "run_name": (str, "orpo"),
    "output_dir": (str, "outputs"),
    "model_name": (str, "tiny"),
    "seed": (int, 0),
    "device": (("auto", "cpu", "cuda"), "auto"),
    "data": {
        "path": (str, "tiny"),
        "format": (("raw", "processed"), "raw"),
        "task": (("sft", "preference", "prompted_preference"), "prompted_preference"),
        "template": (("chatml", "raw"), "chatml"),
        "max_length": (int, 512),
        "max_prompt_length": (int, 256),
        "eval_fraction": (float, 0.05),
        "eval_path": (OPT_STR, None),
        "group_by_length": (bool, True),
    },
    "training": {
        "type": (("sft", "orpo"), "orpo"),
        "orpo_lambda": (float, None),
        "learning_rate": (float, 5e-5),
        "min_lr_ratio": (float, 0.1),
        "warmup_steps": (int, 10),
        "max_steps": (int, 100),
        "batch_size": (int, 8),
        "grad_accum_steps": (int, 1),
        "weight_decay": (float, 0.0),
        "max_grad_norm": (float, 1.0),
        "phases": (PHASES, [{"step": 0, "trainable": ["lora", "attn_lora"]}]),
        "log_every": (int, 10),
        "eval_every": (int, 50),
        "save_every": (int, 0),
        "resume_from": (OPT_STR, None),
        "max_bad_steps": (int, 10),
        "compile": (("auto", "on", "off"), "auto"),
        "gradient_checkpointing": (bool, False),
    },
    "loss": {
        "logp_reduction": (("mean", "sum"), "mean"),
        "head_chunk_size": (int, 4096),
    },
    "lora": {
        "rank": (int, 16),
        "alpha": (float, 32.0),
        "dropout": (float, 0.0),
        "targets": (STR_LIST, ["gate_proj", "up_proj", "down_proj"]),
        "attn_targets": (STR_LIST, ["q_proj", "v_proj"]),
        "start_layer": (int, 0),
        "num_layers": (int, 0),
    },
    "sample": {
        "prompts": (STR_LIST, []),
        "max_new_tokens": (int, 48),
        "temperature": (float, 0.0),
        "top_p": (float, 1.0),
    },
}


def defaults(schema=SCHEMA):
    """The default config: SCHEMA's values as a nested dict."""
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v[1]) for k, v in schema.items()}


def all_keys(schema=SCHEMA, prefix=""):
    """Every dotted key, e.g. ['run_name', ..., 'training.orpo_lambda', ...]."""
    keys = []
    for k, v in schema.items():
        keys += all_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return keys


def _unknown(key, where):
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" did you mean `{close[0]}`?" if close else f" valid keys: {', '.join(all_keys())}"
    return ConfigError(f"{where}: unknown config key `{key}`;{hint}")


TYPE_CHECKS = {  # spec: (test, what the error message expects)
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    OPT_STR: (lambda v: v is None or isinstance(v, str), "a string or null"),
    STR_LIST: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
               "a list of strings, e.g. [q_proj, v_proj]"),
}


def _coerce(key, value, spec, where):
    """Return value converted to spec, or raise a ConfigError naming key, expected type and value."""
    def bad(expected):
        return ConfigError(f"{where}: `{key}` must be {expected}, got {value!r}")
    if spec is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if value is None and key == "training.orpo_lambda":
            return None  # checked against training.type in validate()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if spec == PHASES:
        return _phases(key, value, where)
    if isinstance(spec, tuple):
        if value not in spec:
            raise bad("one of " + " | ".join(spec))
        return value
    test, expected = TYPE_CHECKS[spec]
    if not test(value):
        raise bad(expected)
    return value


def _phases(key, value, where):
    example = "[{step: 0, trainable: [lora, attn_lora]}]"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: `{key}` must be a non-empty list like {example}, got {value!r}")
    for phase in value:
        if not isinstance(phase, dict) or set(phase) != {"step", "trainable"}:
            raise ConfigError(f"{where}: each entry of `{key}` must have exactly `step` and `trainable`, "
                              f"like {example}; got {phase!r}")
        if isinstance(phase["step"], bool) or not isinstance(phase["step"], int) or phase["step"] < 0:
            raise ConfigError(f"{where}: `{key}` step must be a non-negative integer, got {phase['step']!r}")
        groups = phase["trainable"]
        if not isinstance(groups, list) or not groups or any(g not in GROUPS for g in groups):
            raise ConfigError(f"{where}: `{key}` trainable must be a non-empty list of groups from "
                              f"{', '.join(GROUPS)}; got {groups!r}")
    steps = [p["step"] for p in value]
    if steps[0] != 0 or steps != sorted(set(steps)):
        raise ConfigError(f"{where}: `{key}` steps must start at 0 and increase, got {steps}")
    return value


def _merge(cfg, tree, schema, where, prefix=""):
    """Merge a nested dict from a YAML file into cfg, checking every key and value."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: `{prefix[:-1] or 'the file'}` must be a mapping of keys to values")
    for k, v in tree.items():
        key = prefix + str(k)
        if k not in schema:
            raise _unknown(key, where)
        if isinstance(schema[k], dict):
            _merge(cfg[k], v, schema[k], where, key + ".")
        else:
            cfg[k] = _coerce(key, v, schema[k][0], where)


def set_value(cfg, assignment, where="command line"):
    """Apply one `dotted.key=value` override; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"{where}: expected key=value, got `{assignment}`")
    key, text = assignment.split("=", 1)
    key = key.strip()
    *sections, leaf = key.split(".")
    node, schema = cfg, SCHEMA
    for s in sections:
        if not isinstance(schema.get(s), dict):
            raise _unknown(key, where)
        node, schema = node[s], schema[s]
    if leaf not in schema or isinstance(schema[leaf], dict):
        raise _unknown(key, where)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not valid YAML: keep the raw string and let the type check judge it
    node[leaf] = _coerce(key, value, schema[leaf][0], where)


# The range of each number: (key, comparison, bound).
RANGES = [(k, ">=", 1) for k in ("data.max_length", "data.max_prompt_length", "training.max_steps",
                                  "training.batch_size", "training.grad_accum_steps", "training.log_every",
                                  "training.max_bad_steps", "loss.head_chunk_size", "lora.rank",
                                  "sample.max_new_tokens")]
RANGES += [(k, ">=", 0) for k in ("training.warmup_steps", "training.eval_every", "training.save_every",
                                  "training.weight_decay", "training.max_grad_norm", "training.min_lr_ratio",
                                  "lora.start_layer", "lora.num_layers", "lora.dropout", "data.eval_fraction",
                                  "sample.temperature", "sample.top_p")]
RANGES += [(k, ">", 0) for k in ("training.learning_rate", "lora.alpha")]
RANGES += [(k, "<", 1) for k in ("lora.dropout", "data.eval_fraction")]
RANGES += [(k, "<=", 1) for k in ("training.min_lr_ratio", "sample.top_p")]
BOUND_TESTS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}


def validate(cfg, where="config"):
    """The range of every number, and the checks that involve more than one key."""
    t, d = cfg["training"], cfg["data"]
    if t["type"] == "orpo":
        lam = t["orpo_lambda"]
        if lam is None:
            raise ConfigError(f"{where}: `training.orpo_lambda` is required for training.type: orpo "
                              "(the paper used 0.1 to 0.25); set e.g. training.orpo_lambda=0.1")
        if not lam > 0:
            raise ConfigError(f"{where}: `training.orpo_lambda` must be positive, got {lam}")
        if d["task"] == "sft":
            raise ConfigError(f"{where}: training.type: orpo needs preference data; "
                              "set data.task=prompted_preference or data.task=preference")
    if t["type"] == "sft" and d["task"] != "sft":
        raise ConfigError(f"{where}: training.type: sft needs data.task=sft (got {d['task']})")
    for key, op, bound in RANGES:
        section, leaf = key.split(".")
        value = cfg[section][leaf]
        if value is not None and not BOUND_TESTS[op](value, bound):
            raise ConfigError(f"{where}: `{key}` must be {op} {bound}, got {value}")
    if d["max_prompt_length"] >= d["max_length"]:
        raise ConfigError(f"{where}: `data.max_prompt_length` ({d['max_prompt_length']}) must be smaller "
                          f"than `data.max_length` ({d['max_length']}) to leave room for the response")
    return cfg


def parse_args(argv):
    """Split ['preset.yml', 'a.b=1', '--set', 'c=2', '--set=d=3'] into the preset path and overrides;
    the seed tool's `--preset PATH` spelling is accepted too."""
    preset, overrides, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--set", "--preset"):
            if not args:
                raise ConfigError(f"command line: `{arg}` needs a value after it (key=value or a preset path)")
            if arg == "--set":
                overrides.append(args.pop(0))
            else:
                preset = args.pop(0)
        elif arg.startswith("--set="):
            overrides.append(arg[len("--set="):])
        elif "=" in arg:
            overrides.append(arg)
        elif preset is None and not arg.startswith("-"):
            preset = arg
        else:
            raise ConfigError(f"command line: unexpected argument `{arg}`; "
                              "usage: python train.py PRESET.yml [key=value ...]")
    if preset is None:
        raise ConfigError("command line: no preset given; usage: python train.py presets/orpo.yml [key=value ...]")
    return preset, overrides


def load(path, overrides=()):
    """Read a preset, apply key=value overrides, validate. Returns the resolved nested dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: preset file not found")
    with open(path) as f:
        try:
            tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    cfg = defaults()
    _merge(cfg, tree, SCHEMA, path)
    for o in overrides:
        set_value(cfg, o)
    return validate(cfg, path + (" + overrides" if overrides else ""))


def dump(cfg):
    """The resolved config as YAML text, keys in schema order."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def save(cfg, run_dir):
    """Write the resolved config to run_dir/config.yml (atomically) and return the path."""
    path = os.path.join(run_dir, "config.yml")
    atomic_write(path, dump(cfg))
    return path

