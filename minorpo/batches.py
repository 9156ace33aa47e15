"""Examples into batches (minorpo/data.py makes the examples from text): checks, truncation, split, order, collate.

An example is a dict of int lists; the processed JSONL format holds the same keys, one example a line:
    pair: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    sft:  {"input_ids", "labels"}
labels[t] = input_ids[t] where trained, IGNORE_INDEX elsewhere (Hugging Face's convention: the loss shifts by one).

Decisions:
- Truncation keeps the prompt's end (the question and the assistant header) and the responses' beginnings,
  by one rule for chosen and rejected: their prompts stay identical, so the pair still compares two answers.
- A batch of P pairs is one tensor of 2P rows, the P chosen rows then the P rejected rows (one forward pass
  for both; the loss splits it in halves), right-padded with the pad id and IGNORE_INDEX labels. Under a
  causal mask real tokens never see right padding: no attention mask.
- Length-grouped batch order (data.group_by_length, on by default): shuffle, sort by length within windows
  of GROUP_WINDOW batches, cut into batches, shuffle the batches, so a batch holds similar lengths and little
  padding. The longest batch goes first, so an out-of-memory error shows at step 1, not hours in. The order
  is a function of (seed, epoch) alone: a resumed run continues at (epoch, batch index) exactly.
"""
import itertools
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
    the first trained token of any row (formats.example_problem checks that the rows share it)."""
    rows = rows_of(example)
    start = min(first_trained(labels) for _, labels in rows)
    return (rows[0][0][:start], rows[0][1][:start]), [(ids[start:], labels[start:]) for ids, labels in rows]


def prompt_of(example):
    """The prompt ids of an example, which generation continues."""
    return segments(example)[0][0]


def truncate(prompt, answers, max_length, max_prompt_length):
    """If prompt + the longer answer exceed max_length, cut the prompt from the left to max_prompt_length, then
    every answer from the right to the room left. (ids, labels) segments in, (prompt, answers, was_cut) out."""
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
        rows += [prompt[0] + ids, [IGNORE_INDEX] + (prompt[1] + labels)[1:]]
    return dict(zip(PAIR_KEYS if len(answers) == 2 else SFT_KEYS, rows))


def split_examples(examples, eval_fraction, seed):
    """(train, held_out) by a seeded permutation: round(n * eval_fraction) held out, at least one when
    eval_fraction > 0 and at least one left to train on; both keep the file order. train.py splits the
    rows before tokenizing, so filtering cannot shift the held-out set."""
    n = len(examples)
    n_eval = max(0, min(max(round(n * eval_fraction), int(eval_fraction > 0)), n - 1))
    held_out = set(random.Random(f"split-{seed}").sample(range(n), n_eval))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def example_length(example):
    """The length an example takes in a batch: its longest row."""
    return max(len(ids) for ids, _ in rows_of(example))


def batch_order(lengths, batch_size, seed, epoch, group_by_length=True, ranks=1):
    """The epoch's batches as lists of example indices (the last may be short), lengths[i] example i's length.
    A batch too small to give each of the `ranks` a pair is dropped: a rank with none could not join the all-reduce."""
    rng = random.Random(f"batches-{seed}-{epoch}")
    order = rng.sample(range(len(lengths)), len(lengths))
    if group_by_length:  # sort each window of GROUP_WINDOW batches, longest first
        window = batch_size * GROUP_WINDOW
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda j: lengths[j], reverse=True)]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and batches:  # shuffled, then the batch with the longest example (its first) goes first
        rng.shuffle(batches)
        batches.insert(0, batches.pop(max(range(len(batches)), key=lambda b: lengths[batches[b][0]])))
    return [batch for batch in batches if len(batch) >= ranks]


def collate(examples, pad_id, prompt_loss=False):
    """The batch as tensors {"input_ids", "labels"}: (2P, T) for P pairs, chosen rows first; (P, T) for sft.
    prompt_loss (loss.sft_tokens: prompt_and_response) adds "prompt_labels" (rows, T): in the rows the NLL trains
    (the first P: chosen, or every sft row) the ids of the untrained tokens but the first (nothing predicts it),
    IGNORE_INDEX elsewhere, so that labels and prompt_labels together cover every token as TRL's nll_loss does."""
    rows = [row for side in zip(*map(rows_of, examples)) for row in side]  # chosen rows, then rejected rows
    T = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows]),  # (rows, T)
             "labels": torch.tensor([labels + [IGNORE_INDEX] * (T - len(labels)) for _, labels in rows])}
    if prompt_loss:
        prompts = [[IGNORE_INDEX] + [i if label == IGNORE_INDEX else IGNORE_INDEX for i, label in zip(ids, labels)][1:]
                   if r < len(examples) else [] for r, (ids, labels) in enumerate(rows)]
        batch["prompt_labels"] = torch.tensor([p + [IGNORE_INDEX] * (T - len(p)) for p in prompts])
    return batch


def show_example(example, tokenizer, color=None):
    """An example as text, trained tokens green on a terminal and ⟦bracketed⟧ otherwise; a pair's prompt once."""
    color = sys.stdout.isatty() if color is None else color

    def marked(ids, labels):  # decode each run of trained or untrained tokens, mark the trained runs
        text = ""
        for trained, run in itertools.groupby(zip(ids, labels), key=lambda token: token[1] != IGNORE_INDEX):
            piece = tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
            text += (f"\033[32m{piece}\033[0m" if color else f"⟦{piece}⟧") if trained else piece
        return text
    prompt, answers = segments(example)
    if len(answers) == 1:
        return "[data] example (trained tokens marked):\n" + marked(*rows_of(example)[0])
    return "\n".join(["[data] example pair (trained tokens marked):",
                      "prompt:   " + tokenizer.decode(prompt[0], skip_special_tokens=False),
                      "chosen:   " + marked(*answers[0]), "rejected: " + marked(*answers[1])])
