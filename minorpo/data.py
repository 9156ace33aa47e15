"""The preprocessor: a row's text through the chat template into token ids and labels (see batches.py).

    rows = read_jsonl("pairs.jsonl", max_length=512)          # [("pairs.jsonl:1", {...}), ...]
    examples, report = make_examples(rows, load_tokenizer("/ckpt/Qwen3-0.6B"), "prompted_preference")

Reading and checking the rows (the layouts of data.task, messages, bad lines, filters) is formats.py's;
here: template -> ids -> labels. Decisions (ids and labels built together, one segment at a time, as nanochat):
- Prompt and responses are separate segments: an exact boundary, and the prompt ids generation sees. A
  response ends with `<|im_end|>` (chatml) or `<|endoftext|>` (raw), lost when cut: no learning to stop at
  a cut. No BOS. Template tokens go in by id; special-token text in data is plain text: it cannot forge a turn.
- Strings are cut to CHARS_PER_TOKEN x max_length characters before tokenizing: time follows max_length.
"""
import sys
import time

from minorpo import formats
from minorpo.batches import IGNORE_INDEX, make_example, rows_of, truncate
from minorpo.formats import EMPTY_LABELS, FILTERS, IDENTICAL, IDENTICAL_CUT, OVERLONG, DataError, Dropped
from minorpo.formats import TooLong, load_tokenizer, read_jsonl  # noqa: F401 - so callers say data.read_jsonl

CHARS_PER_TOKEN = 16  # strings are cut to this many characters per token of max_length before tokenizing


def _template_ids(tokenizer, template):
    """Special token ids the template writes: turn start and end (chatml), end of text (both)."""
    names = {"start": "<|im_start|>", "end": "<|im_end|>", "eot": "<|endoftext|>"} if template == "chatml" \
        else {"end": "<|endoftext|>", "eot": "<|endoftext|>"}
    if missing := [token for token in names.values() if tokenizer.token_to_id(token) is None]:
        raise DataError(f"the tokenizer has no {missing[0]} token, which data.template={template} needs")
    return {key: tokenizer.token_to_id(token) for key, token in names.items()}


def stop_and_pad_ids(tokenizer, template):
    """(stop_ids, pad_id): generation stops at the template's end tokens; Qwen pads with <|endoftext|>."""
    ids = _template_ids(tokenizer, template)
    return list(dict.fromkeys([ids["end"], ids["eot"]])), ids["eot"]


def _prompt_pieces(messages, template, ids, train_assistant, where):
    """The prompt as pieces (text or special token id, trained); chatml ends with the assistant header."""
    if template == "raw":
        if len(messages) != 1:
            raise DataError(f"{where}: data.template=raw takes one prompt text, not {len(messages)} turns; "
                            "use data.template=chatml")
        return [(messages[0]["content"], False)]
    pieces = []
    for m in messages:
        if train_assistant and m["role"] == "assistant":
            pieces += [(ids["start"], False), ("assistant\n", False), (m["content"], True), (ids["end"], True)]
        else:  # one text, as the prompt of generation is encoded
            pieces += [(ids["start"], False), (f"{m['role']}\n{m['content']}", False), (ids["end"], False)]
        pieces.append(("\n", False))
    return pieces + [(ids["start"], False), ("assistant\n", False)]


def _tokenize(rendered, tokenizer):
    """[(prompt pieces, [answer pieces])] -> [((ids, labels), [(ids, labels)])]. Every distinct text is
    encoded once, by encode_batch (parallel, in Rust), 20,000 at a time to show progress on a big file."""
    texts = list(dict.fromkeys(piece for prompt, answers in rendered for segment in (prompt, *answers)
                               for piece, _ in segment if isinstance(piece, str)))
    tokenizer.encode_special_tokens = True  # data text never becomes a control token (set for good)
    encoded, shown = {}, time.time()
    for start in range(0, len(texts), 20000):
        chunk = texts[start:start + 20000]
        encoded.update(zip(chunk, (e.ids for e in tokenizer.encode_batch(chunk, add_special_tokens=False))))
        if time.time() - shown > 5:
            print(f"[data] tokenized {start + len(chunk):,} of {len(texts):,} texts", file=sys.stderr, flush=True)
            shown = time.time()
    def ids_and_labels(pieces):
        ids, labels = [], []
        for piece, trained in pieces:
            piece_ids = encoded[piece] if isinstance(piece, str) else [piece]
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        return ids, labels
    return [(ids_and_labels(prompt), [ids_and_labels(a) for a in answers]) for prompt, answers in rendered]


