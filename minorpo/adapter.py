"""A trained LoRA adapter on disk, in PEFT's file layout, so PEFT-based tools load it (minorpo never does).

    adapter/adapter_config.json        r, lora_alpha, target_modules, layers_to_transform, the base model
            adapter_model.safetensors  base_model.model.<layer>.lora_A.weight (r, in), ...lora_B.weight (out, r)

lora.py is the idea (the low-rank update, injection, merge); this is the file format, kept apart so that
lora.py reads as the method alone. chat.py loads such an adapter back.
"""
import json
import os
import re

from minorpo.files import save_safetensors

PEFT_PREFIX = "base_model.model."


def save_adapter(model, folder, base_model_name):
    """Write adapter_config.json + adapter_model.safetensors (PEFT's layout) into `folder`. base_model_name, the
    base checkpoint folder actually used (never `tiny`), is where PEFT will load the base model from."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}  # the LoRALinear layers
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    first = next(iter(layers.values()))
    indices = sorted({int(re.search(r"\blayers\.(\d+)\.", n).group(1)) for n in layers})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
              "layers_to_transform": None if len(indices) == len(model.get_submodule("model.layers")) else indices,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {f"{PEFT_PREFIX}{n}.lora_{x}.weight": getattr(m, f"lora_{x}").float()  # PEFT's key names
               for n, m in layers.items() for x in ("A", "B")}
    save_safetensors(tensors, os.path.join(folder, "adapter_model.safetensors"))
