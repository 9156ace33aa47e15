"""Read and write Hugging Face checkpoint folders: config.json, safetensors weights, tokenizer files.

    folder = resolve("Qwen/Qwen3-0.6B")       # a folder, or a Hub id found in the local Hugging Face cache
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    save_model(model, "outputs/run/final", tokenizer_from=folder)

References: the safetensors format (github.com/huggingface/safetensors); a sharded checkpoint's
model.safetensors.index.json maps tensor names to shard files ({"weight_map": {name: file}}); the Hugging
Face cache keeps a Hub repo in hub/models--{org}--{name}/, with the commit of `main` in refs/main and the
files in snapshots/{commit}/.

Decisions:
- Never torch.load or pickle: a checkpoint is data, and reading safetensors cannot run code.
- Loading is strict: every tensor that config.json implies must be present with its exact shape, and no
  other; a mismatch is a one-line CheckpointError naming the file, the tensor and both shapes. A silently
  missing tensor would leave random weights in a model that looks loaded.
- The model is built on the meta device, then the checkpoint's tensors are cast to the chosen dtype and
  device one at a time and assigned: no random initialisation, no fp32 copy of a bf16 checkpoint.
- A tied model (tie_word_embeddings) stores no lm_head.weight: the head is the embedding matrix. A copy
  stored in a tied checkpoint is ignored, as transformers does.
- config.json's model_type picks the model class (MODELS). Qwen3.5 ships as a vision-language checkpoint
  (qwen3_5): the text model's config is its text_config, its weights model.language_model.*, beside
  model.visual.* and mtp.* (vision encoder, multi-token prediction), which minorpo skips. It is saved
  text-only (qwen3_5_text, keys model.*), as transformers' Qwen3_5ForCausalLM saves it.
- config.json is read in both spellings found in the wild, transformers 4 (`rope_theta`, `torch_dtype`)
  and transformers 5 (`rope_parameters.rope_theta`, `dtype`), and written with both, so either reads it.
- Writes are atomic (files.atomic_folder): a checkpoint is written into a temporary sibling folder that
  is renamed into place when complete, so a crash never leaves a half-written checkpoint.
- No huggingface_hub dependency: a Hub id is looked up in the local cache only, and the error says how
  to download it.
- safetensors files are written by files.save_safetensors, because safetensors.torch.save_file imports
  numpy, which minorpo does not depend on. Reading uses the safetensors library (no numpy needed).
"""
import dataclasses
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open

from minorpo.files import atomic_folder, save_safetensors
from minorpo.model import ModelConfig, Qwen
from minorpo.qwen35 import Qwen35, Qwen35Config

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# copied next to the weights by save_model, when the source folder has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
# model_type -> (config class, model class, the transformers class named in a saved config.json)
MODELS = {"qwen2": (ModelConfig, Qwen, "Qwen2ForCausalLM"), "qwen3": (ModelConfig, Qwen, "Qwen3ForCausalLM"),
          "qwen3_5_text": (Qwen35Config, Qwen35, "Qwen3_5ForCausalLM")}
VISION_LANGUAGE = {"qwen3_5": "qwen3_5_text"}  # a vision-language model_type -> its text model's
TEXT_PREFIX, UNUSED_PREFIXES = "model.language_model.", ("model.visual.", "mtp.")  # in a qwen3_5 checkpoint
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read or written; the message names the file and the fix."""


def hub_cache():
    """The Hugging Face hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def resolve(model_name):
    """The checkpoint folder for model_name: a folder as is, or a Hub id's snapshot in the local cache."""
    if os.path.isdir(model_name):
        return model_name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model_name):
        raise CheckpointError(f"{model_name}: no such checkpoint folder")
    repo = os.path.join(hub_cache(), "models--" + model_name.replace("/", "--"))
    snapshots = os.path.join(repo, "snapshots")
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):  # the commit that `main` pointed to when it was downloaded
        with open(ref) as f:
            revision = os.path.join(snapshots, f.read().strip())
        if os.path.isdir(revision):
            return revision
    elif os.path.isdir(snapshots):  # downloaded by commit only: take the newest snapshot
        revisions = [e.path for e in os.scandir(snapshots) if e.is_dir()]
        if revisions:
            return max(revisions, key=os.path.getmtime)
    raise CheckpointError(f"{model_name}: not a folder, and not in the Hugging Face cache ({repo}); download "
                          f"it with `huggingface-cli download {model_name}` (or `hf download {model_name}`), "
                          "or set HF_HOME / HF_HUB_CACHE to the cache that holds it")


