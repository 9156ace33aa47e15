"""Qwen3.5: logits equal the reference implementation's, the two forms of the gated delta rule agree,
right padding and the generation cache change nothing, LoRA reaches every layer kind, gradients reach every
parameter, and checkpoints load from the vision-language layout and round-trip through the text layout."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from minorpo import lora
from minorpo.checkpoint import load_model, load_model_config
from test_checkpoint import save_model
from minorpo.deltanet import chunked_gated_delta_rule, recurrent_gated_delta_rule
from minorpo.model import sample_token
from minorpo.qwen35 import HybridCache, Qwen35, Qwen35Config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qwen35-tiny")
# every layer kind and feature of the real models, tiny: 3 DeltaNet layers + 1 gated attention layer,
# twice as many value heads as key heads, RoPE on a quarter of head_dim
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=256)
FFN, MIXERS = ["gate_proj", "up_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv",
                                                      "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]


@pytest.fixture(scope="module")
def fixture():
    """(model, reference): the fixture loaded by minorpo, and transformers' input ids and fp32 logits."""
    return load_model(FIXTURE), load_file(FIXTURE + ".reference.safetensors")


def tiny_model(seed=0, **overrides):
    model = Qwen35(Qwen35Config(**{**TINY, **overrides}), seed=seed)
    with torch.no_grad():  # the reference init leaves gains at 1 and decays fast; vary them like a trained model
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


@torch.no_grad()
def test_logits_equal_the_reference_in_fp32(fixture):
    model, reference = fixture
    assert [type(layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn).__name__
            for layer in model.model.layers] == ["GatedDeltaNet"] * 3 + ["GatedAttention"]
    logits = model(reference["input_ids"])  # (2, 80, vocab): 80 tokens cross the 64-token DeltaNet chunks
    assert logits.shape == reference["logits"].shape
    # measured 4.2e-5: fp32 rounding, amplified layer by layer; transformers' own fp32 logits are 3e-5 from
    # the float64 ones. A real mismatch (a norm, a gate, a RoPE channel) moves logits by 0.1 or more.
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_bf16_logits_equal_the_reference_in_bf16(fixture):
    _, reference = fixture
    bf16 = load_model(FIXTURE, dtype=torch.bfloat16)
    assert bf16.model.layers[0].linear_attn.A_log.dtype == torch.bfloat16
    logits = bf16(reference["input_ids"]).float()
    # bf16 rounding moves this tiny random model's logits far (0.77 from fp32, the reference's just as far),
    # but both implementations round alike: 0.023 apart here. Rounding the recurrence's inputs to bf16, or
    # casting an RMSNorm to bf16 before its (1 + w) gain, lands over 1.0 away.
    assert (logits - reference["logits_bf16"].float()).abs().max().item() <= 0.1


@torch.no_grad()
def test_forward_is_the_head_on_the_final_hidden_states(fixture):
    model, reference = fixture
    ids = reference["input_ids"]
    hidden = model.hidden_states(ids)
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(hidden), model(ids), rtol=0, atol=0)


def random_delta_rule_inputs(B=2, H=4, T=150, d_k=8, d_v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, d_k, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, d_v, generator=g)
    log_decay = -torch.rand(B, H, T, generator=g) * torch.rand(B, H, 1, generator=g)  # slow to fast forgetting
    beta = torch.rand(B, H, T, generator=g)
    state = torch.randn(B, H, d_k, d_v, generator=g)
    return q, k, v, log_decay, beta, state


@pytest.mark.parametrize("T", [1, 37, 64, 150])
def test_chunked_delta_rule_equals_the_recurrence(T):
    inputs = random_delta_rule_inputs(T=T)  # a non-zero starting state, as in a continued generation
    out, state = chunked_gated_delta_rule(*inputs)
    want_out, want_state = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=0, atol=1e-5)
    out, state = chunked_gated_delta_rule(*inputs, chunk_size=16)  # the chunk size changes nothing
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_later_token_does_not_change_earlier_logits(fixture):
    model, reference = fixture
    ids = reference["input_ids"][:1].clone()
    t = 70  # in the second DeltaNet chunk
    changed = ids.clone()
    changed[0, t + 1:] = (changed[0, t + 1:] + 1) % model.config.vocab_size
    before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1], before[:, t + 1])


@torch.no_grad()
def test_right_padded_batch_equals_each_row_alone(fixture):
    model, reference = fixture
    rows = [reference["input_ids"][0].tolist(), reference["input_ids"][1, :70].tolist(),
            reference["input_ids"][1, 5:14].tolist(), [5, 7]]  # 80 (two chunks), 70, 9 and 2 real tokens
    batch = torch.zeros(len(rows), 80, dtype=torch.long)  # pad id 0 on the right
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row)
    batch_logits = model(batch)
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        torch.testing.assert_close(batch_logits[i, :len(row)], alone, rtol=0, atol=1e-5)


