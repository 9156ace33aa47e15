"""Shared-prompt packing: a batch of pairs as a few rows of [prompt | chosen | rejected] documents.

The padded layout (batches.collate) runs each pair's prompt twice, once before the chosen answer and
once before the rejected one, and pads every row to the batch's longest. Here each pair is one
document, its prompt run once; the rejected answer takes the position ids that follow the prompt (as
if the chosen answer were not there) and a mask hides the chosen answer from it. Several documents
share a row, each seeing only itself (document masking). An sft example is a [prompt | answer] document.

    row:      p0 p1 p2 c0 c1 r0 r1 r2 | q0 q1 d0 s0 s1 | pad        (p/q prompts, c/d chosen, r/s rejected)
    position:  0  1  2  3  4  3  4  5 |  0  1  2  2  3 | 0
    r1 sees:   x  x  x  .  .  x  x  .   (the prompt and the earlier rejected tokens, never c0 c1)

Every token then computes the hidden state it has in the padded layout, so the loss is unchanged: the
batch keeps the padded layout's labels (2P, T), and `index` (2P, T) names, for each token of that
layout, where its hidden state sits in the packed rows. The head gathers them (loss.chunked_label_logps),
so the first rejected token is predicted from the last prompt token, as in its own padded row. The
dense attention of the CPU (F.scaled_dot_product_attention with a boolean mask) is used everywhere.

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


def collate_for(layout, pad_id, max_length):
    """The micro-batch builder for data.layout: pack (rows sized by row_budget) or batches.collate."""
    if layout == "packed":
        return lambda examples: pack(examples, pad_id, row_budget(examples, max_length))
    return lambda examples: collate(examples, pad_id)


def row_budget(examples, max_length):
    """The tokens a packed row may hold: twice the batch's longest document, at most 2 * max_length.

    Why: the mask is dense, so a row of L tokens costs L² in attention whatever the mask hides, and a
    short last row pads up to L. Rows of two of the batch's documents pack it nearly without padding
    (length-grouped batches hold similar lengths), while rows of 2 * max_length for short pairs cost
    more than the padding they save (the embedded default, pairs of about 40 tokens, max_length 128:
    rows of 256 were slower than padding). The cap keeps long pairs (a document is at most
    2 * max_length: a prompt and two answers, each row cut to max_length) one a row."""
    return min(2 * max(len(document(example)[0]) for example in examples), 2 * max_length)


def pack(examples, pad_id, budget):
    """The packed batch of examples: {"input_ids", "position_ids", "doc", "branch"} (R, L) and
    {"labels", "index"} (2P, T) in the padded layout (P for sft), as collate's rows.

    Documents go into rows first-fit, longest first, each row holding at most `budget` tokens (a
    document longer than the budget gets a row of its own; row_budget chooses it); L is the fullest
    row's length. Padding has doc -1. index[r, t] is the flat position (row * L + column) of token t of
    padded row r (0 on padding).
    """
    docs = [document(example) for example in examples]
    rows, room = [], []  # rows: the example indices of each row; room: its free tokens
    for i in sorted(range(len(docs)), key=lambda i: -len(docs[i][0])):  # first-fit decreasing
        n = len(docs[i][0])
        r = next((r for r in range(len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([]), room.append(max(budget, n))
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    L = max(sum(len(docs[i][0]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)  # (R, L)
    doc = torch.full((len(rows), L), -1, dtype=torch.long)  # (R, L): which example; -1 on padding
    branch = torch.zeros((len(rows), L), dtype=torch.long)  # (R, L): PROMPT, 1 or 2
    start = {}  # example index -> flat position of its first token
    for r, row in enumerate(rows):
        column = 0
        for i in row:
            ids, positions, branches = docs[i]
            end = column + len(ids)
            input_ids[r, column:end], position_ids[r, column:end] = torch.tensor(ids), torch.tensor(positions)
            doc[r, column:end], branch[r, column:end] = i, torch.tensor(branches)
            start[i], column = r * L + column, end
    padded = collate(examples, pad_id)
    index = torch.zeros_like(padded["labels"])  # (2P, T)
    for i, example in enumerate(examples):
        (prompt, _), answers = segments(example)
        p = len(prompt)
        answer_start = start[i] + p
        for k, (answer, _) in enumerate(answers):  # padded row k * P + i: the prompt, then answer k
            flat = list(range(start[i], start[i] + p)) + list(range(answer_start, answer_start + len(answer)))
            index[k * len(examples) + i, :len(flat)] = torch.tensor(flat, dtype=torch.long)
            answer_start += len(answer)
    return {"input_ids": input_ids, "labels": padded["labels"], "position_ids": position_ids, "doc": doc,
            "branch": branch, "index": index}


def attention_mask(doc, branch):
    """The boolean attention mask (R, 1, L, L) of packed rows, True where query i may look at key j:
    an earlier (or the same) token of the same document, on the shared prompt or on the query's own
    branch. Padding (doc -1) sees only padding, itself included, so no softmax row is empty (NaN)."""
    L = doc.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()  # (L, L): j <= i
    same_doc = doc[:, :, None] == doc[:, None, :]  # (R, L, L)
    same_branch = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])  # (R, L, L)
    return (same_doc & same_branch & causal).unsqueeze(1)  # (R, 1, L, L): one mask for every head
