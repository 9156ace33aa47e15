"""Examples and batches: one example (truncated, masked, checked), the held-out split, the batch
order, and collate into the tensors of a step.

An example is a dict of int lists; the processed JSONL format holds the same keys, one example a line:
    pair: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    sft:  {"input_ids", "labels"}
labels[t] = input_ids[t] on trained tokens and IGNORE_INDEX elsewhere (Hugging Face's convention: the
loss shifts by one). minorpo/data.py turns text into examples; this file turns examples into batches.

Decisions:
- Truncation keeps the prompt's end (the question and the assistant header) and the responses'
  beginnings, by the same rule for chosen and rejected, so their prompts stay identical and the pair
  still compares two answers to one question.
- A batch of P pairs is one tensor of 2P rows, the P chosen rows first and then the P rejected rows
  (one forward pass for both; the loss splits it in halves), right-padded with the pad id; padding is
  labelled IGNORE_INDEX. Under a causal mask real tokens never see right padding: no attention mask.
- Length-grouped batch order (data.group_by_length, on by default): shuffle, sort by length within
  windows of GROUP_WINDOW batches, cut into batches, shuffle the batches. Rows of a batch then have
  similar lengths, so less of the batch is padding. The batch with the longest row goes first, so an
  out-of-memory error shows at step 1, not hours in. The order is a function of (seed, epoch) alone,
  so a resumed run continues at (epoch, batch index) exactly.
"""
import itertools
import json
import random
import sys

import torch

IGNORE_INDEX = -100  # the label of a token that is not trained (prompt, padding): the loss skips it
PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
SFT_KEYS = ("input_ids", "labels")
GROUP_WINDOW = 50  # batches per length-sorted window: wide enough to match lengths, narrow enough to mix


def rows_of(example):
    """The (input_ids, labels) rows of an example: [chosen, rejected] for a pair, [row] for sft."""
    keys = SFT_KEYS if "input_ids" in example else PAIR_KEYS
    return [(example[keys[i]], example[keys[i + 1]]) for i in range(0, len(keys), 2)]


def first_trained(labels):
    """The index of the first trained label (len(labels) if none): where the prompt ends."""
    return next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def segments(example):
    """(prompt (ids, labels), [answer (ids, labels)]) of an example: the prompt is every position before
    the first trained token of any row (example_problem checks that the rows share it)."""
    rows = rows_of(example)
    start = min(first_trained(labels) for _, labels in rows)
    return (rows[0][0][:start], rows[0][1][:start]), [(ids[start:], labels[start:]) for ids, labels in rows]


def prompt_of(example):
    """The prompt ids of an example, which generation continues."""
    return segments(example)[0][0]


def example_problem(example, keys, vocab_size):
    """What is wrong with an example (None if nothing). keys: its (input_ids, labels) key pairs; each must
    be a non-empty list of ints of one length, ids in the vocabulary, labels IGNORE_INDEX or the id."""
    for ids_key, labels_key in zip(keys[0::2], keys[1::2]):
        for key in (ids_key, labels_key):
            if key not in example:
                return f'missing field "{key}"'
            value = example[key]
            if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
                return f'field "{key}" must be a non-empty list of integers, got {json.dumps(value)[:60]}'
        ids, labels = example[ids_key], example[labels_key]
        if len(ids) != len(labels):
            return f'"{ids_key}" has {len(ids)} ids but "{labels_key}" has {len(labels)} labels'
        t = next((t for t, i in enumerate(ids) if not 0 <= i < vocab_size), None)
        if t is not None:
            return (f'"{ids_key}"[{t}] = {ids[t]} is outside the vocabulary (0 to {vocab_size - 1}); '
                    "was it tokenized with another tokenizer?")
        t = next((t for t, (i, label) in enumerate(zip(ids, labels)) if label not in (i, IGNORE_INDEX)), None)
        if t is not None:
            return (f'"{labels_key}"[{t}] = {labels[t]} must be {IGNORE_INDEX} or the id at that position '
                    f"({ids[t]})")
    start = min(first_trained(example[key]) for key in keys[1::2])
    if any(example[key][:start] != example[keys[0]][:start] for key in keys[0::2]):
        return (f"chosen and rejected must start with the same prompt ids (the positions labelled "
                f"{IGNORE_INDEX} before the first trained token)")
    return None


