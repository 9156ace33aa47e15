"""Resumable training state: the trained weights, AdamW's moments and the data position.

A checkpoint is a folder `<run>/step_000100/` holding
    weights.safetensors    every parameter the run trains (the LoRA adapter, or all weights)
    optimizer.safetensors  AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    state.json             step, data position (epoch, batch index), what the position depends on
                           (seed, batch size, accumulation, ranks, train-set size), names, AdamW groups
Decisions:
- No pickle: tensors go to safetensors, the rest to JSON, so a checkpoint cannot run code. Every key, type
  and shape is checked first: a damaged one is a one-line error naming the file, never a half-restored run.
- Writes are atomic and refuse NaN or inf, so a resume never trusts a half-written or diverged checkpoint.
- Frozen base weights are not saved: they are re-read from the base checkpoint. AdamW's hyperparameters
  are restored from the config (state.json keeps them for reference): a checkpoint holds what training changed.
- Under FSDP the files still hold whole tensors (gathered to rank 0); a resume cuts each rank's shard again.
- No RNG state is saved: train.py seeds every step from (seed, step, rank), so a resume continues bit for bit.
"""
import json
import os
import re

import torch

from minorpo.files import UserError, atomic_folder, file_inside, read_json, read_tensors, safetensors_header, \
    save_safetensors

FIX = "the checkpoint is damaged: resume from another checkpoint"


def _whole(tensor, keep):
    """The whole tensor on the CPU, if kept: an FSDP shard (DTensor) is gathered from every rank, a collective."""
    whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return whole.cpu() if keep else None


def _like(param, whole):
    """`whole`, cut to this rank's shard when param is an FSDP shard: every rank reads the file and keeps its
    part, so a checkpoint holds whole tensors whatever the number of ranks that wrote it."""
    if not hasattr(param, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def save(folder, model, optimizer, names, meta, write=True):
    """Save the parameters `names` (what the run trains), the optimizer state and the JSON-able `meta`.
    Under FSDP every rank calls it (each tensor is gathered in turn) and only the one with `write` writes."""
    params, opt = dict(model.named_parameters()), optimizer.state_dict()
    weights = {n: _whole(params[n], write) for n in names}
    moments = {f"{i}.{k}": _whole(v, write) for i, s in opt["state"].items() for k, v in s.items()}
    if not write:
        return
    with atomic_folder(folder) as tmp:
        save_safetensors(weights, os.path.join(tmp, "weights.safetensors"))
        save_safetensors(moments, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**meta, "param_names": names, "param_groups": opt["param_groups"]}, f, indent=1)


def _tensors(folder, name):
    path = file_inside(folder, name, "checkpoint file")
    return path, dict(read_tensors(path, safetensors_header(path, FIX), fix=FIX))


def load(folder, model, optimizer, names, expect):
    """Restore what save() wrote into model and optimizer and return its meta dict. `expect` holds the settings
    the data position depends on: a checkpoint saved with others is refused, as it would replay other batches."""
    if not os.path.lexists(os.path.join(folder, "state.json")):
        raise UserError(f"{folder}: not a resumable checkpoint (no state.json); training.resume_from takes an "
                        "outputs/<run>/step_NNNNNN folder")
    path = file_inside(folder, "state.json", "checkpoint file")
    meta = read_json(path, FIX)
    for key in ("step", "epoch", "position", "skipped", "param_names"):  # non-negative ints, and a list
        kind = list if key == "param_names" else int
        if type(meta.get(key)) is not kind or kind is int and meta[key] < 0:
            raise UserError(f"{path}: {key} is missing or not a{' list' if kind is list else ' count'}; {FIX}")
    if meta["skipped"] > meta["step"] or meta["epoch"] > meta["step"]:  # a step skips once, starts one epoch at most
        raise UserError(f"{path}: skipped ({meta['skipped']}) or epoch ({meta['epoch']}) is past step "
                        f"({meta['step']}); {FIX}")
    changed = [f"{k} was {meta.get(k)}, now {v}" for k, v in expect.items() if meta.get(k) != v]
    if changed:
        raise UserError(f"{folder}: saved with other settings ({'; '.join(changed)}); resume with the "
                        "config it was saved with (its run folder holds config.yml)")
    if meta["param_names"] != names:
        raise UserError(f"{folder}: the checkpoint trains other parameters than this config "
                        "(different LoRA targets, rank or phases?); resume with the config it was saved with")
    params = dict(model.named_parameters())
    path, weights = _tensors(folder, "weights.safetensors")
    for n in names:
        if n in weights and not torch.isfinite(weights[n]).all():
            raise UserError(f"{path}: tensor {n} holds NaN or inf; {FIX}")
        if n not in weights or weights[n].shape != params[n].shape:
            got = tuple(weights[n].shape) if n in weights else "missing"
            raise UserError(f"{path}: tensor {n} is {got}, the model needs {tuple(params[n].shape)}; {FIX}")
    path, moments = _tensors(folder, "optimizer.safetensors")
    trained = [p for group in optimizer.param_groups for p in group["params"]]  # AdamW numbers them so
    state = {}
    for key, value in moments.items():
        match = re.fullmatch(r"(\d{1,9})\.(exp_avg|exp_avg_sq|step)", key)
        if not match or int(match[1]) >= len(trained) or not torch.isfinite(value).all() or \
                value.shape != (() if match[2] == "step" else trained[int(match[1])].shape) or \
                match[2] != "exp_avg" and (value < 0).any():  # a count and squares: never negative
            raise UserError(f"{path}: tensor {key} does not fit the optimizer of this model; {FIX}")
        param = trained[int(match[1])]
        state.setdefault(int(match[1]), {})[match[2]] = value if match[2] == "step" else _like(param, value)
    if any(len(moment) != 3 for moment in state.values()):
        raise UserError(f"{path}: a parameter misses one of exp_avg, exp_avg_sq, step; {FIX}")
    if not state and meta["step"] > meta["skipped"]:  # a step that updated leaves moments
        raise UserError(f"{path}: no optimizer moments after {meta['step'] - meta['skipped']} updates; {FIX}")
    for n in names:
        params[n].data.copy_(_like(params[n], weights[n]))
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta
