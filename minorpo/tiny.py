"""The embedded default: a tiny Qwen3-architecture model, its own tokenizer, and synthetic preference pairs.

`model_name: tiny` and `data.path: tiny` in a preset make minorpo run anywhere with no download. The model
is built once into <output_dir>/tiny-model/ as a real Hugging Face checkpoint folder (config.json,
model.safetensors, tokenizer.json) and then loaded through the same code path as a real checkpoint.

The task. Each prompt asks to repeat, reverse or sort a short list; the chosen answer does it right and the
rejected answer makes one mistake (two neighbouring items swapped). The two answers share every token, in
almost the same order, so SFT on the chosen answers also raises the rejected ones (ORPO paper, Figure 7),
while ORPO's odds-ratio term pushes them apart (its Figure 3). The held-out pairs use lists the model has
never seen, so preference accuracy there measures a learned rule. All is deterministic from `seed`.
"""
import json
import os
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minorpo.checkpoint import write_model
from minorpo.files import atomic_folder, atomic_write
from minorpo.model import ModelConfig, Qwen

WORDS = ("red blue green black white pink gray gold cat dog fox owl bee cow pig hen ant elk "
         "apple pear fig plum lime kiwi oak elm ash fir").split()
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TASKS = {  # name: (prompt verb, item pool, rule)
    "repeat": ("Repeat", WORDS, lambda items: items),
    "reverse": ("Reverse", WORDS, lambda items: items[::-1]),
    "sort": ("Sort", list("0123456789"), sorted),
}
# A Qwen3-architecture model (q/k-norm, grouped-query attention, tied embeddings), ~1M parameters.
TINY_MODEL = dict(model_type="qwen3", vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False)


def make_pairs(n, seed=0):
    """n {prompt, chosen, rejected} rows: the rule applied right, and with two neighbours swapped."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        verb, pool, rule = TASKS[rng.choice(sorted(TASKS))]
        items = rng.sample(pool, rng.randint(3, 6))  # distinct items, so every swap is a real mistake
        answer = list(rule(items))
        i = rng.randrange(len(answer) - 1)
        wrong = answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]
        rows.append({"prompt": f"{verb}: {' '.join(items)}",
                     "chosen": f"Sure: {' '.join(answer)}.", "rejected": f"Sure: {' '.join(wrong)}."})
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


def ensure_model(folder, build=True, seed=0):
    """Build the tiny model folder once (random weights, the tokenizer above) and return its path.
    Only the process with build=True writes (rank 0 under torchrun)."""
    if build and not os.path.isfile(os.path.join(folder, "config.json")):
        with atomic_folder(folder) as tmp:
            write_model(Qwen(ModelConfig(**TINY_MODEL), seed=seed), tmp)
            build_tokenizer(seed).save(os.path.join(tmp, "tokenizer.json"))
    return folder


def ensure_pairs(path, build=True, n=2000, seed=0):
    """Write n synthetic pairs as JSONL once (atomically, only where build=True) and return the path."""
    if build and not os.path.isfile(path):
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in make_pairs(n, seed)))
    return path
