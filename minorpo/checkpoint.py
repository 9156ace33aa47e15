"""Read and write Hugging Face checkpoint folders: config.json, safetensors weights, tokenizer files.

    folder = resolve("Qwen/Qwen3-0.6B")       # a folder, or a Hub id found in the local Hugging Face cache
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    with atomic_folder("outputs/run/final") as tmp:
        write_model(model, tmp, tokenizer_from=folder)

Decisions:
- A model folder can come from anyone: it is never unpickled (safetensors cannot run code), and all of it
  is checked before memory is allocated: files lie inside the folder (models--org--name for a Hub snapshot),
  config.json fields have their type and range, the safetensors headers agree with config.json.
- Loading is strict: exactly the tensors config.json implies, with their shapes; a silently missing one
  would leave random weights. The model is built on "meta" and each tensor assigned in the target dtype
  and device: no random initialisation, no fp32 copy of a bf16 checkpoint.
- Qwen3.5 ships as a vision-language checkpoint (qwen3_5): minorpo reads its text_config and language_model
  weights, skips the vision encoder and multi-token prediction, and saves it text-only, as transformers does.
- config.json is read in the transformers 4 (`rope_theta`, `torch_dtype`) and 5 (`rope_parameters.
  rope_theta`, `dtype`) spellings, and written with both. No huggingface_hub: a Hub id is looked up in
  the local cache only (hub/models--{org}--{name}/snapshots/{commit}/, links into ../../blobs/).
"""
import dataclasses
import json
import math
import os
import re
import shutil
import typing

import torch

from minorpo.files import UserError, file_inside, read_json, read_tensors, safetensors_header, save_safetensors
from minorpo.model import ModelConfig, Qwen
from minorpo.qwen35 import Qwen35, Qwen35Config

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
# model_type -> (config class, model class, the transformers class named in a saved config.json)
MODELS = {"qwen2": (ModelConfig, Qwen, "Qwen2ForCausalLM"), "qwen3": (ModelConfig, Qwen, "Qwen3ForCausalLM"),
          "qwen3_5_text": (Qwen35Config, Qwen35, "Qwen3_5ForCausalLM")}
VISION_LANGUAGE = {"qwen3_5": "qwen3_5_text"}  # a vision-language model_type -> its text model's
TEXT_PREFIX, UNUSED_PREFIXES = "model.language_model.", ("model.visual.", "mtp.")  # in a qwen3_5 checkpoint
# the most an integer config.json field may be (else 2^20): far above real models, quick to build on "meta"
LIMITS = {"num_hidden_layers": 1024, "hidden_size": 65536, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 22}
JSON_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}
FIX = "download the checkpoint again"


class CheckpointError(UserError):
    """A checkpoint folder that cannot be read or written; the message names the file and the fix."""


def model_file(folder, name, what="file"):
    """The real path of folder/name (files.file_inside), confined to folder, or, for a Hub cache snapshot
    (models--org--name/snapshots/commit), to models--org--name: its files are links into ../../blobs."""
    folder = os.path.abspath(folder)
    repo = os.path.dirname(os.path.dirname(folder))
    if os.path.basename(os.path.dirname(folder)) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return file_inside(repo, os.path.relpath(os.path.join(folder, name), repo), what)
    return file_inside(folder, name, what)


def tokenizer_files(folder):
    """[(name, real path)] of the TOKENIZER_FILES present in folder, each a regular file inside it."""
    return [(name, model_file(folder, name, "tokenizer file")) for name in TOKENIZER_FILES
            if os.path.lexists(os.path.join(folder, name))]


