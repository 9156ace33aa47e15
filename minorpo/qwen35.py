"""The Qwen3.5 dense text model: a hybrid of Gated DeltaNet and gated attention layers.

    x = embed_tokens(ids)                                           # (B, T, H)
    for each layer:  x = x + TokenMixer(RMSNorm(x))                 # 3 of 4: GatedDeltaNet, 1 of 4: attention
                     x = x + SwiGLU(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                                    # (B, T, vocab)

In every small Qwen3.5 model (0.8B, 2B, 4B, 9B), config.json's `layer_types` (else every
`full_attention_interval`-th layer) names the full attention layers; the others are linear attention
(deltanet.py). References: Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv:2412.06464), gated
attention (Qiu et al. 2025, arXiv:2505.06708), and Qwen3-Next and Qwen3.5 in transformers
(`models/qwen3_5`), whose logits tests/test_qwen35.py reproduces. What differs from Qwen3 (model.py):
- Gated attention: q_proj gives each head a query and a gate of head_dim each (per head, query first),
  and the attention output is multiplied by sigmoid(gate) before o_proj.
- Partial RoPE: only the first head_dim · partial_rotary_factor channels of q and k turn (64 of 256), in
  split-halves layout; the rest pass. The reference builds multimodal RoPE, but for text its three
  position streams are the same token position: plain RoPE over the rotated channels.
- Every RMSNorm gain of the decoder (input, post-attention, final, q_norm, k_norm) is stored centred on
  zero and applied as (1 + w), in fp32 before the cast back. The DeltaNet output norm is the exception.

Decisions:
- Module names mirror the text-only checkpoint keys (`model.layers.0.linear_attn.in_proj_qkv.weight`),
  so loading is a strict load_state_dict. The released checkpoints are vision-language models that keep
  these under `model.language_model.*` next to `model.visual.*` and `mtp.*` (multi-token prediction);
  checkpoint.py strips the prefix and skips the parts minorpo does not use, and saves text-only.
- Qwen35 subclasses Qwen, swapping only its layers, final norm and cache, so train.py uses either model
  unchanged; its config and cache extend model.py's, and its attention reuses model.py's RoPE and attention
  functions, so model.py holds the dense model alone. DeltaNet layers ignore cos and sin.
- The cache holds what each layer needs to continue: keys and values for the attention layers; the last
  K − 1 convolution inputs and the fp32 recurrent state S for the DeltaNet layers, which store them on
  their first call. Their memory is constant in the sequence length: why three of four layers are DeltaNet.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from minorpo.deltanet import GatedDeltaNet
from minorpo.model import MLP, KVCache, ModelConfig, Qwen, RMSNorm, apply_rope, causal_attention

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class Qwen35Config(ModelConfig):
    """The text model (text_config in a vision-language checkpoint): ModelConfig's fields and the hybrid's,
    with config.json's field names. Defaults are transformers' Qwen3_5TextConfig defaults."""
    head_dim: int = 256
    attention_bias: bool = False           # a bias on q/k/v/o; false in every release
    model_type: str = "qwen3_5_text"
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: list | None = None        # None: every full_attention_interval-th layer is full attention
    full_attention_interval: int = 4
    partial_rotary_factor: float = 0.25    # the share of each head's channels that RoPE turns

    def __post_init__(self):
        if self.model_type != "qwen3_5_text":
            raise ValueError(f"Qwen35Config is the qwen3_5_text model, got model_type {self.model_type!r}")
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % self.full_attention_interval == 0
                                else "linear_attention" for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must list {self.num_hidden_layers} of {', '.join(LAYER_TYPES)}, "
                             f"got {self.layer_types}")
        for heads, groups in (("num_attention_heads", "num_key_value_heads"),
                              ("linear_num_value_heads", "linear_num_key_heads")):
            if getattr(self, heads) % getattr(self, groups):
                raise ValueError(f"{heads} ({getattr(self, heads)}) must be a multiple of {groups} "
                                 f"({getattr(self, groups)})")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"head_dim · partial_rotary_factor must be even and positive for RoPE, "
                             f"got {self.head_dim} · {self.partial_rotary_factor}")
        if self.linear_conv_kernel_dim < 2:
            raise ValueError(f"linear_conv_kernel_dim must be at least 2, got {self.linear_conv_kernel_dim}")

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)


class CenteredRMSNorm(RMSNorm):
    """RMSNorm with its gain stored centred on zero: y = x / √(mean(x²) + eps) · (1 + w), all in fp32."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return (self.normalize(x) * (1.0 + self.weight.float())).to(x.dtype)


def apply_partial_rope(x, cos, sin):
    """RoPE (model.py) on the first r = 2 · cos.size(-1) channels of each head of x; the others pass unrotated."""
    r = 2 * cos.size(-1)
    return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)


class GatedAttention(nn.Module):
    """Attention (model.py) with (1 + w) q/k norms, partial RoPE and an output gate: q_proj gives each head a
    query and a gate (per head, query first), and each output channel is scaled by sigmoid(gate) ∈ (0, 1)."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim * 2, bias=bias)  # query and gate
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = CenteredRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = CenteredRMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, gate = self.q_proj(x).view(B, T, nh, 2 * hd).chunk(2, dim=-1)  # (B, T, nh, hd) each
        q = self.q_norm(q).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, nkv, hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        y = causal_attention(q, k, v, cache, self.layer_idx).transpose(1, 2)  # (B, T, nh, hd)
        return self.o_proj((y * torch.sigmoid(gate)).reshape(B, T, nh * hd))  # (B, T, H)


class HybridDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        if self.layer_type == "linear_attention":  # the attribute name is the checkpoint's
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = GatedAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = CenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = CenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):  # attn_mask is always None: packs is False
        h = self.input_layernorm(x)  # pre-norm residual blocks
        if self.layer_type == "linear_attention":  # fixed per layer: compiles without a graph break
            x = x + self.linear_attn(h, cache)
        else:
            x = x + self.self_attn(h, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridCache(KVCache):
    """KVCache for the attention layers only; each DeltaNet layer adds its conv inputs and state on its first call."""

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        attention = [i for i, layer_type in enumerate(cfg.layer_types) if layer_type == "full_attention"]
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in attention}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in attention}
        self.conv_states, self.recurrent_states = {}, {}
        self.length = 0  # advanced by Qwen35.hidden_states once every layer has been updated


class Qwen35(Qwen):
    """A Qwen3.5 dense causal LM (text): Qwen with hybrid layers, the (1 + w) final norm and a hybrid cache."""
    layer_class, norm_class, cache_class = HybridDecoderLayer, CenteredRMSNorm, HybridCache
    packs = False  # a DeltaNet state runs through every earlier token: it cannot skip the chosen answer