def prompt_ids(tokenizer, prompt, template="chatml"):
    """The ids of one chat prompt (a string or a list of messages) for generation, as in training."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    pieces = _prompt_pieces(messages, template, _template_ids(tokenizer, template), False, "prompt")
    return _tokenize([(pieces, [])], tokenizer)[0][0][0]


def _render(row, task, template, ids, where, cap, pairs=False, drop=False):
    """(prompt pieces, [answer pieces]) of a raw row. Strings are cut to `cap` characters as truncation
    cuts tokens: an answer keeps its beginning (and loses its end token), a prompt message its end. With
    drop (data.overlong=drop) a row with a string over `cap` is Dropped as not fitting, untokenized."""
    prompt, answers, train_assistant = formats.parse(row, task, where, pairs)
    if drop and any(len(text) > cap for text in answers + [m["content"] for m in prompt or []]):
        raise Dropped(OVERLONG)
    end = ids["eot"] if prompt is None else ids["end"]  # None: a {"text"} row, every token trained
    answers = [[(a[:cap], True)] + [(end, True)] * (len(a) <= cap) for a in answers]
    if prompt is None:
        return [], answers
    prompt = [dict(m, content=m["content"][-cap:]) for m in prompt]
    return _prompt_pieces(prompt, template, ids, train_assistant, where), answers


def make_examples(rows, tokenizer, task, fmt="raw", template="chatml", max_length=512, max_prompt_length=256,
                  source="data", pairs=False, overlong="truncate"):
    """Rows [(where, dict)] from read_jsonl -> (examples, report lines to print). task: sft | preference |
    prompted_preference; fmt: raw (text, tokenized with the chat template) | processed (ids and labels).
    pairs: under sft, keep a preference row's rejected answer (formats.eval_pairs: the held-out pairs).
    overlong: truncate (batches.truncate) or drop the rows whose prompt + longer answer exceed max_length."""
    ids = _template_ids(tokenizer, template) if fmt == "raw" else None
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # ids may have gaps: the largest + 1
    dropped = {reason: [] for reason in FILTERS}  # why a row cannot be trained on -> the place of every such row
    parsed, places = [], []
    for where, row in rows:
        try:
            parsed.append(formats.processed(row, task, where, vocab_size, pairs) if fmt == "processed" else
                          _render(row, task, template, ids, where, CHARS_PER_TOKEN * max_length, pairs,
                                  overlong == "drop"))
            places.append(where)
        except Dropped as reason:
            dropped[str(reason)].append(where)
    examples, cut = [], []
    for where, (prompt, answers) in zip(places, parsed if fmt == "processed" else _tokenize(parsed, tokenizer)):
        if overlong == "drop" and len(prompt[0]) + max(len(ids) for ids, _ in answers) > max_length:
            dropped[OVERLONG].append(where)  # as truncate() would cut it
            continue
        prompt, answers, was_cut = truncate(prompt, answers, max_length, max_prompt_length)
        example = make_example(prompt, answers)
        if any(labels.count(IGNORE_INDEX) == len(labels) for _, labels in rows_of(example)):  # no label tokens
            dropped[EMPTY_LABELS].append(where)
        elif len(answers) == 2 and answers[0] == answers[1]:
            dropped[IDENTICAL_CUT if was_cut else IDENTICAL].append(where)
        else:
            cut += [where] * was_cut
            examples.append(example)
    line_of = {where: i for i, (where, _) in enumerate(rows)}
    dropped[OVERLONG].sort(key=line_of.get)  # those dropped as text came first: back into the file's order
    return examples, formats.report(dropped, examples, cut, task, source, max_length, max_prompt_length, pairs)