def resolve(model_name):
    """The checkpoint folder for model_name: a folder as is, or a Hub id's snapshot in the local cache: the
    commit refs/main names, else the newest. It must hold config.json, and its tokenizer files lie inside it."""
    folder = model_name if os.path.isdir(model_name) else None
    if os.path.isfile(model_name) or folder is None and not re.fullmatch(r"[\w.-]+/[\w.-]+", model_name):
        raise CheckpointError(f"{model_name}: {'a file' if os.path.isfile(model_name) else 'no such folder'}; "
                              "model_name takes a checkpoint folder (config.json, model.safetensors, "
                              "tokenizer.json), a Hub id in the local cache, or `tiny`")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser(os.path.join("~", ".cache", "huggingface")), "hub")
    repo = os.path.join(cache, "models--" + model_name.replace("/", "--"))
    snapshots, ref = os.path.join(repo, "snapshots"), os.path.join(repo, "refs", "main")
    if folder is None and os.path.isdir(snapshots):
        revisions = sorted((e for e in os.scandir(snapshots) if e.is_dir()), key=lambda e: e.stat().st_mtime)
        main = open(ref).read(100).strip() if os.path.isfile(ref) else None
        folder = next((e.path for e in revisions if e.name == main), revisions[-1].path if revisions else None)
    if folder is None:
        raise CheckpointError(f"{model_name}: not a folder, and not in the Hugging Face cache ({repo}); download "
                              f"it with `huggingface-cli download {model_name}` (or `hf download {model_name}`), "
                              "or set HF_HOME / HF_HUB_CACHE to the cache that holds it")
    if not os.path.lexists(os.path.join(folder, CONFIG)):
        raise CheckpointError(f"{folder}: no config.json; a checkpoint folder holds config.json, tokenizer.json "
                              "and model.safetensors (or a sharded model.safetensors.index.json)")
    tokenizer_files(folder)
    return folder


def check_fields(path, config_class, fields):
    """Each config.json field is present if required, has its dataclass type (true is not an int, an int is
    a float), each size is 1 .. its limit, each float finite and above 0: before anything is built."""
    for field in dataclasses.fields(config_class):
        value, allowed = fields.get(field.name), typing.get_args(field.type) or (field.type,)
        limit, share = LIMITS.get(field.name, 1 << 20), field.name == "partial_rotary_factor"  # a share: <= 1
        if field.name not in fields and field.default is not dataclasses.MISSING or value is None and type(None) \
                in allowed:
            continue
        if not isinstance(value, allowed + ((int,) if float in allowed else ())) or isinstance(value, bool) \
                and bool not in allowed:
            expected = " or ".join(JSON_TYPES.get(kind, "null") for kind in allowed)
        elif int in allowed and not field.name.endswith("_id") and not 1 <= value <= limit:
            expected = f"1 .. {limit}"
        elif float in allowed and not (math.isfinite(value) and 0 < value and (value <= 1 or not share)):
            expected = "a finite number above 0" + (" and at most 1" if share else "")
        else:
            continue
        found = json.dumps(value)[:50] if field.name in fields else "missing"
        raise CheckpointError(f"{path}: {field.name} is {found}, expected {expected}; {FIX}")


def load_model_config(folder):
    """The ModelConfig (or Qwen35Config) in folder/config.json, in the transformers 4 or 5 spelling."""
    path = model_file(folder, CONFIG, "config.json")
    raw = read_json(path, FIX)
    if raw.get("model_type") in VISION_LANGUAGE:  # the language model's config, with the top-level tie
        text = raw.get("text_config")
        raw = {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **(text if isinstance(text, dict)
               else {}), "model_type": VISION_LANGUAGE[raw["model_type"]]}
    if raw.get("model_type") not in MODELS:
        raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} is not supported; minorpo runs "
                              "qwen2 (Qwen2, Qwen2.5), qwen3 (dense Qwen3) and qwen3_5 (dense Qwen3.5) models")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5, transformers 4
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: RoPE scaling {rope!r:.100} is not supported; remove it from config.json "
                              "to run at the trained context length")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{path}: sliding-window attention is not supported; set use_sliding_window: false")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r:.50} is not supported; Qwen uses silu")
    config_class = MODELS[raw["model_type"]][0]
    moved = ("rope_theta", "partial_rotary_factor")  # in rope_parameters since transformers 5
    raw.update({name: value for name, value in rope.items() if name in moved and value is not None})
    fields = {f.name: raw[f.name] for f in dataclasses.fields(config_class) if f.name in raw}
    fields["num_key_value_heads"] = raw.get("num_key_value_heads") or raw.get("num_attention_heads")
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    if raw["model_type"] == "qwen2":
        fields.pop("attention_bias", None)  # not a Qwen2 key: Qwen2 always has a q/k/v bias
    check_fields(path, config_class, fields)
    fields.update({name: float(fields[name]) for name in moved if name in fields})
    try:
        cfg = config_class(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}; {FIX}") from None
    if cfg.max_position_embeddings * cfg.head_dim > 1 << 28:  # the RoPE tables take positions·head_dim·6 bytes
        raise CheckpointError(f"{path}: max_position_embeddings · head_dim is over 2^28; "
                              "lower max_position_embeddings")
    return cfg


