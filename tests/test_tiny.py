"""tiny: the embedded pairs follow their rules, and the pre-trained base knows the task's words and format but
not its preference (near-chance accuracy with both answers already likely), built deterministically, once."""
import os
import re

import pytest
from conftest import tiny_base

from minorpo import batches, checkpoint, data, packing, step, tiny


def test_a_pair_differs_in_its_sign_off_alone_and_the_sign_off_follows_the_count():
    for row in tiny.make_pairs(200):
        verb, items = row["prompt"].split(": ")
        right = tiny.TASKS[verb](items.split())
        sign_off = " All done!" if len(right) % 2 == 0 else " Anything else?"
        assert row["chosen"] == f"Sure: {' '.join(right)}.{sign_off}"
        assert row["rejected"] == f"Sure: {' '.join(right)}.{({*tiny.SIGN_OFFS} - {sign_off}).pop()}"


def test_the_lengths_variant_names_an_item_in_the_odd_sign_off_so_either_answer_is_the_longer():
    chosen_longer = 0
    for row, plain in zip(tiny.make_pairs(400, variant="tiny-lengths"), tiny.make_pairs(400)):
        assert row["prompt"] == plain["prompt"]  # the same prompts and rule, only the odd sign-off differs
        items = row["prompt"].split(": ")[1].split()
        for key in ("chosen", "rejected"):
            if plain[key].endswith(tiny.SIGN_OFFS[1]):
                assert re.fullmatch(r".* Anything else about (\w+)\?", row[key])[1] in items
            else:
                assert row[key] == plain[key]
        chosen_longer += len(row["chosen"]) > len(row["rejected"])
    assert 150 < chosen_longer < 250


def test_pretraining_answers_take_either_order_and_either_sign_off():
    rows = tiny.pretraining_rows(400)
    held_out_prompts = {row["prompt"] for row in tiny.make_pairs(2000)}
    assert not held_out_prompts & {row["prompt"] for row in rows}  # its own prompts
    seen = {(row["response"][6:].split(".")[0] == row["prompt"].split(": ")[1], row["response"].split(".")[1])
            for row in rows}
    assert seen == {(as_given, sign_off) for as_given in (True, False) for sign_off in tiny.SIGN_OFFS}


def test_the_base_knows_the_format_but_not_the_preference():
    folder = tiny_base()
    model, tokenizer = checkpoint.load_model(folder), data.load_tokenizer(folder)
    rows = [(f"held:{i}", row) for i, row in enumerate(tiny.make_pairs(200, seed=12345))]
    examples, _ = data.make_examples(rows, tokenizer, "prompted_preference", max_length=128, max_prompt_length=64)
    collate = packing.collate_for("packed", 0, 128)
    metrics = step.evaluate(step.ResponseLogps(model), [collate(examples[i:i + 50]) for i in range(0, 200, 50)],
                            "orpo", 1.0)
    assert 0.3 <= metrics["pref_accuracy"] <= 0.7
    assert metrics["chosen_logps"] > -3 and metrics["rejected_logps"] > -3  # a random model: about -6


def test_the_base_is_built_deterministically_once(tmp_path):
    first = tiny.ensure_model(str(tmp_path / "a"), pretrain_steps=3)
    second = tiny.ensure_model(str(tmp_path / "b"), pretrain_steps=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    made = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    tiny.ensure_model(first, pretrain_steps=3)  # there already: reused, not rebuilt
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == made
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # written through a temporary folder, renamed into place
    assert second != first


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_every_variant_tokenizes_with_the_embedded_tokenizer(variant):
    rows = [(f"{variant}:{i}", row) for i, row in enumerate(tiny.make_pairs(50, variant=variant))]
    examples, _ = data.make_examples(rows, tiny.build_tokenizer(), "prompted_preference", max_length=128,
                                     max_prompt_length=64)
    assert len(examples) == 50 and all(batches.example_length(e) < 64 for e in examples)
