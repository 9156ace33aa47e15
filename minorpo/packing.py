"""Shared-prompt packing: a batch of pairs as a few rows of [prompt | chosen | rejected] documents.

The padded layout (batches.collate) runs each pair's prompt twice, once before each answer, and pads every
row to the batch's longest. Here each pair is one document, its prompt run once; the rejected answer takes
the position ids that follow the prompt (as if the chosen answer were not there) and a mask hides the chosen
answer from it. Documents share rows, each seeing only itself. An sft example is a [prompt | answer] document.

    row:      p0 p1 p2 c0 c1 r0 r1 r2 | q0 q1 d0 s0 s1 | pad        (p/q prompts, c/d chosen, r/s rejected)
    position:  0  1  2  3  4  3  4  5 |  0  1  2  2  3 | 0
    r1 sees:   x  x  x  .  .  x  x  .   (the prompt and the earlier rejected tokens, never c0 c1)

Every token then computes its hidden state of the padded layout, so the loss is unchanged: the batch keeps the
padded labels (2P, T), and `index` (2P, T) names where each of their tokens' hidden state sits in the packed rows.
The head gathers them (loss.chunked_label_logps), so the first rejected token is predicted from the last prompt
token, as in its own padded row. Attention is dense everywhere (F.scaled_dot_product_attention, a boolean mask).

Not for the Qwen3.5 hybrid: its DeltaNet layers carry a recurrent state through every earlier token of
the row, which no mask can make skip the chosen answer (Qwen35.packs is False; train.py pads for it).
"""
import torch

from minorpo.batches import collate, segments

PROMPT = 0  # the branch id of the shared prompt; answers are branches 1 (chosen, or the sft answer) and 2


def document(example):
    """(ids, position ids, branch ids) of one example laid out as [prompt | answer 1 (| answer 2)]."""
    (prompt, _), answers = segments(example)
    ids, positions, branches = list(prompt), list(range(len(prompt))), [PROMPT] * len(prompt)
    for branch, (answer, _) in enumerate(answers, start=1):
        ids += answer
        positions += range(len(prompt), len(prompt) + len(answer))  # every answer continues the prompt
        branches += [branch] * len(answer)
    return ids, positions, branches


def collate_for(layout, pad_id, max_length, prompt_loss=False):
    """The micro-batch builder for data.layout: batches.collate, or pack into rows of at most twice the batch's
    longest document, and at most 2 * max_length. prompt_loss: batches.collate's (both layouts).

    Why: the dense mask costs L² attention for a row of L tokens whatever it hides, and a short last row pads
    up to L. Two of the batch's documents a row pack it nearly without padding (length-grouped batches hold
    similar lengths); rows of 2 * max_length for short pairs cost more than the padding they save (the
    embedded default: pairs of ~40 tokens, rows of 256 were slower than padding). The cap keeps long pairs
    (at most 2 * max_length: a prompt and two answers, each row cut to max_length) one a row."""
    if layout != "packed":
        return lambda examples: collate(examples, pad_id, prompt_loss)
    return lambda examples: pack(examples, pad_id, min(2 * max(len(document(e)[0]) for e in examples),
                                                       2 * max_length), prompt_loss)


def pack(examples, pad_id, budget, prompt_loss=False):
    """The packed batch: {"input_ids", "position_ids", "doc", "branch"} (R, L), doc -1 on padding, and
    {"labels", "index"} (2P, T) in collate's padded layout (P for sft), and "prompt_labels" if prompt_loss.
    index[r, t] is the flat position (row * L + column) of token t of padded row r (0 on padding). Documents go
    into rows first-fit, longest first, a row holding at most `budget` tokens unless one document alone is longer."""
    docs = [document(example) for example in examples]
    lengths = [len(ids) for ids, _, _ in docs]
    rows = []  # the example indices of each packed row
    for i in sorted(range(len(docs)), key=lambda i: -lengths[i]):  # first-fit decreasing
        row = next((row for row in rows if sum(lengths[j] for j in row) + lengths[i] <= budget), None)
        if row is None:
            rows.append(row := [])
        row.append(i)
    L = max(sum(lengths[i] for i in row) for row in rows)

    def packed(part, pad):  # (R, L): part(i) of each document of a row, one after another, then padding
        return torch.tensor([[v for i in row for v in part(i)] + [pad] * (L - sum(lengths[i] for i in row))
                             for row in rows])
    # example index -> flat position of its first token
    start = {i: r * L + sum(lengths[j] for j in row[:k]) for r, row in enumerate(rows) for k, i in enumerate(row)}
    padded = collate(examples, pad_id, prompt_loss)
    index = torch.zeros_like(padded["labels"])  # (2P, T)
    for k in range(len(index) // len(examples)):  # padded row k * P + i: the prompt of example i, then answer k + 1
        for i, (_, _, branches) in enumerate(docs):
            flat = [start[i] + t for t, branch in enumerate(branches) if branch in (PROMPT, k + 1)]
            index[k * len(examples) + i, :len(flat)] = torch.tensor(flat)
    return {"input_ids": packed(lambda i: docs[i][0], pad_id), "labels": padded["labels"],
            "position_ids": packed(lambda i: docs[i][1], 0), "doc": packed(lambda i: [i] * lengths[i], -1),
            "branch": packed(lambda i: docs[i][2], 0), "index": index,
            **{key: padded[key] for key in ("prompt_labels",) if key in padded}}


def attention_mask(doc, branch):
    """The boolean attention mask (R, 1, L, L) of packed rows, True where query i may look at key j:
    an earlier (or the same) token of the same document, on the shared prompt or on the query's own
    branch. Padding (doc -1) sees only padding, itself included, so no softmax row is empty (NaN)."""
    L = doc.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()  # (L, L): j <= i
    same_doc = doc[:, :, None] == doc[:, None, :]  # (R, L, L)
    same_branch = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])  # (R, L, L)
    return (same_doc & same_branch & causal).unsqueeze(1)  # (R, 1, L, L): one mask for every head
