"""Several processes under torchrun: the process group, DDP or FSDP2 wrapping, and what a rank holds.

DDP (the default under torchrun): every rank holds the whole model, its gradients and AdamW's moments;
gradients are averaged over ranks. FSDP2 (training.fsdp=true): each rank holds a 1/N shard (DTensors) of every
parameter, gradient and moment; a layer's weights are gathered just before it runs and freed after.

Decisions:
- fully_shard on each decoder layer, then on the whole model (the root: embedding, final norm, head). The
  training forward calls model.hidden_states, not model(), so it is registered as an FSDP forward method;
  the root keeps its weights gathered after the forward, so the head (step.ResponseLogps) reads the whole matrix.
- Gradient accumulation under FSDP reduce-scatters after every micro-batch: gradients stay sharded (1/N of
  their memory) at the cost of one reduce-scatter per micro-batch; the sum is the same (tests/test_fsdp.py).
- bf16 runs gather weights in bf16 and reduce gradients in fp32 (MixedPrecisionPolicy); fp32 runs stay fp32.
- Evaluation and samples run on every rank under FSDP: a layer gathers its weights from all the ranks.
"""
import contextlib
import datetime
import os
import re
import socket
import time

import torch
import torch.distributed as dist

from minorpo import lora
from minorpo.config import ConfigError


def _launch_env(on_cuda):
    """(rank, world, address, port) from the variables torchrun sets, each checked: one line for a leftover."""
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") + (("LOCAL_RANK",) if on_cuda else ())
    fix = ("unset RANK and WORLD_SIZE to train in one process, or start every rank with torchrun "
           "--nproc_per_node=N train.py ...")
    for name in needed:
        if not os.environ.get(name):
            raise ConfigError(f"RANK is set but {name} is not: train.py was not started by torchrun (a leftover "
                              f"environment?); {fix}")
    for name in set(needed) - {"MASTER_ADDR"}:
        if not os.environ[name].isdigit():
            raise ConfigError(f"{name}={os.environ[name][:40]!r} is not a whole number; {fix}")
    rank, world, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if not rank < world or not 0 < port < 65536:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, MASTER_PORT={port}: a rank is below WORLD_SIZE and a "
                          f"port in 1 .. 65535; {fix}")
    return rank, world, os.environ["MASTER_ADDR"], port


def _join(backend, timeout):
    """The process group without torchrun (RANK and the rest set by hand or by a scheduler): wait a bounded
    time, saying for what, for every rank to reach MASTER_ADDR:MASTER_PORT, instead of an hour in silence."""
    rank, world, address, port = _launch_env(backend == "nccl")
    text = os.environ.get("MINORPO_RENDEZVOUS_TIMEOUT") or "300"
    wait = float(text) if re.fullmatch(r"\d{1,6}(\.\d*)?", text) and float(text) > 0 else None
    if wait is None:
        raise ConfigError(f"MINORPO_RENDEZVOUS_TIMEOUT={text[:40]!r}: give the seconds to wait, e.g. 300")
    print(f"[distributed] rank {rank} of {world}, without torchrun: waiting up to {wait:.0f} s for all {world} "
          f"ranks to join at {address}:{port} (MINORPO_RENDEZVOUS_TIMEOUT sets the wait)", flush=True)
    deadline = time.monotonic() + wait
    try:
        while rank:  # torch's own retries print C++ stack traces: reach rank 0's store quietly first
            try:
                socket.create_connection((address, port), timeout=max(1.0, deadline - time.monotonic())).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing answers at {address}:{port}") from None
                time.sleep(0.5)
        store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=wait))
    except (RuntimeError, ValueError, OSError) as e:  # DistStoreError, DistNetworkError: RuntimeErrors
        raise ConfigError(f"rank {rank} of {world}: the other ranks did not join at {address}:{port} within "
                          f"{wait:.0f} s ({str(e).splitlines()[0][:120]}); start every rank, with torchrun or "
                          "the same RANK/WORLD_SIZE/MASTER_* settings, or unset RANK and WORLD_SIZE to train "
                          "in one process") from None
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def setup(fsdp, on_cuda):
    """(launched, rank, world, device): join torchrun's process group if launched by it. FSDP needs torchrun
    (even for one process: torchrun --nproc_per_node=1), so that one code path shards and gathers."""
    if "RANK" not in os.environ:
        if fsdp:
            raise ConfigError("training.fsdp=true needs torchrun: torchrun --nproc_per_node=N train.py ...")
        return False, 0, 1, "cuda" if on_cuda else "cpu"
    # rank 0 alone writes checkpoints while the others wait at the next collective: allow for big ones
    timeout, backend = datetime.timedelta(hours=1), "nccl" if on_cuda else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent holds the rendezvous
        dist.init_process_group(backend, timeout=timeout)
    else:
        _join(backend, timeout)
    device = f"cuda:{os.environ['LOCAL_RANK']}" if on_cuda else "cpu"
    if on_cuda:
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def wrap_ddp(scorer, device, on_cuda, find_unused):
    """DDP registers the parameters that require grad at wrap time: make every one any phase trains trainable first."""
    import warnings
    from torch.nn.parallel import DistributedDataParallel as DDP
    # The only buffers are the RoPE tables, the same on every rank: no need to broadcast them (~40 MB for
    # Qwen3) before every forward. Newer torch renames the flag and warns; the old one still works.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return DDP(scorer, device_ids=[device] if on_cuda else None, broadcast_buffers=False,
               find_unused_parameters=find_unused)


