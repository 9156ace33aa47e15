"""Resumable training state: the trained weights, AdamW's moments and the data position.

A checkpoint is a folder `<run>/step_000100/` holding
    weights.safetensors    every parameter the run trains (the LoRA adapter, or all weights)
    optimizer.safetensors  AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    state.json             step, data position (epoch, batch index), what the position depends on
                           (seed, batch size, accumulation, ranks, train-set size), names, AdamW groups
Decisions:
- No pickle anywhere (no torch.save / torch.load): tensors go to safetensors, the rest to JSON, so a
  checkpoint cannot run code when loaded.
- Frozen base weights are not saved: they are re-read from the base checkpoint, which also keeps
  LoRA checkpoints small.
- No RNG state is saved: train.py seeds every step from (seed, step, rank), so dropout masks do not
  depend on history and a resumed run continues bit for bit, on any number of ranks.
- Writes are atomic: everything goes into a temporary folder that is renamed into place at the end,
  so a crash never leaves a half-written checkpoint that a later resume would trust.
"""
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minorpo.files import atomic_folder, save_safetensors

FILES = ("state.json", "weights.safetensors", "optimizer.safetensors")


def save(folder, model, optimizer, names, meta):
    """Save the parameters `names` (model parameter names: what the run trains), the
    optimizer state, and the JSON-able `meta` (step, data position, ...)."""
    params = dict(model.named_parameters())
    with atomic_folder(folder) as tmp:
        save_safetensors({n: params[n] for n in names}, os.path.join(tmp, "weights.safetensors"))
        opt = optimizer.state_dict()
        save_safetensors({f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)},
                         os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**meta, "param_names": names, "param_groups": opt["param_groups"]}, f, indent=1)


def _load(path):
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable ({e}); the checkpoint is damaged, resume from another") from None


def load(folder, model, optimizer, names, expect):
    """Restore what save() wrote into model and optimizer and return its meta dict. `expect` holds the
    settings the data position depends on; a checkpoint saved with others is refused, since resuming
    it would silently replay other batches. Errors are one line naming the file and the fix."""
    for name in FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: not a resumable checkpoint ({name} missing); "
                                    "training.resume_from takes an outputs/<run>/step_NNNNNN folder")
    with open(os.path.join(folder, "state.json")) as f:
        meta = json.load(f)
    changed = [f"{k} was {meta.get(k)}, now {v}" for k, v in expect.items() if meta.get(k) != v]
    if changed:
        raise ValueError(f"{folder}: saved with other settings ({'; '.join(changed)}); resume with the "
                         "config it was saved with (its run folder holds config.yml)")
    if meta["param_names"] != names:
        raise ValueError(f"{folder}: the checkpoint trains other parameters than this config "
                         "(different LoRA targets, rank or phases?); resume with the config it was saved with")
    path = os.path.join(folder, "weights.safetensors")
    params, weights = dict(model.named_parameters()), _load(path)
    with torch.no_grad():
        for n in names:
            if n not in weights or weights[n].shape != params[n].shape:
                got = tuple(weights[n].shape) if n in weights else "missing"
                raise ValueError(f"{path}: tensor {n} is {got}, the model needs {tuple(params[n].shape)}")
            params[n].copy_(weights[n])
    state = {}
    for key, value in _load(os.path.join(folder, "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