def truncate(prompt, answers, max_length, max_prompt_length):
    """The rule, the same for chosen and rejected: if prompt + the longer answer exceeds
    max_length, cut the prompt from the left to max_prompt_length, then cut every answer from the right
    to the room left. Segments are (ids, labels); returns (prompt, answers, whether anything was cut)."""
    if len(prompt[0]) + max(len(ids) for ids, _ in answers) <= max_length:
        return prompt, answers, False
    start = max(0, len(prompt[0]) - max_prompt_length)
    prompt = (prompt[0][start:], prompt[1][start:])
    room = max(0, max_length - len(prompt[0]))
    return prompt, [(ids[:room], labels[:room]) for ids, labels in answers], True


def make_example(prompt, answers):
    """The example dict of a prompt segment and one answer segment (sft) or two (chosen, rejected): each
    row is prompt + answer; labels[0] is masked, as nothing predicts the first token."""
    rows = []
    for ids, labels in answers:
        labels = [IGNORE_INDEX] + (prompt[1] + labels)[1:]
        rows += [prompt[0] + ids, labels]
    return dict(zip(PAIR_KEYS if len(answers) == 2 else SFT_KEYS, rows))


def split_examples(examples, eval_fraction, seed):
    """(train, held_out) by a seeded permutation: round(n * eval_fraction) items are held out, at least
    one when eval_fraction > 0, and at least one is left to train on. Both keep the file order.
    train.py splits the rows before tokenizing (so filtering cannot shift the held-out set); with
    data.eval_path it reads the held-out rows from that file instead."""
    n = len(examples)
    n_eval = max(0, min(max(round(n * eval_fraction), int(eval_fraction > 0)), n - 1))
    held_out = set(random.Random(f"split-{seed}").sample(range(n), n_eval))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def example_length(example):
    """The length an example takes in a batch: its longest row."""
    return max(len(ids) for ids, _ in rows_of(example))


def batch_order(lengths, batch_size, seed, epoch, group_by_length=True, ranks=1):
    """The batches of one epoch as lists of example indices (the last may be short); lengths[i] is
    example_length of example i. The same (seed, epoch) gives the same batches. Under DDP a batch too
    small to give each of the `ranks` a pair is dropped: a rank with nothing could not join the all-reduce."""
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = rng.sample(range(len(lengths)), len(lengths))
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size) if len(order) - i >= ranks]
    batches, window = [], batch_size * GROUP_WINDOW
    for start in range(0, len(order), window):
        by_length = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    rng.shuffle(batches)
    if batches:  # the batch with the longest example first (each batch lists its longest example first)
        batches.insert(0, batches.pop(max(range(len(batches)), key=lambda b: lengths[batches[b][0]])))
    return [batch for batch in batches if len(batch) >= ranks]


def collate(examples, pad_id):
    """A batch as tensors {"input_ids", "labels"}, both (2P, T) long for P pairs, the P chosen rows then
    the P rejected rows; (P, T) for sft. Right-padded with pad_id to the longest row; labels IGNORE_INDEX there."""
    rows = [row for side in zip(*map(rows_of, examples)) for row in side]  # chosen rows, then rejected rows
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (rows, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (rows, T)
    for r, (ids, row_labels) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(ids)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "labels": labels}


def show_example(example, tokenizer, color=None):
    """One example as text with its trained tokens marked: green on a terminal, ⟦bracketed⟧ otherwise.
    A pair shows the prompt once, then the chosen and the rejected response."""
    color = sys.stdout.isatty() if color is None else color

    def marked(ids, labels):  # decode each run of trained or untrained tokens, mark the trained runs
        text, start = "", 0
        for trained, run in itertools.groupby(labels, key=lambda label: label != IGNORE_INDEX):
            end = start + len(list(run))
            piece = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            text += (f"\033[32m{piece}\033[0m" if color else f"⟦{piece}⟧") if trained else piece
            start = end
        return text
    prompt, answers = segments(example)
    if len(answers) == 1:
        return "[data] example (trained tokens marked):\n" + marked(*rows_of(example)[0])
    return "\n".join(["[data] example pair (trained tokens marked):",
                      "prompt:   " + tokenizer.decode(prompt[0], skip_special_tokens=False),
                      "chosen:   " + marked(*answers[0]), "rejected: " + marked(*answers[1])])
