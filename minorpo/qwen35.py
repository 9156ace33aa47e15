"""The Qwen3.5 dense text model: a hybrid of Gated DeltaNet and gated attention layers.

    x = embed_tokens(ids)                                           # (B, T, H)
    for each layer:  x = x + TokenMixer(RMSNorm(x))                 # 3 of 4: GatedDeltaNet, 1 of 4: attention
                     x = x + SwiGLU(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                                    # (B, T, vocab)

Every small Qwen3.5 model (0.8B, 2B, 4B, 9B) has this shape: config.json's `layer_types` (or, without
it, every `full_attention_interval`-th layer) says which layers are full attention; the others are linear
attention (minorpo/deltanet.py). References: Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024,
arXiv:2412.06464), gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models",
arXiv:2505.06708), Qwen3-Next and Qwen3.5 as implemented in transformers (`models/qwen3_5`), whose logits
tests/test_qwen35.py reproduces. What differs from Qwen3 (minorpo/model.py):
- Gated attention: q_proj gives each head a query and a gate of head_dim each (per head, query first),
  and the attention output is multiplied by sigmoid(gate) before o_proj.
- Partial RoPE: only the first head_dim · partial_rotary_factor channels of q and k turn (64 of 256),
  in split-halves layout within them; the rest pass unrotated. The reference builds multimodal RoPE
  (M-RoPE, interleaved time/height/width sections), but for text the three position streams are the same
  token position, so it is plain RoPE over the rotated channels.
- Every RMSNorm gain of the decoder (input, post-attention, final, q_norm, k_norm) is stored centred on
  zero and applied as (1 + w), in fp32 before the cast back. The DeltaNet output norm is the exception.

Decisions:
- Module names mirror the text-only checkpoint keys (`model.layers.0.linear_attn.in_proj_qkv.weight`),
  so loading is a strict load_state_dict. The released checkpoints are vision-language models that keep
  these under `model.language_model.*` next to `model.visual.*` and `mtp.*` (multi-token prediction);
  checkpoint.py strips the prefix and skips the parts minorpo does not use, and saves text-only.
- Qwen35 subclasses Qwen and swaps only its layer, final norm, cache and initialisation, so the interface
  is Qwen's (forward, hidden_states, lm_head, model.layers, gradient_checkpointing, generate, config) and
  train.py uses either model unchanged. A layer's forward is (x, cos, sin, cache); DeltaNet layers ignore
  cos and sin.
- The cache holds what each layer needs to continue: keys and values for the attention layers; the last
  K − 1 convolution inputs and the recurrent state S for the DeltaNet layers. Their memory is constant in
  the sequence length, which is why three of four layers are DeltaNet.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from minorpo.deltanet import GatedDeltaNet
from minorpo.model import MLP, Qwen, RMSNorm, apply_rope, causal_attention

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class Qwen35Config:
    """The text model, with config.json's field names (text_config in a vision-language checkpoint).
    Defaults are transformers' Qwen3_5TextConfig defaults."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: list | None = None        # None: every full_attention_interval-th layer is full attention
    full_attention_interval: int = 4
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25    # the share of each head's channels that RoPE turns
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # a bias on q/k/v/o; false in every release
    max_position_embeddings: int = 32768
    model_type: str = "qwen3_5_text"
    bos_token_id: int | None = None        # carried through load and save for other tools; unused here
    eos_token_id: int | list | None = None

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
    """RoPE (model.apply_rope) on the first 2 · cos.size(-1) channels of x (B, heads, T, d); the rest pass."""
    rotary_dim = 2 * cos.size(-1)
    return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class GatedAttention(nn.Module):
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
        y = causal_attention(q, k, v, cache, self.layer_idx)  # (B, nh, T, hd)
        # the output gate: each channel of each head scaled by sigmoid of its gate, σ(gate) ∈ (0, 1)
        y = y.transpose(1, 2).reshape(B, T, nh * hd) * torch.sigmoid(gate.reshape(B, T, nh * hd))
        return self.o_proj(y)  # (B, T, H)


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

    def forward(self, x, cos, sin, cache=None):
        h = self.input_layernorm(x)  # pre-norm residual blocks
        if self.layer_type == "linear_attention":  # fixed per layer: compiles without a graph break
            x = x + self.linear_attn(h, cache)
        else:
            x = x + self.self_attn(h, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridCache:
    """Per layer, what generation carries to the next call: keys and values of the attention layers
    (preallocated for max_len positions), the last K − 1 convolution inputs and the fp32 recurrent state
    of the DeltaNet layers (zeros before the first token)."""

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        kv_shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + \
            cfg.linear_num_value_heads * cfg.linear_value_head_dim
        state_shape = (batch_size, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        self.keys, self.values, self.conv_states, self.recurrent_states = {}, {}, {}, {}
        for i, layer_type in enumerate(cfg.layer_types):
            if layer_type == "full_attention":
                self.keys[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
                self.values[i] = torch.zeros(kv_shape, dtype=dtype, device=device)
            else:
                self.conv_states[i] = torch.zeros(batch_size, conv_dim, cfg.linear_conv_kernel_dim - 1,
                                                  dtype=dtype, device=device)
                self.recurrent_states[i] = torch.zeros(state_shape, dtype=torch.float32, device=device)
        self.length = 0  # advanced by Qwen35.hidden_states once every layer has been updated

    def update(self, layer_idx, k, v):
        """Store k, v (B, nkv, T, hd) after the cached positions; return all keys and values so far."""
        end = self.length + k.size(2)
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


@torch.no_grad()
def init_weights(model, seed=0):
    """Deterministic initialisation on any device, as the reference's: matrices and conv kernels
    ~ N(0, 0.02), biases 0, (1 + w) norm gains w = 0, the DeltaNet norm gain 1, dt_bias 1, A ~ U(0.01, 16)."""
    generator = torch.Generator().manual_seed(seed)  # draws on the CPU, so the device does not matter
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=generator).log())
        elif name.endswith(("dt_bias", "linear_attn.norm.weight")):
            p.fill_(1.0)
        elif p.ndim == 1:  # biases and the (1 + w) RMSNorm gains
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


class Qwen35(Qwen):
    """A Qwen3.5 dense causal LM (text): Qwen's embedding, head, forward and cached generation around
    hybrid layers, the (1 + w) final norm, a hybrid cache and its own initialisation (init_weights above)."""
    layer_class, norm_class, cache_class = HybridDecoderLayer, CenteredRMSNorm, HybridCache
    packs = False  # a DeltaNet state runs through every earlier token: it cannot skip the chosen answer
    init_weights = staticmethod(init_weights)