def weight_files(folder):
    """The real paths of the safetensors files in folder: model.safetensors, or the shards its index lists."""
    if os.path.lexists(os.path.join(folder, INDEX)):
        index = model_file(folder, INDEX, "shard index")
        weight_map = read_json(index, FIX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f'{index}: not a valid index; it maps tensor names to shard files under "weight_map"')
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard:
                raise CheckpointError(f"{index}: shard {shard!r:.100} is not a plain file name; a shard lies "
                                      "next to the index, and nothing outside the model folder is read")
            if not os.path.lexists(os.path.join(folder, shard)):
                raise CheckpointError(f"{index}: shard {shard} is missing; {FIX}")
        return [model_file(folder, shard, "shard") for shard in shards]
    if os.path.lexists(os.path.join(folder, WEIGHTS)):
        return [model_file(folder, WEIGHTS, "weights file")]
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(f"{folder}/{n}")]
    hint = f"; {pickled[0]} is not read (minorpo never unpickles): convert it with transformers' " \
        "save_pretrained(safe_serialization=True)" if pickled else ""
    raise CheckpointError(f"{folder}: no weights, expected {WEIGHTS} or {INDEX}{hint}")


def fingerprint_files(folder):
    """{what: [real paths]} of what decides a run's trajectory besides its settings: the weights, config.json
    (rope_theta, rms_norm_eps, ...) and tokenizer.json (how the data is split into ids)."""
    return {"base model": weight_files(folder), "base model config.json": [model_file(folder, CONFIG)],
            "base model tokenizer.json": [model_file(folder, "tokenizer.json", "tokenizer")]}


def expected_shapes(cfg):
    """{checkpoint tensor name: shape} of a model with config cfg; a tied model stores no lm_head.weight."""
    with torch.device("meta"):  # one position: the RoPE tables, built on the CPU, hold no tensor that is saved
        model = MODELS[cfg.model_type][1](dataclasses.replace(cfg, max_position_embeddings=1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if not (cfg.tie_word_embeddings and name == "lm_head.weight")}


def check_tensors(expected, found, where, hint="the weights do not belong to this config.json"):
    """expected, found: {name: shape}. A CheckpointError for the first missing, mis-shaped or extra tensor."""
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: missing tensor {name} (shape {list(shape)}); {hint}")
        if tuple(found[name]) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(found[name])} but config.json "
                                  f"implies {list(shape)}; {hint}")
    for name in found:
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} (shape {list(found[name])}); {hint}")


def model_key(name, cfg):
    """The model's name for checkpoint tensor `name`, or None for a tensor of a part minorpo does not use."""
    if cfg.model_type != "qwen3_5_text":
        return name
    if name.startswith(UNUSED_PREFIXES):
        return None
    return "model." + name[len(TEXT_PREFIX):] if name.startswith(TEXT_PREFIX) else name


