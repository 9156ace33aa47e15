"""LoRA, written by hand: wrap chosen nn.Linear layers, pick trainable groups, merge.

LoRA (Hu et al. 2021, arXiv:2106.09685, Eq. 3) freezes a pretrained weight W0 and learns a low-rank
update:    h = W0·x + (alpha / r) · B·A·x,    A: (r, in), B: (out, r).
A starts kaiming-uniform and B at zero, so B·A = 0 and the wrapped model starts identical to the base.

Decisions:
- The base weights are loaded strictly first, then wrapped: LoRALinear keeps the base layer's own `weight`
  and `bias`, so the base keys stay unchanged and only `...q_proj.lora_A` / `lora_B` are added.
- Groups: `lora` (LoRA on lora.targets: FFN projections), `attn_lora` (on lora.attn_targets: the layers inside
  `self_attn` or Qwen3.5's `linear_attn`), `embed`, `norm`, `head` (tied: `embed`) and `all` (full fine-tuning).
- The rank is 1 .. the narrowest in/out width of a targeted layer (more adds parameters, not rank),
  checked before allocating. A and B train in fp32 on a bf16 base: lr·grad updates vanish in bf16.
- `merge_lora` is explicit, never a side effect of `.eval()` (loralib's surprise), and idempotent.
- Adapters are saved in PEFT's file layout (adapter.py), so PEFT-based tools load them.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from minorpo.adapter import PEFT_PREFIX, save_adapter  # noqa: F401 - the file layout; lora.save_adapter
from minorpo.config import GROUPS
from minorpo.files import UserError

ATTENTION_BLOCKS = ("self_attn", "linear_attn")  # module names that hold token-mixer (attention) projections


class LoRALinear(nn.Module):
    """h = W0·x + b + (alpha/r)·B·A·dropout(x)   (LoRA Eq. 3); W0 and b frozen, A and B trained."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, group: str = "lora"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own Parameters: keys unchanged
        base.requires_grad_(False)
        self.rank, self.alpha, self.scaling, self.group = rank, alpha, alpha / rank, group
        where = dict(device=base.weight.device, dtype=torch.float32)  # fp32 even on a bf16 base
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **where))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **where))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the nn.Linear default, as in PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        # Under CUDA autocast both matmuls run in bf16; elsewhere the fp32 adapter is cast to x's dtype.
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, group={self.group}"


def _layer_index(name):
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _group_of(name):
    return "attn_lora" if any(f".{block}." in f".{name}." for block in ATTENTION_BLOCKS) else "lora"


def _replace(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora(model, rank, alpha, dropout=0.0, targets=(), attn_targets=(), start_layer=0, num_layers=0):
    """Wrap the nn.Linear layers named in targets (FFN) or attn_targets (attention) in layers start_layer ..
    start_layer+num_layers-1 (0: all) in LoRALinear; return their names. Bad targets or rank: a UserError."""
    wanted = {target: "lora" for target in targets} | {target: "attn_lora" for target in attn_targets}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    end = start_layer + num_layers if num_layers else math.inf
    chosen = {}
    for name, module in linears.items():
        target, group, i = name.rsplit(".", 1)[-1], _group_of(name), _layer_index(name)
        if target in wanted and wanted[target] != group:
            kind, where = ("an attention", "lora.attn_targets") if group == "attn_lora" else ("an FFN", "lora.targets")
            raise UserError(f"LoRA target `{target}` ({name}) is {kind} projection: list it under {where}")
        if target in wanted and i is not None and start_layer <= i < end:
            chosen[name] = module
    names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise UserError(f"LoRA target(s) {missing} match no linear layer; the model's are: {', '.join(names)}")
    if not chosen:
        raise UserError(f"no layer in lora.start_layer={start_layer}, lora.num_layers={num_layers}")
    narrowest = min(min(m.in_features, m.out_features) for m in chosen.values())
    if type(rank) is not int or not 1 <= rank <= narrowest:
        raise UserError(f"lora.rank={rank!r:.30} is out of range: it must be an integer from 1 to {narrowest}, "
                        "the narrowest in/out width of a targeted layer")
    for name, module in chosen.items():
        _replace(model, name, LoRALinear(module, rank, alpha, dropout, group=_group_of(name)))
    return list(chosen)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def group_parameters(model, group):
    """{name: Parameter} of the parameters a trainable group covers."""
    if group not in GROUPS:
        raise ValueError(f"unknown trainable group `{group}`; valid: {', '.join(GROUPS)}")
    params = dict(model.named_parameters())
    if group == "all":
        return params
    if group in ("lora", "attn_lora"):
        return {f"{n}.{p}": getattr(m, p) for n, m in lora_layers(model).items() if m.group == group
                for p in ("lora_A", "lora_B")}
    if group == "embed":
        return {n: p for n, p in params.items() if n.endswith("embed_tokens.weight")}
    if group == "head":  # with tied embeddings this is the embedding (named_parameters lists it once)
        return {n: p for n, p in params.items() if p is model.lm_head.weight}
    return {n: p for n, p in params.items() if re.search(r"norm\.weight$", n)}  # norm


def trained_parameters(model, groups):
    """{name: Parameter} of every parameter one of `groups` covers, in model order, each once."""
    ids = {id(p) for g in groups for p in group_parameters(model, g).values()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def set_trainable(model, groups):
    """Train exactly the parameters of `groups`; freeze every other one. Returns (trainable, total) counts."""
    if any(g in ("lora", "attn_lora") for g in groups) and not lora_layers(model):
        raise ValueError("a phase trains `lora`/`attn_lora` but the model has no LoRA layers")
    trained = trained_parameters(model, groups)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    return sum(p.numel() for p in trained.values()), sum(p.numel() for p in model.parameters())


def phase_at(phases, step):
    """The trainable groups of the last phase that starts at or before `step`."""
    return [p for p in phases if p["step"] <= step][-1]["trainable"]


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRA update into its base weight and put a plain nn.Linear back. Idempotent."""
    for name, m in lora_layers(model).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        linear.weight.copy_(m.weight.float() + m.lora_B.float() @ m.lora_A.float() * m.scaling)  # in fp32
        if m.bias is not None:
            linear.bias.copy_(m.bias)
        _replace(model, name, linear)
    return model


def fp32_trained_parameters(model, groups):
    """trained_parameters CAST TO FP32 in place: the fp32 master weights AdamW updates, while on CUDA the frozen
    weights stay bf16 (and autocast runs the matmuls in bf16). A no-op on the CPU, where all is fp32."""
    params = trained_parameters(model, groups)
    for p in params.values():
        p.data = p.data.float()
    return params