def load_model_config(folder):
    """The ModelConfig in folder/config.json, in the transformers 4 or 5 spelling."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; a checkpoint folder holds config.json and "
                              "model.safetensors (or a sharded model.safetensors.index.json)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if raw.get("model_type") in VISION_LANGUAGE:  # the language model's config, with the top-level tie
        raw = {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **raw.get("text_config", {}),
               "model_type": VISION_LANGUAGE[raw["model_type"]]}
    if raw.get("model_type") not in MODELS:
        raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} is not supported; minorpo runs "
                              "qwen2 (Qwen2, Qwen2.5), qwen3 (dense Qwen3) and qwen3_5 (dense Qwen3.5) models")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5, transformers 4
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: RoPE scaling {rope!r} is not supported; remove it from config.json "
                              "to run at the trained context length")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{path}: sliding-window attention is not supported; set use_sliding_window: false")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported; Qwen uses silu")
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    config_class = MODELS[raw["model_type"]][0]
    names = {f.name for f in dataclasses.fields(config_class)}
    fields = {name: raw[name] for name in names if name in raw}
    fields["num_key_value_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
    for name in ("rope_theta", "partial_rotary_factor"):  # in rope_parameters since transformers 5
        if name in names and rope.get(name, raw.get(name)) is not None:
            fields[name] = float(rope.get(name, raw.get(name)))
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    if raw["model_type"] == "qwen2":
        fields.pop("attention_bias", None)  # not a Qwen2 key: Qwen2 always has a q/k/v bias
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _open(path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download or save it again") from None


def weight_files(folder):
    """The safetensors files of the checkpoint in folder: one, or the shards its index lists."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e!r}); it maps tensor names to shard files "
                                  'under "weight_map"') from None
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(f"{index}: shard {shard} is missing; download the checkpoint again")
        return [os.path.join(folder, shard) for shard in shards]
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return [os.path.join(folder, WEIGHTS)]
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if os.path.exists(os.path.join(folder, n))]
    hint = (f"; {pickled[0]} is not read (minorpo never unpickles): convert it with transformers' "
            "save_pretrained(safe_serialization=True)") if pickled else ""
    raise CheckpointError(f"{folder}: no weights, expected {WEIGHTS} or {INDEX}{hint}")


def expected_shapes(cfg):
    """{checkpoint tensor name: shape} of a model with config cfg; a tied model stores no lm_head.weight."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in MODELS[cfg.model_type][1](cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


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
    files = weight_files(folder)
    found, file_of = {}, {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                key = model_key(name, cfg)
                if key is not None:
                    found[key], file_of[key] = f.get_slice(name).get_shape(), path
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # tied: the head is the embedding, a stored copy is ignored
    where = files[0] if len(files) == 1 else os.path.join(folder, INDEX)
    check_tensors(expected_shapes(cfg), found, where)

    with torch.device("meta"):
        model = MODELS[cfg.model_type][1](cfg)  # shapes only: no memory, no random initialisation
    state = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                key = model_key(name, cfg)
                if key in found and file_of[key] == path:
                    # copy: get_tensor returns a view of the memory-mapped file, which dies if the file is
                    # rewritten in place; the model owns its weights
                    state[key] = f.get_tensor(name).to(device=device, dtype=dtype, copy=True)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assign=True made two Parameters of one tensor: make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype)  # moves the RoPE tables, built in fp32 on the CPU


def save_config_json(cfg, folder, dtype=torch.bfloat16):
    """Write folder/config.json for cfg, readable by minorpo and by transformers 4 and 5."""
    raw = {"architectures": [MODELS[cfg.model_type][2]], **dataclasses.asdict(cfg), "hidden_act": "silu",
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype],
           "use_sliding_window": False, "attention_dropout": 0.0, "use_cache": True}
    if cfg.model_type == "qwen2":
        del raw["attention_bias"]  # not a Qwen2 key
    if cfg.model_type == "qwen3_5_text":  # no sliding window; RoPE turns part of each head
        del raw["use_sliding_window"]
        raw["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    raw = {key: value for key, value in raw.items() if value is not None}
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


def save_model(model, folder, tokenizer_from=None, dtype=None):
    """Write model as a Hugging Face checkpoint folder (config.json, model.safetensors), atomically, in
    dtype (default: the model's); copy the tokenizer files of the folder or Hub id tokenizer_from."""
    with atomic_folder(folder) as tmp:
        write_model(model, tmp, tokenizer_from, dtype)
    return folder


def write_model(model, folder, tokenizer_from=None, dtype=None):
    """save_model's work, into an existing (temporary) folder; for callers that add files of their own."""
    cfg = model.config
    dtype = dtype or model.model.embed_tokens.weight.dtype
    state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]  # the embedding; safetensors refuses two names for one tensor anyway
    check_tensors(expected_shapes(cfg), {name: t.shape for name, t in state.items()}, f"save_model({folder})",
                  hint="merge LoRA adapters into the base weights before saving a checkpoint")
    source = resolve(tokenizer_from) if tokenizer_from else None
    save_safetensors(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})  # transformers wants it
    save_config_json(cfg, folder, dtype)
    for name in TOKENIZER_FILES:
        if source and os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), folder)