def load_model(folder_or_name, dtype=torch.float32, device="cpu"):
    """A Qwen or Qwen35 model with the weights of a checkpoint folder or a cached Hub id, in dtype on device."""
    folder = resolve(folder_or_name)
    cfg = load_model_config(folder)
    headers = {path: safetensors_header(path, FIX) for path in weight_files(folder)}
    found, file_of = {}, {}
    for path, header in headers.items():
        for name, shape in header.items():
            key = model_key(name, cfg)
            if key in file_of:
                raise CheckpointError(f"{path}: tensor {name} is also in {file_of[key]}; a checkpoint stores "
                                      f"each tensor once: {FIX}")
            if key is not None:
                found[key], file_of[key] = shape, path
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # tied: the head is the embedding, a stored copy is ignored
    layers = {match[1] for key in found if (match := re.match(r"model\.layers\.(\d{1,9})\.", key))}
    if len(layers) < cfg.num_hidden_layers:  # more layers than the config: check_tensors names the extra one
        raise CheckpointError(f"{model_file(folder, CONFIG)}: num_hidden_layers is {cfg.num_hidden_layers} but "
                              f"the weights hold {len(layers)} layers; the weights do not belong to this config.json")
    check_tensors(expected_shapes(cfg), found, next(iter(headers)) if len(headers) == 1 else f"{folder}/{INDEX}")
    with torch.device("meta"):
        model = MODELS[cfg.model_type][1](cfg)  # shapes only: no memory, no random initialisation
    state = {model_key(name, cfg): tensor for path, header in headers.items()  # each checked finite
             for name, tensor in read_tensors(path, [n for n in header if model_key(n, cfg) in found], dtype,
                                              device, FIX)}
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)  # check_tensors checked the keys
    if cfg.tie_word_embeddings:  # assign=True replaced the embedding Parameter: the head is it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)  # moves the RoPE tables, built in fp32 on the CPU


def write_model(model, folder, tokenizer_from=None, dtype=None):
    """Write model in dtype (default: the model's) as a Hugging Face checkpoint into an existing folder (an
    atomic_folder's), with copies (contents, never links) of the tokenizer files of folder tokenizer_from."""
    cfg = model.config
    dtype = dtype or model.model.embed_tokens.weight.dtype
    state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()
             if not (cfg.tie_word_embeddings and name == "lm_head.weight")}  # tied: the embedding, stored once
    check_tensors(expected_shapes(cfg), {name: t.shape for name, t in state.items()}, f"write_model({folder})",
                  hint="merge LoRA adapters into the base weights before saving a checkpoint")
    copies = tokenizer_files(tokenizer_from) if tokenizer_from else []
    save_safetensors(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})  # transformers wants it
    raw = {"architectures": [MODELS[cfg.model_type][2]], **dataclasses.asdict(cfg), "hidden_act": "silu",
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
           "use_sliding_window": False, "attention_dropout": 0.0, "use_cache": True}
    if cfg.model_type == "qwen2":
        del raw["attention_bias"]  # not a Qwen2 key
    if cfg.model_type == "qwen3_5_text":  # no sliding window; RoPE turns part of each head
        del raw["use_sliding_window"]
        raw["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump({key: value for key, value in raw.items() if value is not None}, f, indent=2, sort_keys=True)
    for name, real in copies:
        shutil.copyfile(real, os.path.join(folder, name))


def check_fits(model, tokenizer, folder, max_length, max_new_tokens):
    """Refuse rows or samples longer than the model's context, and a tokenizer bigger than its embeddings."""
    context = model.config.max_position_embeddings
    for key, value, limit in (("data.max_length", max_length, context),
                              ("sample.max_new_tokens", max_new_tokens, context - 1)):  # and a prompt token
        if value > limit:
            raise CheckpointError(f"`{key}`={value} does not fit the model's context ({context} positions in "
                                  f"{folder}/config.json); lower it to at most {limit}")
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)  # ids may have gaps
    if top >= model.config.vocab_size:
        raise CheckpointError(f"{folder}/tokenizer.json has token id {top} but the model only "
                              f"{model.config.vocab_size} embeddings; it belongs to another model")