def shard(model, bf16):
    """FSDP2 in place: each decoder layer, then the whole model. Returns {name: parameter} of the model,
    whose parameters are now new (sharded DTensor) objects: the caller must look its trained ones up again."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for module in [*model.model.layers, model]:  # the root last
        fully_shard(module, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden_states")  # ResponseLogps and generate call it, not model()
    return dict(model.named_parameters())


def set_trainable(model, groups):
    """lora.set_trainable, also under FSDP: the root keeps its weights gathered after a forward (evaluation,
    samples) and a gathered weight keeps the requires_grad it was gathered with, so release them first."""
    if hasattr(model, "reshard"):
        model.reshard()
    return lora.set_trainable(model, groups)


def local(tensor):
    """The part of a tensor this rank holds: its shard for a DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def log_memory_once(model, optimizer, rank, world):
    """After the first AdamW step (when gradients and moments exist), every rank prints the tensors it holds."""
    def mib(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors if torch.is_tensor(t)) / 2**20

    def hook(opt, args, kwargs):
        handle.remove()
        params = list(model.parameters())
        mb = [mib(params), mib(p.grad for p in params), mib(v for s in opt.state.values() for v in s.values())]
        print(f"[memory] rank {rank} of {world} holds parameters {mb[0]:.2f} MiB + gradients {mb[1]:.2f} MiB + "
              f"AdamW {mb[2]:.2f} MiB = {sum(mb):.2f} MiB", flush=True)
    handle = optimizer.register_step_post_hook(hook)


def first_nonfinite(trained, launched, device):
    """The name of a trained parameter holding NaN or inf (its shard, on this rank), `a parameter on another
    rank`, or None: every rank gets an answer, so they all stop together."""
    bad = next((name for name, p in trained.items() if not torch.isfinite(local(p)).all()), None)
    if launched:
        flag = torch.tensor(float(bad is not None), device=device)
        dist.all_reduce(flag)
        if flag.item() and bad is None:
            return "a parameter on another rank"
    return bad


def gather_model(model, master, build):
    """The whole trained model on rank 0 as a plain module (build() makes an empty one of the same layout),
    None on the others: a collective, every rank calls it. final/ and the samples after training use it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return None
    plain = build()
    plain.load_state_dict(full)
    return plain


def grad_sync(scorer):
    """step.train_step's sync(last): DDP all-reduces the gradients in every backward unless told not to; with
    accumulation, once is enough (in the last micro-batch's backward), as the sum is the same."""
    def sync(last):
        return contextlib.nullcontext() if last or not hasattr(scorer, "no_sync") else scorer.no_sync()
    return sync


def parallel(scorer, trained, ever_trained, train_cfg, launched, bf16, device):
    """(train_scorer, trained): what train_step calls and what AdamW holds, for one process or several.
    FSDP shards the model in place: its parameters are new objects, so AdamW must hold those. DDP registers
    the parameters that require grad at wrap time: every one that any phase trains."""
    if train_cfg["fsdp"]:
        return scorer, {n: p for n, p in shard(scorer.model, bf16).items() if n in trained}
    if not launched:
        return scorer, trained
    lora.set_trainable(scorer.model, ever_trained)
    on_cuda = device.startswith("cuda")
    return wrap_ddp(scorer, device, on_cuda, find_unused=len(train_cfg["phases"]) > 1), trained
