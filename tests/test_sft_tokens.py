"""loss.sft_tokens: prompt_and_response: L_SFT over every token of the chosen row but the first (TRL's nll_loss), exact
by hand, packed and padded, accumulated or not, over several processes; L_OR still on the responses alone."""
import pytest
import torch
import torch.nn.functional as F
from test_ddp import assert_close, run, train_rows, weights
from test_step import CFG, examples

from minorpo import batches, packing, step
from minorpo.batches import IGNORE_INDEX
from minorpo.model import Qwen


def one_step(micro_batches, objective="orpo", lr=0.0, seed=0):
    """train_step's metrics and the weights after an SGD step of lr (0: the metrics of the initial weights)."""
    model = Qwen(CFG, seed=seed)
    optimizer = torch.optim.SGD(list(model.parameters()), lr=lr)
    metrics = step.train_step(step.ResponseLogps(model, chunk_size=5), optimizer, micro_batches, objective, 0.5)
    return metrics, dict(model.named_parameters())


def by_hand(pairs, objective="orpo", seed=0):
    """The NLL over every token but the first of each chosen (sft: every) row, and the mean L_OR of the responses,
    from the model's full logits, one row at a time with no padding."""
    model = Qwen(CFG, seed=seed)
    nll, count, or_losses = 0.0, 0, []
    with torch.no_grad():
        for pair in pairs:
            logps = {}
            for side in ("chosen", "rejected") if objective == "orpo" else ("",):
                key = f"{side}_" if side else ""
                ids, labels = pair[f"{key}input_ids"], pair[f"{key}labels"]
                logits = model.lm_head(model.hidden_states(torch.tensor([ids])))[0]  # (T, V)
                token = F.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
                if side in ("chosen", ""):
                    nll, count = nll - token.sum().item(), count + len(ids) - 1  # the prompt's tokens too
                response = torch.tensor(labels[1:]) != IGNORE_INDEX
                logps[side] = token[response].mean()  # Eq. 3 on the response alone
            if objective == "orpo":
                log_odds = [lp - torch.log1p(-torch.exp(lp)) for lp in (logps["chosen"], logps["rejected"])]
                or_losses.append(-F.logsigmoid(log_odds[0] - log_odds[1]).item())
    return nll / count, sum(or_losses) / max(1, len(or_losses))


def sft_rows(pairs):
    return [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in pairs]


def test_collate_marks_the_untrained_tokens_of_the_rows_the_nll_trains():
    pairs = examples(3)
    batch = batches.collate(pairs, pad_id=0, prompt_loss=True)
    assert "prompt_labels" not in batches.collate(pairs, pad_id=0)
    for r, pair in enumerate(pairs):
        ids, labels, prompt = pair["chosen_input_ids"], batch["labels"][r], batch["prompt_labels"][r]
        start = batches.first_trained(pair["chosen_labels"])
        assert prompt.tolist() == [IGNORE_INDEX] + ids[1:start] + [IGNORE_INDEX] * (len(prompt) - start)
        covered = (labels != IGNORE_INDEX) | (prompt != IGNORE_INDEX)
        assert covered.tolist() == [False] + [True] * (len(ids) - 1) + [False] * (len(prompt) - len(ids))
    assert (batch["prompt_labels"][3:] == IGNORE_INDEX).all()  # the rejected rows: responses only, as always


@pytest.mark.parametrize("objective", ["orpo", "sft"])
def test_prompt_and_response_nll_equals_the_by_hand_token_mean_and_leaves_l_or_alone(objective):
    pairs = examples()
    rows = pairs if objective == "orpo" else sft_rows(pairs)
    metrics, _ = one_step([batches.collate(rows, 0, prompt_loss=True)], objective)
    nll, or_loss = by_hand(rows, objective)
    assert metrics["sft_loss"] == pytest.approx(nll, rel=1e-5)
    response_only, _ = one_step([batches.collate(rows, 0)], objective)
    assert abs(response_only["sft_loss"] - nll) > 1e-3  # the prompt tokens really count
    if objective == "orpo":
        assert metrics["orpo_loss"] == pytest.approx(or_loss, rel=1e-5)
        for name in ("orpo_loss", "log_odds_ratio", "pref_accuracy", "chosen_logps", "rejected_logps"):
            assert metrics[name] == pytest.approx(response_only[name], rel=1e-6, abs=1e-7), name
        assert metrics["total_loss"] == pytest.approx(nll + 0.5 * or_loss, rel=1e-5)


@pytest.mark.parametrize("objective", ["orpo", "sft"])
def test_packed_and_accumulated_give_one_padded_batch(objective):
    rows = examples(8, seed=3) if objective == "orpo" else sft_rows(examples(8, seed=3))
    whole = [batches.collate(rows, 0, prompt_loss=True)]
    padded_split = [batches.collate(rows[:1], 0, True), batches.collate(rows[1:5], 0, True),
                    batches.collate(rows[5:], 0, True)]  # uneven micro-batches
    packed = [packing.pack(rows, 0, 24, prompt_loss=True)]
    packed_split = [packing.pack(rows[:3], 0, 24, prompt_loss=True), packing.pack(rows[3:], 0, 40, prompt_loss=True)]
    reference, reference_weights = one_step(whole, objective, lr=1.0)
    assert step.batch_counts(whole, objective)[0] == sum(len(r["input_ids" if objective == "sft" else
                                                               "chosen_input_ids"]) - 1 for r in rows)
    for micro_batches in (padded_split, packed, packed_split):
        assert torch.equal(step.batch_counts(micro_batches, objective), step.batch_counts(whole, objective))
        metrics, weights_after = one_step(micro_batches, objective, lr=1.0)
        for name in reference:
            assert metrics[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), name
        for name, value in reference_weights.items():
            assert torch.allclose(value, weights_after[name], atol=1e-5), name


def test_two_processes_and_fsdp_equal_one_with_the_prompt_in_the_nll(tmp_path):
    common = ["loss.sft_tokens=prompt_and_response", "training.phases=[{step: 0, trainable: [all]}]"]
    run(tmp_path, 1, *common, "training.batch_size=8", "run_name=single")
    run(tmp_path, 2, *common, "training.batch_size=4", "run_name=ddp")
    run(tmp_path, 2, *common, "training.batch_size=4", "training.fsdp=true", "run_name=fsdp")
    run(tmp_path, 1, "training.batch_size=8", "run_name=response")
    single = train_rows(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        for a, b in zip(single, train_rows(tmp_path / name)):
            for key in ("train/sft_loss", "train/orpo_loss", "train/total_loss"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (name, key)
        assert_close(weights(tmp_path / "single"), weights(tmp_path / name))
    response = train_rows(tmp_path / "response")
    assert response[0]["train/orpo_loss"] == pytest.approx(single[0]["train/orpo_loss"], abs=1e-6)  # same weights
    assert response[0]["train/sft_loss"] != pytest.approx(single[0]["train/sft_loss"], abs=1e-3)  # other tokens
    evals = [[r for r in train_rows(tmp_path / run_name, every=True) if "eval/sft_loss" in r][0]
             for run_name in ("single", "response")]
    assert evals[0]["eval/sft_loss"] == evals[1]["eval/sft_loss"]  # step 0: held-out NLL is the responses' in both
