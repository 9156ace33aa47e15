"""Model: logits equal the reference implementation's, attention is causal and padding-safe, the KV cache
changes nothing, and the training-time switches (gradient checkpointing, compile) keep the maths."""
import os

import pytest
import torch
from safetensors.torch import load_file

from minorpo.checkpoint import load_model
from minorpo.model import KVCache, ModelConfig, Qwen, sample_token

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ("qwen2-tiny", "qwen3-tiny")


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    """(model, reference) for one golden fixture made by scripts/make_fixtures.py with transformers."""
    name = request.param
    reference = load_file(os.path.join(FIXTURES, f"{name}.reference.safetensors"))
    return load_model(os.path.join(FIXTURES, name)), reference


def tiny_config(**overrides):
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=64), **overrides})


@torch.no_grad()
def test_logits_equal_the_reference_in_fp32(fixture):
    model, reference = fixture
    logits = model(reference["input_ids"])
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_bf16_model_stays_close_to_the_reference(fixture):
    model, reference = fixture
    bf16 = Qwen(model.config)
    bf16.load_state_dict(model.state_dict())
    logits = bf16.to(torch.bfloat16)(reference["input_ids"]).float()
    assert (logits - reference["logits"]).abs().max().item() < 0.15


@torch.no_grad()
def test_forward_is_the_head_on_the_final_hidden_states(fixture):
    model, reference = fixture
    ids = reference["input_ids"]
    hidden = model.hidden_states(ids)
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(hidden), model(ids), rtol=0, atol=0)


@torch.no_grad()
def test_a_later_token_does_not_change_earlier_logits(fixture):
    model, reference = fixture
    ids = reference["input_ids"][:1].clone()
    t = 6
    changed = ids.clone()
    changed[0, t + 1:] = (changed[0, t + 1:] + 1) % model.config.vocab_size
    before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1], before[:, t + 1])


@torch.no_grad()
def test_right_padded_batch_equals_each_row_alone(fixture):
    model, reference = fixture
    rows = [reference["input_ids"][0, :16].tolist(), reference["input_ids"][1, :9].tolist(), [5, 7, 11]]
    batch = torch.zeros(len(rows), 16, dtype=torch.long)  # pad id 0 on the right
    for i, row in enumerate(rows):
        batch[i, :len(row)] = torch.tensor(row)
    batch_logits = model(batch)
    for i, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        torch.testing.assert_close(batch_logits[i, :len(row)], alone, rtol=0, atol=1e-5)


def generate_without_cache(model, prompt_ids, max_new_tokens, stop_ids=(), temperature=0.0, top_p=1.0,
                           generator=None):
    """The slow, obviously right loop: recompute the whole sequence for every new token."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = sample_token(model(torch.tensor([ids]))[0, -1], temperature, top_p, generator)
            ids.append(next_id)
            if next_id in stop_ids:
                break
    return ids[len(prompt_ids):]


def test_kv_cache_generation_equals_recomputing_greedy(fixture):
    model, reference = fixture
    prompt = reference["input_ids"][0, :5].tolist()
    new_ids = model.generate(prompt, max_new_tokens=20)
    assert len(new_ids) == 20
    assert new_ids == generate_without_cache(model, prompt, 20)


def test_kv_cache_generation_equals_recomputing_sampled(fixture):
    model, reference = fixture
    prompt = reference["input_ids"][1, :7].tolist()
    kwargs = dict(max_new_tokens=25, temperature=1.3, top_p=0.9)
    new_ids = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert new_ids == generate_without_cache(model, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    again = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert again == new_ids
    assert model.generate(prompt, generator=torch.Generator().manual_seed(2), **kwargs) != new_ids


def test_generation_stops_at_a_stop_id_and_streams_each_id_made(fixture):
    model, reference = fixture
    prompt = reference["input_ids"][0, :5].tolist()
    free = model.generate(prompt, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    stop, streamed = free[4], []
    stopped = model.generate(prompt, max_new_tokens=12, stop_ids=(stop,), temperature=1.0,
                             generator=torch.Generator().manual_seed(0), on_token=streamed.append)
    assert stopped == free[:free.index(stop) + 1] == streamed


@torch.no_grad()
def test_chunked_prefill_with_a_cache_equals_one_pass(fixture):
    model, reference = fixture
    ids = reference["input_ids"][:, :12]
    cache = KVCache(model.config, 2, 12, torch.float32, "cpu")
    chunks = [model(ids[:, :5], cache), model(ids[:, 5:6], cache), model(ids[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), rtol=0, atol=1e-5)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([3.0, 2.9, -5.0, -6.0])  # p ≈ [0.52, 0.48, 0.0002, 0.0001]
    generator = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, 1.0, 0.9, generator) for _ in range(200)}
    assert draws == {0, 1}
    assert {sample_token(logits, 1.0, 0.5, generator) for _ in range(50)} == {0}
    assert sample_token(logits, 0.0) == 0


def test_parameter_names_mirror_the_checkpoint_keys():
    qwen3 = Qwen(tiny_config(tie_word_embeddings=True))
    names = set(qwen3.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_norm.weight", "model.layers.1.mlp.down_proj.weight"} <= names
    assert not any("rope" in n or n.endswith("bias") for n in names)  # RoPE tables are not checkpoint tensors
    assert qwen3.lm_head.weight is qwen3.model.embed_tokens.weight
    qwen2 = Qwen(tiny_config(model_type="qwen2", head_dim=None))
    assert qwen2.config.head_dim == 8 and qwen2.config.attention_bias
    names = set(qwen2.state_dict())
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    assert not any("q_norm" in n for n in names)
    assert all(type(m) is torch.nn.Linear for n, m in qwen2.named_modules() if n.endswith("_proj"))


def test_init_is_deterministic_in_the_seed():
    a, b, c = Qwen(tiny_config(), seed=3), Qwen(tiny_config(), seed=3), Qwen(tiny_config(), seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.ndim == 2:
            assert not torch.equal(p, r) and abs(p.std().item() - 0.02) < 0.005, name


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = Qwen(tiny_config(), seed=0).train()
        model.gradient_checkpointing = checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6)


def test_a_decoder_layer_traces_as_one_graph():
    model = Qwen(tiny_config(), seed=0)
    layer, x = model.model.layers[0], torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fails on any graph break
    torch.testing.assert_close(compiled(x, cos, sin), layer(x, cos, sin))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="model_type"):
        tiny_config(model_type="llama")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Qwen(tiny_config())(torch.zeros(1, 65, dtype=torch.long))
