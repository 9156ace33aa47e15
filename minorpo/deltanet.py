"""Gated DeltaNet: the linear-attention token mixer in three of every four Qwen3.5 layers.

Each head keeps a matrix memory S (d_k × d_v) in place of a growing key/value cache. Token t first decays
the whole memory by α_t ∈ (0, 1], then moves what S stores under the key k_t a step β_t ∈ (0, 1) toward
the value v_t (the delta rule: write only the error of the current read), and reads S with the query q_t:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,        o_t = S_tᵀ q_t

This is the gated delta rule of Yang, Kautz & Hatamizadeh 2024 (arXiv:2412.06464, Sec. 3, S transposed):
α_t gives Mamba2's fast, uniform forgetting, β_t DeltaNet's targeted overwrite of one association.

The layer, as the reference implementation (transformers' Qwen3_5GatedDeltaNet) computes it:
    q, k, v = split(SiLU(conv(in_proj_qkv(x))))     conv: causal, depthwise, over the last 4 tokens
    q, k    = q / ‖q‖ / √d_k, k / ‖k‖                per head
    β_t     = sigmoid(in_proj_b(x))                  one per value head
    α_t     = exp(g_t),  g_t = −exp(A_log) · softplus(in_proj_a(x) + dt_bias)     (Mamba2's decay)
    o       = the gated delta rule above
    y       = out_proj(RMSNorm(o) · w ⊙ SiLU(in_proj_z(x)))                       per value head

Decisions:
- One recurrence, two forms: `recurrent_gated_delta_rule`, the equation above token by token, for each
  generated token; `chunked_gated_delta_rule`, the same outputs 64 tokens at a time with matrix products,
  for training and prefill, where a loop over tokens would launch thousands of tiny kernels per layer.
- The recurrence runs in fp32 whatever the model dtype and the state is kept in fp32 (the checkpoints'
  mamba_ssm_dtype), as the reference does: the state sums many small decayed terms, which bf16 would drop.
- Right padding needs no mask: the convolution and the recurrence are causal, so the pad tokens after a
  row's end never reach its real tokens (the same reason causal attention needs no padding mask for them).
- `conv1d` is an nn.Conv1d without padding, given the K − 1 previous inputs explicitly: zeros at the
  sequence start, the cached ones during generation. Its weight is the checkpoint's (channels, 1, K).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minorpo.model import RMSNorm


def l2norm(x, eps=1e-6):
    # x / √(Σx² + ε), the reference's form (F.normalize divides by max(‖x‖, ε), which differs near 0)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(q, k, v, log_decay, beta, state):
    """The gated delta rule token by token. q, k: (B, H, T, d_k), v: (B, H, T, d_v), log_decay = log α
    and beta: (B, H, T), state: (B, H, d_k, d_v), all fp32. Returns outputs (B, H, T, d_v), final state."""
    outputs = []
    for t in range(q.size(2)):
        state = state * log_decay[:, :, t, None, None].exp()  # α_t S
        k_t, q_t = k[:, :, t, None, :], q[:, :, t, None, :]  # (B, H, 1, d_k) row vectors
        stored = k_t @ state  # (B, H, 1, d_v): kᵀS, what the memory holds under k_t
        error = beta[:, :, t, None, None] * (v[:, :, t, None, :] - stored)  # β_t (v_t − kᵀS)
        state = state + k_t.transpose(-1, -2) @ error  # S + k_t ⊗ error: the delta rule write
        outputs.append(q_t @ state)  # o_t = qᵀS_t  (B, H, 1, d_v)
    return torch.cat(outputs, dim=2), state


def chunked_gated_delta_rule(q, k, v, log_decay, beta, state, chunk_size=64):
    """recurrent_gated_delta_rule's outputs and final state, chunk_size tokens at a time (64: the reference's)."""
    B, H, T, _ = k.shape
    C, pad = chunk_size, -T % chunk_size
    # pad the end to whole chunks with zeros: there β = 0 writes nothing and g = 0 decays nothing, so the
    # final state is exact, and the outputs there are cut off below
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, C)) for x in (q, k, v))  # (B, H, n, C, d)
    log_decay, beta = (F.pad(x, (0, pad)).unflatten(2, (-1, C)) for x in (log_decay, beta))  # (B, H, n, C)

    # Inside one chunk, let S be the state before it and γ_t = g_1 + ... + g_t the log decay from the
    # chunk start. Unrolling the recurrence, with u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t) the value that token t
    # writes, S_t = e^γ_t S + Σ_{s≤t} e^(γ_t−γ_s) k_s u_sᵀ, so that
    #   u_t = β_t v_t − β_t e^γ_t Sᵀk_t − Σ_{s<t} β_t e^(γ_t−γ_s) (k_t·k_s) u_s
    #   o_t = e^γ_t Sᵀq_t + Σ_{s≤t} e^(γ_t−γ_s) (q_t·k_s) u_s
    #   S'  = e^γ_C S + Σ_s e^(γ_C−γ_s) k_s u_sᵀ                    (the state after the chunk)
    # The first line is a unit lower-triangular system for all u of the chunk at once:
    #   (I + A) U = β⊙V − (β e^γ ⊙ K) S,   A_ts = β_t e^(γ_t−γ_s) (k_t·k_s) for s < t
    # (the UT transform of Yang et al. 2024, arXiv:2406.06484, Sec. 3). Its solution is U = U_v − W S with
    # U_v, W independent of S, so every chunk solves in parallel; only S passes from chunk to chunk.
    gamma = log_decay.cumsum(-1)  # γ (B, H, n, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # e^(γ_t−γ_s) for s ≤ t, 0 above the diagonal (masked before exp: the difference is positive there)
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B,H,n,C,C)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # (B, H, n, C, C), strictly lower
    # unitriangular=True reads A's (zero) diagonal as ones: this solves (I + A) X = rhs
    U_v = torch.linalg.solve_triangular(A, beta[..., None] * v, upper=False, unitriangular=True)  # (B,H,n,C,d_v)
    W = torch.linalg.solve_triangular(A, (beta * gamma.exp())[..., None] * k, upper=False, unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * decay  # (q_t·k_s) e^(γ_t−γ_s), s ≤ t  (B, H, n, C, C)
    q_decayed = q * gamma.exp()[..., None]  # e^γ_t q_t: reads S through the decay since the chunk start
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # e^(γ_C−γ_s) k_s: writes decayed to the end

    outputs = []
    for i in range(q.size(2)):
        U = U_v[:, :, i] - W[:, :, i] @ state  # (B, H, C, d_v)
        outputs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ U)  # (B, H, C, d_v)
        state = gamma[:, :, i, -1, None, None].exp() * state + k_to_end[:, :, i].transpose(-1, -2) @ U
    return torch.cat(outputs, dim=2)[:, :, :T], state


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_k, self.n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.d_k, self.d_v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        key_dim, value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        self.split_sizes = (key_dim, key_dim, value_dim)
        conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, value_dim, bias=False)  # output gate
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.n_v, bias=False)  # β, the write strength
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.n_v, bias=False)  # the decay's input
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.kernel_size, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.n_v))
        self.A_log = nn.Parameter(torch.zeros(self.n_v))
        self.norm = RMSNorm(self.d_v, cfg.rms_norm_eps)  # over each value head; a plain gain w, initialised to 1
        self.out_proj = nn.Linear(value_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cache=None):
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x).transpose(1, 2)  # (B, conv_dim, T)
        if cache is None or self.layer_idx not in cache.conv_states:  # zeros: nothing before the first token
            past = qkv.new_zeros(B, qkv.size(1), self.kernel_size - 1)
            state = x.new_zeros(B, self.n_v, self.d_k, self.d_v, dtype=torch.float32)
        else:
            past, state = cache.conv_states[self.layer_idx], cache.recurrent_states[self.layer_idx]
        window = torch.cat((past, qkv), dim=-1)  # (B, conv_dim, K − 1 + T)
        # each channel mixes its own last K inputs: out_t = Σ_j w_j · in_(t−K+1+j)
        qkv = F.silu(self.conv1d(window)).transpose(1, 2)  # (B, T, conv_dim)
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        q = q.reshape(B, T, self.n_k, self.d_k).transpose(1, 2).float()  # (B, n_k, T, d_k)
        k = k.reshape(B, T, self.n_k, self.d_k).transpose(1, 2).float()  # (B, n_k, T, d_k)
        v = v.reshape(B, T, self.n_v, self.d_v).transpose(1, 2).float()  # (B, n_v, T, d_v)
        # value heads may outnumber key heads (Qwen3.5-9B: 32 and 16); as in grouped-query attention,
        # key head j then serves value heads j·n_v/n_k ... (j+1)·n_v/n_k − 1
        q, k = q.repeat_interleave(self.n_v // self.n_k, dim=1), k.repeat_interleave(self.n_v // self.n_k, dim=1)
        q, k = l2norm(q) * self.d_k ** -0.5, l2norm(k)
        beta = torch.sigmoid(self.in_proj_b(x)).float().transpose(1, 2)  # (B, n_v, T)
        # g = log α = −exp(A_log) · softplus(a + dt_bias) ≤ 0: a per-head rate times a per-token step size
        log_decay = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # (B, T, n_v)
        rule = recurrent_gated_delta_rule if T == 1 else chunked_gated_delta_rule
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under bf16 autocast (Decisions)
            o, state = rule(q, k, v, log_decay.transpose(1, 2), beta, state)  # (B, n_v, T, d_v)
        if cache is not None:
            cache.conv_states[self.layer_idx] = window[:, :, -(self.kernel_size - 1):]
            cache.recurrent_states[self.layer_idx] = state
        z = self.in_proj_z(x).view(B, T, self.n_v, self.d_v)  # (B, T, n_v, d_v): the output gate
        o = (self.norm(o.transpose(1, 2).to(x.dtype)) * F.silu(z.float())).to(x.dtype)  # RMSNorm(o) · w ⊙ SiLU(z)
        return self.out_proj(o.reshape(B, T, -1))  # (B, T, H)