def generate_without_cache(model, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, generator=None):
    """The slow, obviously right loop: recompute the whole sequence for every new token."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(sample_token(model(torch.tensor([ids]))[0, -1], temperature, top_p, generator))
    return ids[len(prompt_ids):]


def test_generation_with_the_cache_equals_recomputing(fixture):
    model, reference = fixture
    prompt = reference["input_ids"][0, :60].tolist()  # prompt and answer run past the 64-token chunk
    new_ids = model.generate(prompt, max_new_tokens=12)
    assert len(new_ids) == 12 and new_ids == generate_without_cache(model, prompt, 12)
    prompt, kwargs = reference["input_ids"][1, :5].tolist(), dict(max_new_tokens=20, temperature=1.2, top_p=0.9)
    sampled = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert sampled == generate_without_cache(model, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    stop = sampled[6]
    stopped = model.generate(prompt, stop_ids=(stop,), generator=torch.Generator().manual_seed(1), **kwargs)
    assert stopped == sampled[:sampled.index(stop) + 1]


@torch.no_grad()
def test_prefill_in_pieces_with_the_cache_equals_one_pass(fixture):
    model, reference = fixture
    ids = reference["input_ids"]
    cache = HybridCache(model.config, 2, 80, torch.float32, "cpu")
    pieces = [ids[:, :2], ids[:, 2:3], ids[:, 3:70], ids[:, 70:71], ids[:, 71:]]  # shorter than the conv, 1, long
    logits = torch.cat([model(piece, cache) for piece in pieces], dim=1)
    # measured 6e-5: the pieces cut the 64-token chunks elsewhere, a different order of fp32 roundings
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-4)
    assert cache.length == 80 and set(cache.keys) == {3} and set(cache.recurrent_states) == {0, 1, 2}


def test_lora_reaches_every_layer_kind_and_starts_identical():
    model, ids = tiny_model(), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    wrapped = lora.inject_lora(model, 4, 8.0, targets=FFN, attn_targets=MIXERS)
    per_layer = {i: {n.rsplit(".", 1)[-1] for n in wrapped if n.startswith(f"model.layers.{i}.")} for i in range(4)}
    linear = set(FFN) | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}
    assert per_layer == {0: linear, 1: linear, 2: linear, 3: set(FFN) | {"q_proj", "k_proj", "v_proj", "o_proj"}}
    groups = {n: m.group for n, m in lora.lora_layers(model).items()}
    assert groups["model.layers.0.linear_attn.in_proj_qkv"] == groups["model.layers.3.self_attn.q_proj"] \
        == "attn_lora" and groups["model.layers.0.mlp.up_proj"] == "lora"
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    with pytest.raises(ValueError, match=r"`out_proj`.*list it under lora.attn_targets"):
        lora.inject_lora(tiny_model(), 4, 8.0, targets=["out_proj"])


def test_gradients_reach_every_parameter_and_every_adapter():
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(0))
    model = tiny_model().train()
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():  # A_log, dt_bias, the conv kernels, the gates: all of them
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model = tiny_model()
    lora.inject_lora(model, 4, 8.0, targets=FFN, attn_targets=MIXERS)
    with torch.no_grad():  # B = 0 gives A no gradient; make both non-zero so both must receive one
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    lora.set_trainable(model, ["lora", "attn_lora"])
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.gradient_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layer_idx", [0, 3], ids=["deltanet", "attention"])
def test_a_decoder_layer_traces_as_one_graph(layer_idx):
    model = tiny_model()
    layer, x = model.model.layers[layer_idx], torch.randn(2, 70, 32)
    cos, sin = model.rope_cos[:70], model.rope_sin[:70]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fails on any graph break
    torch.testing.assert_close(compiled(x, cos, sin), layer(x, cos, sin))


def test_vision_language_checkpoint_loads_its_text_model(fixture):
    raw = json.load(open(os.path.join(FIXTURE, "config.json")))
    assert raw["model_type"] == "qwen3_5" and "text_config" in raw
    stored = load_file(os.path.join(FIXTURE, "model.safetensors"))
    assert any(n.startswith("model.visual.") for n in stored) and any(n.startswith("mtp.") for n in stored)
    cfg = load_model_config(FIXTURE)
    assert (cfg.model_type, cfg.rope_theta, cfg.partial_rotary_factor, cfg.rotary_dim, cfg.tie_word_embeddings) \
        == ("qwen3_5_text", 1e7, 0.25, 4, True)
    model, _ = fixture
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].linear_attn.A_log,
                       stored["model.language_model.layers.0.linear_attn.A_log"].float())


@pytest.mark.parametrize("tied", [True, False])
def test_save_writes_the_text_layout_and_round_trips(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied, eos_token_id=[3, 4])
    out = str(tmp_path / "final")
    save_model(model, out)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["architectures"] == ["Qwen3_5ForCausalLM"] and saved["model_type"] == "qwen3_5_text"
    assert saved["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert "use_sliding_window" not in saved
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert "model.layers.0.linear_attn.conv1d.weight" in stored and ("lm_head.weight" in stored) != tied
    loaded = load_model(out)
    assert loaded.config == model.config
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_layer_types_come_from_the_interval_when_not_listed(tmp_path):
    save_model(tiny_model(num_hidden_layers=6, layer_types=None), str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    raw = json.load(open(path))
    del raw["layer_types"]
    json.dump({**raw, "full_attention_interval": 3}, open(path, "w"))
    assert load_model_config(str(tmp_path / "m")).layer_types == ["linear_attention"] * 2 + ["full_attention"] \
        + ["linear_attention"] * 2 + ["full_attention"]


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="layer_types must list 4"):
        Qwen35Config(**{**TINY, "layer_types": ["full_attention"] * 3})
    with pytest.raises(ValueError, match="linear_num_value_heads .* multiple of linear_num_key_heads"):
        Qwen35Config(**{**TINY, "linear_num_value_heads": 3})
    with pytest.raises(ValueError, match="partial_rotary_factor must be even"):
        Qwen35Config(**{**TINY, "partial_rotary_factor": 0.1})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_model()(torch.zeros(1, 257, dtype=torch.long))
