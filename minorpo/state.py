"""Resumable training state: trained weights, AdamW moments, RNG streams and the data position.

A checkpoint is a folder `<run>/step_000100/` holding
    weights.safetensors    every parameter the run trains (the LoRA adapter, or all weights)
    optimizer.safetensors  AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    rng.safetensors        the torch CPU (and CUDA) generator states
    state.json             step, data position (epoch, batch index), param names, optimizer groups
Decisions:
- No pickle anywhere (no torch.save / torch.load): tensors go to safetensors, the rest to JSON, so a
  checkpoint cannot run code when loaded.
- Frozen base weights are not saved: they are re-read from the base checkpoint, which also keeps
  LoRA checkpoints small. With the same seed and data order, a resumed run continues bit for bit.
- Writes are atomic: everything goes into a temporary folder that is renamed into place at the end,
  so a crash never leaves a half-written checkpoint that a later resume would trust.
"""
import json
import os

import torch
from safetensors.torch import load_file

from minorpo.checkpoint import atomic_folder, save_safetensors


def _rng_tensors():
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def save(folder, model, optimizer, names, meta):
    """Save the parameters `names` (a list of model parameter names, in the optimizer's order),
    the optimizer state and RNG states, plus the JSON-able `meta` (step, data position, ...)."""
    params = dict(model.named_parameters())
    with atomic_folder(folder) as tmp:
        save_safetensors({n: params[n] for n in names}, os.path.join(tmp, "weights.safetensors"))
        opt = optimizer.state_dict()
        save_safetensors({f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)},
                         os.path.join(tmp, "optimizer.safetensors"))
        save_safetensors(_rng_tensors(), os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**meta, "param_names": names, "param_groups": opt["param_groups"]}, f, indent=1)


def load(folder, model, optimizer, names):
    """Restore what save() wrote into model and optimizer; returns the meta dict. Errors name the file."""
    files = ["state.json", "weights.safetensors", "optimizer.safetensors", "rng.safetensors"]
    for name in files:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: not a resumable checkpoint ({name} missing); "
                                    "training.resume_from takes an outputs/<run>/step_NNNNNN folder")
    with open(os.path.join(folder, "state.json")) as f:
        meta = json.load(f)
    if meta["param_names"] != names:
        raise ValueError(f"{folder}: the checkpoint trains other parameters than this config "
                         "(different LoRA targets, rank or phases?); resume with the config it was saved with")
    params = dict(model.named_parameters())
    weights = load_file(os.path.join(folder, "weights.safetensors"))
    with torch.no_grad():
        for n in names:
            if weights[n].shape != params[n].shape:
                raise ValueError(f"{folder}: {n} has shape {tuple(weights[n].shape)}, "
                                 f"the model needs {tuple(params[n].shape)}")
            params[n].copy_(weights[n])
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    state = {}
    for key, value in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(os.path.join(folder, "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return meta
