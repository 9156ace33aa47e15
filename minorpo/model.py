"""The Qwen-style decoder (Qwen2, Qwen2.5 and dense Qwen3) and generation with a KV cache.

    x = embed_tokens(ids)                                   # (B, T, H)
    for each layer:  x = x + Attention(RMSNorm(x))
                     x = x + SwiGLU(RMSNorm(x))
    logits = lm_head(RMSNorm(x))                            # (B, T, vocab)

References: Qwen2 report (arXiv:2407.10671), Qwen3 report (arXiv:2505.09388), RMSNorm (Zhang & Sennrich
2019, arXiv:1910.07467), RoPE (Su et al. 2021, arXiv:2104.09864), grouped-query attention (Ainslie et al.
2023, arXiv:2305.13245), SwiGLU (Shazeer 2020, arXiv:2002.05202), nucleus sampling (Holtzman et al. 2020,
arXiv:1904.09751). The numerics follow the Hugging Face Qwen2/Qwen3 code; tests/ checks equal logits.

The two families differ in three places, all read from config.json:
- Qwen2 has a bias on q/k/v (not on o); Qwen3 has none (its `attention_bias`, false in every release).
- Qwen3 RMS-normalises every query and key head over head_dim (q_norm, k_norm), before RoPE.
- Qwen3 states head_dim, which may differ from hidden_size / num_attention_heads (Qwen3-0.6B: 128 vs 64).

Decisions:
- Module and parameter names mirror the checkpoint keys (`model.layers.0.self_attn.q_proj.weight`), so
  loading is a strict load_state_dict with no key mapping. Every projection is a plain nn.Linear, which
  LoRA replaces by name. The RoPE tables are non-persistent buffers, not checkpoint tensors.
- Attention is F.scaled_dot_product_attention(is_causal=True) with no mask: with right padding this is
  exact for every real token (it sees only earlier positions, all real) and keeps the fused kernels; pads
  are masked out of the loss instead. Packing passes a mask (packing.py).
- `hidden_states()` returns the final-normed states; the loss applies `lm_head` to response tokens only,
  as (T, vocab) logits are training's largest tensor. `forward()` gives all logits, for tests.
- RMSNorm is computed in fp32 and cast back before the gain, as the reference does; it matters in bf16.
- A decoder layer's forward has no data-dependent Python branches, so layers compile one by one.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FAMILIES = ("qwen2", "qwen3")


@dataclass
class ModelConfig:
    """The architecture, with config.json's field names. Defaults are transformers' defaults."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None           # None: hidden_size // num_attention_heads (Qwen2 never states it)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None    # None: True for qwen2 (q/k/v bias), False for qwen3
    max_position_embeddings: int = 32768
    model_type: str = "qwen3"             # "qwen2" (Qwen2, Qwen2.5) or "qwen3" (dense Qwen3)
    bos_token_id: int | None = None       # carried through load and save for other tools; unused here
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type must be one of {', '.join(FAMILIES)}, got {self.model_type!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 models always have a q/k/v bias; leave attention_bias unset")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def rotary_dim(self):  # the channels of a head that RoPE turns: all of them (Qwen3.5's config: a quarter)
        return self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def normalize(self, x):
        # x / sqrt(mean(x²) + eps), in fp32 whatever x's dtype
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # y = x / sqrt(mean(x²) + eps) · g   (Zhang & Sennrich, Eq. 4); cast back before the gain
        return self.weight * self.normalize(x).to(x.dtype)


def rope_tables(head_dim, theta, max_len):
    """cos and sin of the rotation angles, each (max_len, head_dim / 2), computed in fp32 on the CPU."""
    # pair i at position m turns by the angle m·θ_i, θ_i = theta^(-2i/d)   (RoFormer, Eq. 15)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the channel pairs of x (B, heads, T, d) by their angles; cos, sin: (T, d/2)."""
    # RoPE pairs channel i with i + d/2 ("split halves", Hugging Face's code) or with its neighbour
    # ("interleaved", RoFormer and Meta's original LLaMA code): one model up to a permutation of the q/k
    # projection rows, but trained weights work only in their own layout, and Qwen's is split halves:
    #   [x1, x2] -> [x1·cos − x2·sin, x2·cos + x1·sin]
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, d/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_attention(q, k, v, cache=None, layer_idx=0, attn_mask=None):
    """y = softmax(q·kᵀ / √hd + mask) · v for q (B, nh, T, hd), k and v (B, nkv, T, hd); each group of nh / nkv
    query heads shares one k/v head. The mask is causal (enough for right padding: module docstring), or
    attn_mask (B, 1, T, T) bool in the packed layout (packing.py). With a cache, k, v are appended to it first."""
    if cache is not None:
        T = q.size(2)
        k, v = cache.update(layer_idx, k, v)  # (B, nkv, P + T, hd): P cached positions, then these T
        P = k.size(2) - T
        # is_causal=True aligns the mask top-left (query i sees keys 0..i), which is right only for P = 0;
        # here query i sits at position P + i and sees keys 0..P + i
        attn_mask = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(diagonal=P)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        # Qwen2: a bias on q/k/v only, no q/k norms (nn.Identity has no parameters: no q_norm/k_norm keys)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias and cfg.model_type != "qwen2")
        norm = nn.Identity if cfg.model_type == "qwen2" else RMSNorm
        self.q_norm = norm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = norm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, T, nh, hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, nkv, hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v, cache, self.layer_idx, attn_mask).transpose(1, 2)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, nh * hd))  # (B, T, H)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # FFN_SwiGLU(x) = (Swish(x·W) ⊙ x·V)·W2   (Shazeer 2020, Eq. 6), Swish = SiLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)  # pre-norm residual blocks
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer for the first `length` positions, preallocated for max_len."""

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.keys, self.values = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        self.length = 0  # advanced by Qwen.hidden_states once every layer has stored its keys

    def update(self, layer_idx, k, v):
        """Store k, v (B, nkv, T, hd) after the cached positions; return all keys and values so far."""
        end = self.length + k.size(2)
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


@torch.no_grad()
def init_weights(model, seed=0):
    """Deterministic initialisation on any device, as the reference's: matrices and conv kernels ~ N(0, 0.02),
    biases 0, Qwen3.5's A ~ U(0.01, 16); norm gains (1, or 0 for (1 + w)) and dt_bias (1) keep their initial values."""
    generator = torch.Generator().manual_seed(seed)  # draws on the CPU, so the device does not matter
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0.01, 16, generator=generator).log())
        elif name.endswith(".bias"):
            p.zero_()
        elif p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """The next token id from logits (vocab,): argmax for temperature 0, else a draw from the top_p
    nucleus of softmax(logits / temperature). Draws on the CPU: a CPU generator works for any device."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, sorted_ids = probs.sort(descending=True, stable=True)
    # nucleus: keep the most likely tokens until their mass reaches top_p (a token is kept when the mass
    # before it is below top_p, so the most likely one always is); multinomial renormalises the rest
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(sorted_ids[choice])


class Qwen(nn.Module):
    """A Qwen2/Qwen3 causal LM. Qwen(config, seed) is initialised by init_weights(seed).
    The Qwen3.5 hybrid (qwen35.py) is this class with other layers, final norm and cache."""
    layer_class, norm_class, cache_class = DecoderLayer, RMSNorm, KVCache
    packs = True  # takes the packed layout (packing.py); the hybrid's recurrent state cannot

    def __init__(self, config, seed=0):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each layer in backward: less memory, ~1/3 more time
        V, H = config.vocab_size, config.hidden_size
        self.model = nn.ModuleDict(dict(  # the embedding starts empty (_weight) for init_weights: its own N(0, 1)
            embed_tokens=nn.Embedding(V, H, _weight=torch.empty(V, H)),  # on "meta" imports torch._dynamo, 2+ s
            layers=nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers)),
            norm=self.norm_class(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(H, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one matrix: embeds tokens and scores them
        cos, sin = rope_tables(config.rotary_dim, config.rope_theta, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, rotary_dim / 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.lm_head.weight.is_meta:  # checkpoint loading builds on "meta": nothing to initialise
            init_weights(self, seed)

    def hidden_states(self, input_ids, cache=None, position_ids=None, attn_mask=None):
        """Final-normed hidden states (B, T, H) for input_ids (B, T); with a cache, input_ids continue the
        cached positions (each layer's entry advances). position_ids (B, T), attn_mask (B, 1, T, T): packing.py."""
        T = input_ids.size(1)
        start = 0 if cache is None else cache.length
        if position_ids is None and start + T > self.rope_cos.size(0):
            raise ValueError(f"{start + T} positions exceed max_position_embeddings ({self.rope_cos.size(0)})")
        positions = slice(start, start + T) if position_ids is None else position_ids[:, None]  # packed: (B, 1, T)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, rotary_dim / 2) or (B, 1, T, ...)
        args = (cos, sin, cache, attn_mask)
        recompute = self.gradient_checkpointing and self.training and cache is None  # in backward, layer by layer
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        for layer in self.model.layers:
            x = checkpoint(layer, x, *args, use_reentrant=False) if recompute else layer(x, *args)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, cache=None):
        """Logits (B, T, vocab) for input_ids (B, T)."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, stop_ids=(), temperature=0.0, top_p=1.0, generator=None,
                 on_token=lambda token_id: None):
        """Continue prompt_ids (list of ints) by up to max_new_tokens; returns the new ids only, ending with
        the first stop id if one is made; on_token(id) sees each as it is made. temperature 0: greedy."""
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt token")
        weight = self.model.embed_tokens.weight
        cache = self.cache_class(self.config, 1, len(prompt_ids) + max_new_tokens, weight.dtype, weight.device)
        ids = torch.tensor([prompt_ids], device=weight.device)  # (1, P): the prompt, then one token at a time
        new_ids = []
        for _ in range(max_new_tokens):
            last_hidden = self.hidden_states(ids, cache)[0, -1]  # (H,): the head runs on the last position only
            next_id = sample_token(self.lm_head(last_hidden), temperature, top_p, generator)
            new_ids.append(next_id)
            on_token(next_id)  # to stream the answer as it is made
            if next_id in stop_ids:
                break
            ids = torch.tensor([[next_id]], device=weight.device)
        return new_ids
