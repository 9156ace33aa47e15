"""The embedded default: a tiny pre-trained Qwen3-architecture base, its own tokenizer, synthetic preference pairs.

`model_name: tiny` and `data.path: tiny` in a preset make minorpo run anywhere with no download. The base is
built once into <output_dir>/tiny-base/ as a real Hugging Face checkpoint folder (config.json,
model.safetensors, tokenizer.json) and then loaded through the same code path as a real checkpoint.

The task. Each prompt asks to repeat or reverse a short list of words. The preferred answer lists them in the
right order and signs off in the house style: "All done!" after an even number of items, "Anything else?"
after an odd number. The rejected answer is the same answer with the other sign-off (3 of about 11 response tokens).

The base. Like a real base model, which knows language but not your preferences, the tiny base is pre-trained
(PRETRAIN_STEPS of full fine-tuning, with the same train_step every run uses) on prompts like the pairs' answered
in either order with either sign-off, at random. So it knows the chat format, the words and how to list them,
but neither rule: its preference accuracy on the held-out pairs is near chance, while both answers are already
likely (a mean log-prob near -0.4 a token, where a random model has -6).

What a run then shows (README). SFT on the chosen answers sharpens the order and the listing, which the
rejected answers share, so their log-probability rises too (ORPO paper, Figure 7); the sign-off needs the items
counted, and imitation learns it slowly. ORPO's odds-ratio term acts on exactly what differs, so the rejected
answers fall (its Figure 3).

data.path: tiny-lengths is the variant for sum against mean: its odd-count sign-off names one of the items
("Anything else about fox?"), so in half the pairs the chosen answer is the longer one, in half the shorter.
All is deterministic from `seed`.
"""
import json
import os
import random

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minorpo import data, lora, packing, schedule, step
from minorpo.checkpoint import write_model
from minorpo.files import atomic_folder, atomic_write
from minorpo.model import ModelConfig, Qwen

WORDS = ("red blue green black white pink gray gold cat dog fox owl bee cow pig hen ant elk "
         "apple pear fig plum lime kiwi oak elm ash fir").split()
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TASKS = {"Repeat": lambda items: items, "Reverse": lambda items: items[::-1]}  # prompt verb: its rule
VARIANTS = {"tiny": "sign-offs.jsonl", "tiny-lengths": "lengths.jsonl"}  # data.path: the file in <output_dir>/tiny-data
# A Qwen3-architecture model (q/k-norm, grouped-query attention, tied embeddings), ~1M parameters.
TINY_MODEL = dict(model_type="qwen3", vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False)
PRETRAIN_STEPS, PRETRAIN_LR, PRETRAIN_BATCH = 400, 1e-3, 16  # about 25 s on one CPU core
SIGN_OFFS = (" All done!", " Anything else?")


def sign_off(items):
    """The house style the preferred answers follow: "All done!" after an even number of items, "Anything else?"
    after an odd one (the base does not know it: it signs off either way)."""
    return SIGN_OFFS[len(items) % 2]


def answer(items, end):
    return f"Sure: {' '.join(items)}.{end}"


def make_pairs(n, seed=0, variant="tiny"):
    """n {prompt, chosen, rejected} rows: the right order and sign-off, and the same with the other sign-off;
    in tiny-lengths the odd-count sign-off names one of the items, so either answer may be the longer."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        verb = rng.choice(sorted(TASKS))
        items = rng.sample(WORDS, rng.randint(3, 6))  # 3 to 6 distinct words
        right, end = TASKS[verb](items), sign_off(items)
        i = rng.randrange(len(right))  # drawn in both variants: the same prompts
        other = SIGN_OFFS[end == SIGN_OFFS[0]]
        if variant == "tiny-lengths":  # the question names one of the items: longer, and its item is a guess
            end, other = (f" Anything else about {right[i]}?" if s == SIGN_OFFS[1] else s for s in (end, other))
        rows.append({"prompt": f"{verb}: {' '.join(items)}", "chosen": answer(right, end),
                     "rejected": answer(right, other)})
    return rows


def pretraining_rows(n, seed=0):
    """What the base learns from: prompts like the pairs', the items in either order, either sign-off, at random."""
    pairs = {row["prompt"] for row in make_pairs(2000, seed)}  # the embedded pairs, held-out ones included
    prompts = [row["prompt"] for row in make_pairs(n + len(pairs), f"pretrain-{seed}") if row["prompt"] not in pairs]
    rng, rows = random.Random(f"pretrain-{seed}"), []
    for prompt in prompts[:n]:  # prompts of its own
        items = prompt.split(": ", 1)[1].split()
        order = TASKS[rng.choice(sorted(TASKS))]  # either rule, whatever the prompt's verb
        rows.append({"prompt": prompt, "response": answer(order(items), rng.choice(SIGN_OFFS))})
    return rows


def build_tokenizer(seed=0):
    """A byte-level BPE tokenizer (Qwen's kind) trained on the synthetic task's text and chat template."""
    texts = ["system user assistant"] + [text for row in make_pairs(2000, seed) for text in row.values()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=TINY_MODEL["vocab_size"], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]))
    return tokenizer


def pretrain(model, tokenizer, seed=0, steps=PRETRAIN_STEPS):
    """Full fine-tuning on pretraining_rows with step.train_step (SFT): a linear warm-up, then cosine decay."""
    rows = [(f"pretraining:{i + 1}", row) for i, row in enumerate(pretraining_rows(2000, seed))]
    examples, _ = data.make_examples(rows, tokenizer, "sft", max_length=128, max_prompt_length=64)
    trained = lora.fp32_trained_parameters(model, ["all"])
    optimizer = step.adamw(trained, PRETRAIN_LR, 0.0, fused=False)
    collate, rng = packing.collate_for("packed", tokenizer.token_to_id("<|endoftext|>"), 128), random.Random(seed)
    torch.manual_seed(seed)
    for it in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(it, "cosine", PRETRAIN_LR, 20, steps, min_lr_ratio=0.1)
        step.train_step(step.ResponseLogps(model), optimizer, [collate(rng.sample(examples, PRETRAIN_BATCH))], "sft")
    return model


def ensure_model(folder, build=True, seed=0, pretrain_steps=PRETRAIN_STEPS):
    """Build the tiny base folder once (random weights, pre-trained as above; the tokenizer above) and return
    its path. Only the process with build=True writes (rank 0 under torchrun); pretrain_steps=0 keeps the
    random weights (tests that need any model folder)."""
    if build and not os.path.isfile(os.path.join(folder, "config.json")):
        tokenizer = build_tokenizer(seed)
        model = pretrain(Qwen(ModelConfig(**TINY_MODEL), seed=seed), tokenizer, seed, pretrain_steps)
        with atomic_folder(folder) as tmp:
            write_model(model, tmp)
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    return folder


def ensure_pairs(path, build=True, n=2000, seed=0, variant="tiny"):
    """Write n synthetic pairs as JSONL once (atomically, only where build=True) and return the path."""
    if build and not os.path.isfile(path):
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in make_pairs(n, seed, variant)))
    return path
