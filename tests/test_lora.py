"""LoRA: starts identical, trains only its groups, switches phases, merges exactly, saves like PEFT."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from minorpo import chat, lora
from minorpo.files import UserError
from minorpo.model import ModelConfig, Qwen

CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
           max_position_embeddings=64, model_type="qwen3", attention_bias=False, tie_word_embeddings=False)
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Qwen(ModelConfig(**{**CFG, **kw}))


def wrapped(rank=4, alpha=8.0, **kw):
    model = make_model()
    lora.inject_lora(model, rank, alpha, targets=["gate_proj", "up_proj", "down_proj"],
                     attn_targets=["q_proj", "v_proj"], **kw)
    return model


def randomize_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_wrapped_model_starts_identical():
    base = make_model()
    with torch.no_grad():
        assert torch.equal(wrapped()(IDS), base(IDS))


def test_base_keys_unchanged_and_lora_keys_added():
    keys = set(wrapped().state_dict())
    assert set(make_model().state_dict()) <= keys
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys and "model.layers.2.mlp.down_proj.lora_B" in keys
    assert "model.layers.0.self_attn.k_proj.lora_A" not in keys


def test_trainable_count_is_r_times_in_plus_out():
    model, r = wrapped(rank=4), 4
    H, I, q, kv = 32, 48, 4 * 8, 2 * 8
    per_layer = r * (H + q) + r * (H + kv) + 2 * r * (H + I) + r * (I + H)  # q, v, gate, up, down
    n_lora = sum(p.numel() for p in lora.group_parameters(model, "lora").values())
    n_attn = sum(p.numel() for p in lora.group_parameters(model, "attn_lora").values())
    assert n_lora + n_attn == 3 * per_layer
    trainable, total = lora.set_trainable(model, ["lora", "attn_lora"])
    assert trainable == 3 * per_layer
    assert total == sum(p.numel() for p in model.parameters())


def test_layer_range():
    model = wrapped(start_layer=1, num_layers=1)
    assert {n.split(".")[2] for n in lora.lora_layers(model)} == {"1"}


@pytest.mark.parametrize("rank", [0, 33, 10**6, 4.0, True])
def test_rank_outside_one_to_the_narrowest_width_is_refused_before_wrapping(rank):
    model = make_model()  # hidden 32, the narrowest of q_proj (32 -> 32) and up_proj (32 -> 48): 32
    with pytest.raises(UserError, match=r"^lora.rank=.* must be an integer from 1 to 32, the narrowest"):
        lora.inject_lora(model, rank, 8, targets=["up_proj"], attn_targets=["q_proj"])
    assert not lora.lora_layers(model)


def test_rank_equal_to_the_narrowest_width_is_accepted():
    model = make_model()
    lora.inject_lora(model, 32, 8, targets=["up_proj"])
    assert {m.rank for m in lora.lora_layers(model).values()} == {32}


def test_fp32_trained_parameters_casts_only_the_trained_ones():
    model = make_model().to(torch.bfloat16)
    lora.inject_lora(model, 4, 8, targets=["up_proj"])
    trained = lora.fp32_trained_parameters(model, ["lora", "norm"])
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"q_prj.*match no linear layer"):
        lora.inject_lora(make_model(), 4, 8, targets=[], attn_targets=["q_prj"])
    with pytest.raises(ValueError, match=r"`q_proj`.*list it under lora.attn_targets"):
        lora.inject_lora(make_model(), 4, 8, targets=["q_proj"])


def train_steps(model, groups, steps=2):
    lora.set_trainable(model, groups)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("groups", [["lora"], ["attn_lora"], ["norm"], ["embed"], ["head"], ["lora", "norm"]])
def test_only_chosen_groups_change(groups):
    model = wrapped()
    randomize_lora(model)  # so that A receives gradients too
    chosen = set()
    for g in groups:
        chosen |= set(lora.group_parameters(model, g))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, groups)
    for n, p in model.named_parameters():
        if n in chosen:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} should be bit-identical"


def test_groups_cover_what_they_say():
    model = wrapped()
    assert set(lora.group_parameters(model, "embed")) == {"model.embed_tokens.weight"}
    assert set(lora.group_parameters(model, "head")) == {"lm_head.weight"}
    norms = set(lora.group_parameters(model, "norm"))
    assert "model.norm.weight" in norms and "model.layers.0.self_attn.q_norm.weight" in norms
    assert all(n.endswith("norm.weight") for n in norms)
    assert set(lora.group_parameters(model, "all")) == {n for n, _ in model.named_parameters()}
    tied = make_model(tie_word_embeddings=True)  # a tied head is the embedding
    assert set(lora.group_parameters(tied, "head")) == {"model.embed_tokens.weight"}


def test_phases_switch_at_the_right_step():
    phases = [{"step": 0, "trainable": ["lora"]}, {"step": 3, "trainable": ["attn_lora", "norm"]}]
    assert [lora.phase_at(phases, s) for s in (0, 2, 3, 9)] == [["lora"], ["lora"], ["attn_lora", "norm"],
                                                                ["attn_lora", "norm"]]
    model = wrapped()
    randomize_lora(model)
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-2)  # every parameter a phase may train
    q_b = model.get_submodule("model.layers.0.self_attn.q_proj").lora_B
    up_b = model.get_submodule("model.layers.0.mlp.up_proj").lora_B
    history = []
    for it in range(6):
        lora.set_trainable(model, lora.phase_at(phases, it))
        q0, up0 = q_b.detach().clone(), up_b.detach().clone()
        model(IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append((not torch.equal(q_b, q0), not torch.equal(up_b, up0)))
    # steps 0-2 train the FFN LoRA only; from step 3 the attention LoRA trains and the FFN LoRA stays frozen
    assert history == [(False, True)] * 3 + [(True, False)] * 3


def test_merge_equals_unmerged_and_is_idempotent():
    model = wrapped()
    randomize_lora(model)
    with torch.no_grad():
        before = model(IDS)
        lora.merge_lora(model)
        merged = model(IDS)
        assert not lora.lora_layers(model)
        assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)
        assert (merged - before).abs().max() < 1e-5
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        lora.merge_lora(model)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert set(model.state_dict()) == set(make_model().state_dict())


def test_eval_does_not_merge():
    model = wrapped()
    model.eval()
    assert len(lora.lora_layers(model)) == 3 * 5


def test_adapter_files_are_peft_layout_and_round_trip(tmp_path):
    model = wrapped(rank=4, alpha=8.0)
    randomize_lora(model)
    lora.save_adapter(model, str(tmp_path), base_model_name="outputs/tiny-model")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "outputs/tiny-model"  # the base folder, loadable by PEFT
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["lora_dropout"] == 0.0
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 3 * 5
    fresh = make_model()
    names = chat.load_adapter(fresh, str(tmp_path))
    assert len(names) == 15
    assert {n: m.group for n, m in lora.lora_layers(fresh).items()} == \
           {n: m.group for n, m in lora.lora_layers(model).items()}
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_a_wrapped_layer_compiles_as_one_graph():
    model = wrapped()
    randomize_lora(model)
    layer, x = model.model.layers[0], torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fails on any graph break
    torch.testing.assert_close(compiled(x, cos, sin), layer(x, cos, sin))
