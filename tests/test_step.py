"""One optimizer step (step.py) and the resumable state (state.py) on a tiny real model."""
import math

import pytest
import torch

from minorpo import batches, lora, state, step
from minorpo.files import UserError
from minorpo.model import ModelConfig, Qwen

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, model_type="qwen3")


def pair(generator, prompt_len, chosen_len, rejected_len):
    """One preference pair of random tokens, with its prompt masked in the labels."""
    prompt = torch.randint(0, 64, (prompt_len,), generator=generator).tolist()
    example = {}
    for side, length in (("chosen", chosen_len), ("rejected", rejected_len)):
        response = torch.randint(0, 64, (length,), generator=generator).tolist()
        example[f"{side}_input_ids"] = prompt + response
        example[f"{side}_labels"] = [batches.IGNORE_INDEX] * prompt_len + response
    return example


def examples(count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [pair(generator, 3 + i % 3, 2 + i % 4, 5 - i % 3) for i in range(count)]


def make(groups=("all",), seed=0):
    """A tiny model, its trained parameters {name: parameter} and an AdamW over them."""
    model = Qwen(CFG, seed=seed)
    if "lora" in groups:
        lora.inject_lora(model, 4, 8.0, targets=["gate_proj", "up_proj", "down_proj"], attn_targets=["q_proj"])
    trained = lora.fp32_trained_parameters(model, groups)
    lora.set_trainable(model, groups)
    return model, trained, torch.optim.AdamW(list(trained.values()), lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("objective", ["orpo", "sft"])
def test_accumulated_step_gives_the_metrics_and_weights_of_one_big_batch(objective):
    pairs = examples()
    if objective == "sft":
        pairs = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in pairs]
    whole = [batches.collate(pairs, pad_id=0)]
    split = [batches.collate(pairs[:1], 0), batches.collate(pairs[1:4], 0), batches.collate(pairs[4:], 0)]  # uneven
    results = []
    for micro_batches in (whole, split):
        model, trained, _ = make()
        # SGD with lr 1: the update is the gradient itself (AdamW's g/sqrt(v) would amplify rounding noise)
        optimizer = torch.optim.SGD(list(trained.values()), lr=1.0)
        metrics = step.train_step(step.ResponseLogps(model, chunk_size=5), optimizer, micro_batches, objective,
                                  orpo_lambda=0.5)
        results.append((metrics, dict(model.named_parameters())))
    (whole_metrics, whole_params), (split_metrics, split_params) = results
    for name in whole_metrics:
        assert whole_metrics[name] == pytest.approx(split_metrics[name], rel=1e-5, abs=1e-6), name
    for name in whole_params:
        assert torch.allclose(whole_params[name], split_params[name], atol=1e-6), name


def test_guard_skips_a_non_finite_update_leaving_weights_optimizer_state_and_no_gradients():
    model, trained, optimizer = make()
    scorer = step.ResponseLogps(model)
    micro_batches = [batches.collate(examples(), pad_id=0)]
    step.train_step(scorer, optimizer, micro_batches, "orpo", 0.5)  # a normal step first, so AdamW has state
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")  # inject a non-finite forward
    before = {name: param.detach().clone() for name, param in trained.items()}
    head_state = optimizer.state[trained["lm_head.weight"]]
    head_state_before = {key: value.clone() for key, value in head_state.items()}
    metrics = step.train_step(scorer, optimizer, micro_batches, "orpo", 0.5)
    assert metrics["skipped"] == 1.0
    assert not math.isfinite(metrics["grad_norm"])
    for name, param in trained.items():
        assert torch.equal(param, before[name]) or name == "model.layers.0.mlp.up_proj.weight", name
    for key, value in head_state_before.items():
        assert torch.equal(value, head_state[key]), key
    assert all(param.grad is None for param in trained.values())


def test_max_grad_norm_clips_the_update_and_reports_the_norm_before_clipping():
    norms = []
    for max_grad_norm in (0.0, 1e-3):  # 0: no clipping
        model, trained, _ = make()
        before = {name: param.detach().clone() for name, param in trained.items()}
        optimizer = torch.optim.SGD(list(trained.values()), lr=1.0)  # the update is the gradient
        metrics = step.train_step(step.ResponseLogps(model), optimizer, [batches.collate(examples(), 0)], "orpo", 0.5,
                                  max_grad_norm=max_grad_norm)
        update = torch.cat([(before[name] - param.detach()).flatten() for name, param in trained.items()])
        norms.append((metrics["grad_norm"], update.norm().item()))
    (unclipped_norm, unclipped_update), (clipped_norm, clipped_update) = norms
    assert clipped_norm == pytest.approx(unclipped_norm, rel=1e-5)
    assert unclipped_update == pytest.approx(unclipped_norm, rel=1e-4)
    assert clipped_update == pytest.approx(1e-3, rel=1e-3)


def test_evaluate_gives_the_same_metrics_for_the_set_in_one_batch_or_two():
    model, _, _ = make()
    pairs = examples()
    scorer = step.ResponseLogps(model)
    one = step.evaluate(scorer, [batches.collate(pairs, 0)], "orpo", 0.5)
    two = step.evaluate(scorer, [batches.collate(pairs[:2], 0), batches.collate(pairs[2:], 0)], "orpo", 0.5)
    assert set(one) >= {"sft_loss", "orpo_loss", "total_loss", "pref_accuracy", "chosen_logps", "rejected_logps"}
    for name in one:
        assert one[name] == pytest.approx(two[name], rel=1e-5, abs=1e-6), name


SETTINGS = {"seed": 0, "batch_size": 6, "grad_accum_steps": 1, "world_size": 1, "train_examples": 6}


def test_state_round_trip_continues_identically(tmp_path):
    micro_batches = [batches.collate(examples(), pad_id=0)]
    model, trained, optimizer = make(groups=("lora", "norm"))
    names = list(trained)
    scorer = step.ResponseLogps(model)
    step.train_step(scorer, optimizer, micro_batches, "orpo", 0.5)
    state.save(str(tmp_path / "ckpt"), model, optimizer, names, {**SETTINGS, "step": 1, "epoch": 0, "position": 1, "skipped": 0})
    step.train_step(scorer, optimizer, micro_batches, "orpo", 0.5)
    expected = {name: param.detach().clone() for name, param in trained.items()}

    fresh, fresh_trained, fresh_optimizer = make(groups=("lora", "norm"), seed=0)
    meta = state.load(str(tmp_path / "ckpt"), fresh, fresh_optimizer, names, SETTINGS)
    assert meta["step"] == 1
    assert meta["position"] == 1
    step.train_step(step.ResponseLogps(fresh), fresh_optimizer, micro_batches, "orpo", 0.5)
    for name, param in fresh_trained.items():
        assert torch.equal(param, expected[name]), name
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"], "no temporary folders left behind"


def test_state_errors_name_the_problem(tmp_path):
    model, trained, optimizer = make(groups=("lora",))
    names = list(trained)
    with pytest.raises(UserError, match="not a resumable checkpoint"):
        state.load(str(tmp_path), model, optimizer, names, SETTINGS)
    state.save(str(tmp_path / "c"), model, optimizer, names, {**SETTINGS, "step": 0, "epoch": 0, "position": 0, "skipped": 0})
    with pytest.raises(ValueError, match="saved with other settings.*batch_size was 6, now 8"):
        state.load(str(tmp_path / "c"), model, optimizer, names, {**SETTINGS, "batch_size": 8})
    other, other_trained, other_optimizer = make(groups=("all",))
    with pytest.raises(ValueError, match="trains other parameters"):
        state.load(str(tmp_path / "c"), other, other_optimizer, list(other_trained), SETTINGS)
    (tmp_path / "c" / "weights.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"weights.safetensors: not a readable safetensors file.*resume from another checkpoint"):
        state.load(str(tmp_path / "c"), model, optimizer, names, SETTINGS)


def test_evaluate_splits_the_preference_accuracy_by_which_answer_is_longer():
    model, _, _ = make()
    pairs = examples(12)
    scorer = step.ResponseLogps(model)
    metrics = step.evaluate(scorer, [batches.collate(pairs[:5], 0), batches.collate(pairs[5:], 0)], "orpo", 0.5)
    right = {"longer": [], "shorter": []}  # one pair at a time: its log odds ratio is the metric itself
    for pair in pairs:
        (_, chosen), (_, rejected) = batches.rows_of(pair)
        n_chosen, n_rejected = (sum(label != batches.IGNORE_INDEX for label in labels[1:])
                                for labels in (chosen, rejected))
        if n_chosen != n_rejected:
            one = step.evaluate(scorer, [batches.collate([pair], 0)], "orpo", 0.5)
            right["longer" if n_chosen > n_rejected else "shorter"].append(one["log_odds_ratio"] > 0)
    assert right["longer"] and right["shorter"]  # both kinds of pair are there
    for kind, values in right.items():
        assert metrics[f"pref_accuracy_{kind}"] == pytest.approx(sum(values) / len(values))


def test_evaluate_gives_no_length_split_when_every_pair_has_equal_lengths():
    model, _, _ = make()
    pairs = [p for p in examples(12) if len(p["chosen_labels"]) == len(p["rejected_labels"])]
    assert pairs
    assert not {"pref_accuracy_longer", "pref_accuracy_shorter"} & set(
        step.evaluate(step.ResponseLogps(model), [batches.collate(pairs, 0)], "orpo", 0.5))
