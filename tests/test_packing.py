"""Shared-prompt packing (minorpo/packing.py): the packed layout gives the padded layout's loss, metrics and
gradients, on the tiny model and on a random Qwen3-like model (GQA, q/k-norm), for pairs whose prompt or
responses were cut, and for sft examples."""
import pytest
import torch

from minorpo import batches, data, lora, packing, step, tiny
from minorpo.batches import IGNORE_INDEX
from minorpo.model import ModelConfig, Qwen
from minorpo.qwen35 import Qwen35

QWEN3_LIKE = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         model_type="qwen3")
QWEN2_LIKE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, model_type="qwen2")
TINY = ModelConfig(**tiny.TINY_MODEL)


def random_examples(vocab_size, sft=False, seed=0):
    """Pairs of random ids (sft: the chosen rows alone) of varied lengths, cut by batches.truncate to
    max_length 16 as the preprocessor cuts them: some lose the prompt's start, some a response's end."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(3, 4, 6), (5, 2, 2), (1, 7, 3), (12, 9, 2), (4, 14, 15), (2, 1, 1), (20, 3, 5), (6, 5, 9)]
    examples, cut = [], 0
    for p, c, r in lengths:
        prompt = (ids(p), [IGNORE_INDEX] * p)
        answers = [(a, list(a)) for a in (ids(c), ids(r))][:1 if sft else 2]
        prompt, answers, was_cut = batches.truncate(prompt, answers, max_length=16, max_prompt_length=8)
        examples.append(batches.make_example(prompt, answers))
        cut += was_cut
    assert cut >= 3  # the cases the brief asks for are really there
    return examples


def with_lora(cfg, seed=0):
    """A model with LoRA on every projection, B drawn at random too (zero B would leave A without gradient)."""
    model = Qwen(cfg, seed=seed)
    lora.inject_lora(model, 4, 8.0, targets=["gate_proj", "up_proj", "down_proj"],
                     attn_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.set_trainable(model, ["lora", "attn_lora"])
    return model


def loss_and_grads(model, batch, objective):
    """The step's loss metrics and the LoRA gradients of one forward and backward (train_step's own loss)."""
    model.zero_grad(set_to_none=True)
    scorer = step.ResponseLogps(model, chunk_size=7)
    counts = step.batch_counts([batch], objective).tolist()
    token_logps, mask = scorer(**batch)
    total, metrics = (step.loss.orpo_objective(token_logps, mask, 0.5, "mean", *counts) if objective == "orpo"
                      else step.loss.sft_objective(token_logps, mask, counts[0]))
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return {name: float(value) for name, value in metrics.items()}, grads, token_logps.detach(), mask


@pytest.mark.parametrize("objective", ["orpo", "sft"])
@pytest.mark.parametrize("cfg", [TINY, QWEN3_LIKE, QWEN2_LIKE], ids=["tiny", "qwen3-like", "qwen2-like"])
def test_packed_gives_the_padded_loss_metrics_and_lora_gradients(cfg, objective):
    examples = random_examples(cfg.vocab_size, sft=objective == "sft")
    model = with_lora(cfg)
    padded = loss_and_grads(model, batches.collate(examples, pad_id=0), objective)
    for budget in (16, 40):  # one pair a row (or less) and several pairs a row
        packed_batch = packing.pack(examples, pad_id=0, budget=budget)
        assert packed_batch["input_ids"].numel() < batches.collate(examples, 0)["input_ids"].numel()
        packed = loss_and_grads(model, packed_batch, objective)
        assert torch.equal(padded[3], packed[3])  # the same label mask, in the same layout
        assert torch.allclose(padded[2], packed[2], atol=1e-5)  # every token's log-prob
        for name in padded[0]:
            assert packed[0][name] == pytest.approx(padded[0][name], abs=1e-5), name
        assert len(padded[1]) == 2 * 7 * cfg.num_hidden_layers  # A and B of all seven projections
        for name, grad in padded[1].items():
            assert grad.abs().max() > 0, name  # every LoRA matrix is really compared
            assert torch.allclose(grad, packed[1][name], atol=1e-5), name


def test_packed_parity_holds_on_the_embedded_default_data_with_gradient_checkpointing():
    tokenizer = tiny.build_tokenizer()
    rows = [(f"pairs:{i}", row) for i, row in enumerate(tiny.make_pairs(12))]
    examples, _ = data.make_examples(rows, tokenizer, "prompted_preference", max_length=128, max_prompt_length=64)
    model = with_lora(TINY)
    model.gradient_checkpointing = True  # the packed mask must reach the recomputed layers too
    padded = loss_and_grads(model, batches.collate(examples, pad_id=0), "orpo")
    packed = loss_and_grads(model, packing.pack(examples, pad_id=0, budget=256), "orpo")
    assert packed[0]["total_loss"] == pytest.approx(padded[0]["total_loss"], abs=1e-5)
    for name, grad in padded[1].items():
        assert torch.allclose(grad, packed[1][name], atol=1e-5), name


def test_pack_lays_out_documents_positions_branches_and_the_index_map():
    pair = {"chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [IGNORE_INDEX] * 3 + [8, 9],
            "rejected_input_ids": [5, 6, 7, 1, 2, 3], "rejected_labels": [IGNORE_INDEX] * 3 + [1, 2, 3]}
    short = {"chosen_input_ids": [4, 4], "chosen_labels": [IGNORE_INDEX, 4],
           "rejected_input_ids": [4, 3], "rejected_labels": [IGNORE_INDEX, 3]}
    batch = packing.pack([pair, short], pad_id=0, budget=20)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 4, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1]]
    assert batch["branch"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 0, 1, 2]]
    assert batch["doc"].tolist() == [[0] * 8 + [1] * 3]
    assert torch.equal(batch["labels"], batches.collate([pair, short], 0)["labels"])
    # padded row 2 (pair's rejected row): prompt 0..2, then the rejected tokens at 5..7; its first label
    # (id 1, at t = 3) is predicted from index[2, 2] = 2, the last prompt token, not the last chosen one
    assert batch["index"][2].tolist() == [0, 1, 2, 5, 6, 7]
    assert batch["index"][3].tolist()[:2] == [8, 10]
    mask = packing.attention_mask(batch["doc"], batch["branch"])[0, 0]  # (L, L)
    assert mask[5].tolist() == [True] * 3 + [False, False, True] + [False] * 5  # r0: prompt and itself
    assert mask[4].tolist() == [True] * 5 + [False] * 6  # c1: prompt, c0, itself
    assert not mask[8:, :8].any() and not mask[:8, 8:].any()  # no document sees another
    assert mask[10].tolist() == [False] * 8 + [True, False, True]  # the short pair's rejected token


def test_padding_sees_only_padding_and_a_too_long_document_gets_its_own_row():
    examples = random_examples(50)
    batch = packing.pack(examples, pad_id=0, budget=10)  # smaller than most documents
    lengths = [len(packing.document(e)[0]) for e in examples]
    assert batch["input_ids"].shape[1] == max(lengths)
    assert int((batch["doc"] >= 0).sum()) == sum(lengths)  # every token once, the prompt once per pair
    mask = packing.attention_mask(batch["doc"], batch["branch"])[:, 0]  # (R, L, L)
    assert mask.any(dim=-1).all()  # no empty softmax row (that would be NaN)
    pad = batch["doc"] == -1  # (R, L)
    assert not (mask & pad[:, None, :] & ~pad[:, :, None]).any()  # no real token sees padding


def test_accumulating_packed_micro_batches_gives_one_padded_batch():
    examples = random_examples(QWEN3_LIKE.vocab_size, seed=3)
    results = []
    for micro_batches in ([batches.collate(examples, 0)],
                          [packing.pack(examples[:3], 0, 24), packing.pack(examples[3:], 0, 24)]):
        model = Qwen(QWEN3_LIKE, seed=0)
        trained = lora.fp32_trained_parameters(model, ["all"])
        lora.set_trainable(model, ["all"])
        optimizer = torch.optim.SGD(list(trained.values()), lr=1.0)
        counts = step.batch_counts(micro_batches, "orpo")
        metrics = step.train_step(step.ResponseLogps(model, chunk_size=5), optimizer, micro_batches, "orpo", 0.5)
        results.append((counts, metrics, dict(model.named_parameters())))
    (counts, whole, params), (packed_counts, split, packed_params) = results
    assert torch.equal(counts, packed_counts)  # chosen tokens and pairs, whatever the layout
    for name in whole:
        assert split[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
    for name in params:
        assert torch.allclose(params[name], packed_params[name], atol=1e-5), name


def test_only_the_dense_models_take_the_packed_layout():
    assert Qwen.packs and not Qwen35.packs
