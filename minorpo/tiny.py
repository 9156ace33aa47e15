"""The embedded default: a tiny Qwen3-architecture model, its own tokenizer, and synthetic preference pairs.

`model_name: tiny` and `data.path: tiny` in a preset make minorpo run anywhere with no download. The
model is built once into <output_dir>/tiny-model/ as a real Hugging Face checkpoint folder (config.json,
model.safetensors, tokenizer.json) and then loaded through the same code path as a real checkpoint.

The task. Each prompt asks to repeat, reverse or sort a short list; the chosen answer does it right and
the rejected answer makes one mistake (two neighbouring items swapped). The two answers share every
token, in almost the same order, so SFT on the chosen answers also raises the rejected ones (the ORPO
paper's Figure 7), while ORPO's odds-ratio term pushes them apart (its Figure 3). The held-out pairs
use lists the model has never seen, so preference accuracy there measures a learned rule.
Everything is generated deterministically from the `seed` argument.
"""
import json
import os
import random

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from minorpo.files import atomic_write

WORDS = ("red blue green black white pink gray gold cat dog fox owl bee cow pig hen ant elk "
         "apple pear fig plum lime kiwi oak elm ash fir").split()
DIGITS = [str(d) for d in range(10)]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TASKS = {  # name: (prompt verb, item pool, rule)
    "repeat": ("Repeat", WORDS, lambda items: items),
    "reverse": ("Reverse", WORDS, lambda items: items[::-1]),
    "sort": ("Sort", DIGITS, sorted),
}


def make_pair(rng):
    """One {prompt, chosen, rejected} row: the rule applied right, and with two neighbours swapped."""
    verb, pool, rule = TASKS[rng.choice(sorted(TASKS))]
    items = rng.sample(pool, rng.randint(3, 6))  # distinct items, so every swap is a real mistake
    answer = list(rule(items))
    i = rng.randrange(len(answer) - 1)
    wrong = answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]
    return {"prompt": f"{verb}: {' '.join(items)}",
            "chosen": f"Sure: {' '.join(answer)}.", "rejected": f"Sure: {' '.join(wrong)}."}


def make_pairs(n, seed=0):
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def write_pairs(path, n=2000, seed=0):
    """Write n synthetic pairs as JSONL (atomically) and return the path."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in make_pairs(n, seed)))
    return path


def build_tokenizer(seed=0, vocab_size=384):
    """A byte-level BPE tokenizer (Qwen's kind) trained on the synthetic task's text and chat template."""
    texts = ["system user assistant"]
    for row in make_pairs(2000, seed):
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# A Qwen3-architecture model (q/k-norm, grouped-query attention, tied embeddings), ~1M parameters.
TINY_MODEL = dict(model_type="qwen3", vocab_size=384, hidden_size=128, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
                  tie_word_embeddings=True, attention_bias=False)


def ensure_model(folder, build=True, seed=0):
    """Build the tiny model folder once (random weights, the tokenizer above) and return its path.
    Only the process with build=True writes (rank 0 under torchrun)."""
    if build and not os.path.isfile(os.path.join(folder, "config.json")):
        from minorpo.checkpoint import write_model
        from minorpo.files import atomic_folder
        from minorpo.model import ModelConfig, Qwen
        with atomic_folder(folder) as tmp:
            write_model(Qwen(ModelConfig(**TINY_MODEL), seed=seed), tmp)
            build_tokenizer(seed).save(os.path.join(tmp, "tokenizer.json"))
    return folder


def ensure_pairs(path, build=True, n=2000, seed=0):
    """Write the synthetic pairs once and return the path (only where build=True)."""
    if build and not os.path.isfile(path):
        write_pairs(path, n, seed)
    return path
