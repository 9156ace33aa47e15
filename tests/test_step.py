"""One optimizer step (step.py) and the resumable state (state.py) on a tiny real model."""
import pytest
import torch

from minorpo import batches, lora, state, step
from minorpo.model import ModelConfig, Qwen

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, model_type="qwen3")


def pair(g, prompt_len, chosen_len, rejected_len):
    prompt = torch.randint(0, 64, (prompt_len,), generator=g).tolist()
    out = {}
    for side, n in (("chosen", chosen_len), ("rejected", rejected_len)):
        response = torch.randint(0, 64, (n,), generator=g).tolist()
        out[f"{side}_input_ids"] = prompt + response
        out[f"{side}_labels"] = [batches.IGNORE_INDEX] * prompt_len + response
    return out


def examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [pair(g, 3 + i % 3, 2 + i % 4, 5 - i % 3) for i in range(n)]


def make(groups=("all",), seed=0):
    model = Qwen(CFG, seed=seed)
    if "lora" in groups:
        lora.inject_lora(model, 4, 8.0, targets=["gate_proj", "up_proj", "down_proj"], attn_targets=["q_proj"])
    trained = lora.master_parameters(model, groups)
    lora.set_trainable(model, groups)
    return model, trained, torch.optim.AdamW(list(trained.values()), lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("objective", ["orpo", "sft"])
def test_accumulated_step_equals_one_big_batch(objective):
    exs = examples()
    if objective == "sft":
        exs = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in exs]
    whole = [batches.collate(exs, pad_id=0)]
    split = [batches.collate(exs[:1], 0), batches.collate(exs[1:4], 0), batches.collate(exs[4:], 0)]  # uneven
    results = []
    for micro in (whole, split):
        model, trained, _ = make()
        # SGD with lr 1: the update is the gradient itself (AdamW's g/sqrt(v) would amplify rounding noise)
        opt = torch.optim.SGD(list(trained.values()), lr=1.0)
        m = step.train_step(step.Policy(model, chunk_size=5), opt, micro, objective, orpo_lambda=0.5)
        results.append((m, dict(model.named_parameters())))
    (m1, p1), (m2, p2) = results
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-6), k
    for n in p1:
        assert torch.allclose(p1[n], p2[n], atol=1e-6), n


def test_guard_skips_non_finite_update_and_leaves_weights_untouched():
    model, trained, opt = make()
    policy = step.Policy(model)
    micro = [batches.collate(examples(), pad_id=0)]
    step.train_step(policy, opt, micro, "orpo", 0.5)  # a normal step first, so AdamW has state
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # inject a non-finite forward
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt_before = {k: v.clone() for k, v in opt.state[trained["lm_head.weight"]].items()}
    m = step.train_step(policy, opt, micro, "orpo", 0.5)
    assert m["skipped"] == 1.0 and not torch.isfinite(torch.tensor(m["grad_norm"]))
    for n, p in trained.items():
        assert torch.equal(p, before[n]) or n == "model.layers.0.mlp.up_proj.weight", n
    assert all(torch.equal(v, opt.state[trained["lm_head.weight"]][k]) for k, v in opt_before.items())
    assert all(p.grad is None for p in trained.values())


def test_evaluate_is_normalised_over_the_whole_set():
    model, _, _ = make()
    exs = examples()
    one = step.evaluate(step.Policy(model), [batches.collate(exs, 0)], "orpo", 0.5)
    two = step.evaluate(step.Policy(model), [batches.collate(exs[:2], 0), batches.collate(exs[2:], 0)], "orpo", 0.5)
    assert set(one) >= {"sft_loss", "orpo_loss", "total_loss", "pref_accuracy", "chosen_logps", "rejected_logps"}
    for k in one:
        assert one[k] == pytest.approx(two[k], rel=1e-5, abs=1e-6), k


SETTINGS = {"seed": 0, "batch_size": 6, "grad_accum_steps": 1, "world_size": 1, "train_examples": 6}


def test_state_round_trip_continues_identically(tmp_path):
    micro = [batches.collate(examples(), pad_id=0)]
    model, trained, opt = make(groups=("lora", "norm"))
    names = list(trained)
    policy = step.Policy(model)
    step.train_step(policy, opt, micro, "orpo", 0.5)
    state.save(str(tmp_path / "ckpt"), model, opt, names, {**SETTINGS, "step": 1, "epoch": 0, "position": 1})
    step.train_step(policy, opt, micro, "orpo", 0.5)
    expected = {n: p.detach().clone() for n, p in trained.items()}

    fresh, fresh_trained, fresh_opt = make(groups=("lora", "norm"), seed=0)
    meta = state.load(str(tmp_path / "ckpt"), fresh, fresh_opt, names, SETTINGS)
    assert meta["step"] == 1 and meta["position"] == 1
    step.train_step(step.Policy(fresh), fresh_opt, micro, "orpo", 0.5)
    for n, p in fresh_trained.items():
        assert torch.equal(p, expected[n]), n
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"], "no temporary folders left behind"


def test_state_errors_name_the_problem(tmp_path):
    model, trained, opt = make(groups=("lora",))
    names = list(trained)
    with pytest.raises(FileNotFoundError, match="not a resumable checkpoint"):
        state.load(str(tmp_path), model, opt, names, SETTINGS)
    state.save(str(tmp_path / "c"), model, opt, names, {**SETTINGS, "step": 0})
    with pytest.raises(ValueError, match="saved with other settings.*batch_size was 6, now 8"):
        state.load(str(tmp_path / "c"), model, opt, names, {**SETTINGS, "batch_size": 8})
    other, other_trained, other_opt = make(groups=("all",))
    with pytest.raises(ValueError, match="trains other parameters"):
        state.load(str(tmp_path / "c"), other, other_opt, list(other_trained), SETTINGS)
    (tmp_path / "c" / "weights.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"weights.safetensors: unreadable.*damaged"):
        state.load(str(tmp_path / "c"), model, opt, names, SETTINGS)
