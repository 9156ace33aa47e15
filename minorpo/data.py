"""The preprocessor: JSONL rows in, token ids and labels out, one dict of int lists per row.

    tokenizer = load_tokenizer("/ckpt/Qwen3-0.6B")
    examples, report = load_examples("pairs.jsonl", tokenizer, task="prompted_preference")
    # pairs: {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    # sft:   {"input_ids", "labels"}          (the same keys as the processed format)

References: ORPO, Hong, Lee, Thorne 2024 (arXiv:2403.07691), for the masks and the filtered pairs;
Qwen's ChatML template; nanochat, which builds ids and labels together, one segment at a time.

Decisions:
- Labels follow Hugging Face (batches.py: labels[t] = input_ids[t] where trained, IGNORE_INDEX elsewhere).
- The prompt and each response are tokenized as separate segments, so the boundary is exact and the
  prompt ids are those generation sees. A response is `{text}<|im_end|>` (chatml) or
  `{text}<|endoftext|>` (raw); a cut response loses that end token, so the model never learns to stop
  at the cut. No BOS token (Qwen adds none).
- Rows left with no label tokens by truncation (batches.truncate), empty responses and identical
  chosen/rejected are dropped and counted: a mean over zero tokens is 0/0 = NaN, the seed's known
  failure. A malformed line stops the load with `file:line` and the layout expected.
- Layouts: a prompt is a string or a list of {"role", "content"} messages; an answer is a string or a
  transcript (a message list, or HH's "Human: ... Assistant: ..." string) whose last turn is the answer
  and whose earlier turns are the prompt. task=preference without a prompt otherwise takes the shared
  beginning of chosen and rejected, cut back to a whitespace boundary. template=raw: one prompt text.
"""
import json
import os
import re

from tokenizers import Tokenizer

from minorpo.batches import (IGNORE_INDEX, PAIR_KEYS, SFT_KEYS, example_problem, first_trained, make_example,
                             rows_of, truncate)

LAYOUTS = {
    "sft": '{"prompt", "response"}, {"text"}, {"messages"} or {"prompt", "chosen", "rejected"}',
    "prompted_preference": '{"prompt", "chosen", "rejected"}',
    "preference": '{"chosen", "rejected"} and optionally "prompt"',
}
EMPTY_LABELS = "with empty labels (response truncated to 0 tokens)"
EMPTY_RESPONSE = "with an empty response"
IDENTICAL = "with identical chosen and rejected"
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")  # a turn of an HH string transcript


class DataError(ValueError):
    """A problem with the data or the tokenizer; the message names the file, the line and the fix."""


class _Filtered(Exception):
    """A well-formed row that cannot be trained on; its reason is counted and reported."""


def load_tokenizer(folder):
    """The model folder's tokenizer.json (Hugging Face tokenizers format)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; the model folder needs the tokenizer.json it was trained with")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise DataError(f"{path}: not a readable tokenizer ({e}); copy it again from the model") from None


def _template_ids(tokenizer, template):
    """Special token ids the template writes: turn start and end (chatml), end of text (both)."""
    names = {"start": "<|im_start|>", "end": "<|im_end|>", "eot": "<|endoftext|>"}
    if template == "raw":  # raw ends a response with end-of-text
        names = {"end": "<|endoftext|>", "eot": "<|endoftext|>"}
    ids = {key: tokenizer.token_to_id(token) for key, token in names.items()}
    for key, token in names.items():
        if ids[key] is None:
            raise DataError(f"the tokenizer has no {token} token, which data.template={template} needs")
    return ids


def stop_and_pad_ids(tokenizer, template):
    """(stop_ids, pad_id): generation stops at any stop id (chatml: <|im_end|> or <|endoftext|>; raw:
    <|endoftext|>); batches are right-padded with <|endoftext|>, as Qwen does."""
    ids = _template_ids(tokenizer, template)
    return list(dict.fromkeys([ids["end"], ids["eot"]])), ids["eot"]


def read_jsonl(path):
    """Every non-blank line of a JSONL file as (where, row): where = "path:line", row a dict."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _short(value):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _hh_turns(text):
    """Anthropic HH's string transcripts ("\n\nHuman: ...\n\nAssistant: ...") as messages, else None, so
    that a pair is split at its last turn boundary even when both answers begin with the same words."""
    text = text.lstrip()
    if not text.startswith("Human:") or "\n\nAssistant:" not in text:
        return None
    parts = HH_TURN.split(text)  # ['', 'Human', said, 'Assistant', said, ...]
    return [{"role": "user" if who == "Human" else "assistant", "content": said}
            for who, said in zip(parts[1::2], parts[2::2])]


def _turns(row, key, where, expected, role):
    """row[key] as a list of {"role", "content"} messages; a string is one message with `role`."""
    if key not in row:
        raise DataError(f'{where}: missing field "{key}" ({expected})')
    value = row[key]
    if isinstance(value, str):
        return (role == "assistant" and _hh_turns(value)) or [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f'{where}: field "{key}" must be a string or a list of {{"role", "content"}} messages '
                    f"with string values, got {_short(value)} ({expected})")


def _dialogue(row, keys, where, expected, prompt_required):
    """(prompt messages, answer texts) of a row whose answers are under `keys`."""
    prompt = []
    if prompt_required or "prompt" in row:
        prompt = _turns(row, "prompt", where, expected, "user")
        if not any(m["content"].strip() for m in prompt):
            raise DataError(f'{where}: field "prompt" is empty ({expected})')
    answers = [_turns(row, key, where, expected, "assistant") for key in keys]
    for key, turns in zip(keys, answers):
        if turns[-1]["role"] != "assistant":
            raise DataError(f'{where}: the last turn of "{key}" must have role "assistant" (the answer to '
                            f'train on), got "{turns[-1]["role"]}"')
    context = answers[0][:-1]  # a transcript's turns before its answer are the prompt
    if any(turns[:-1] != context for turns in answers):
        raise DataError(f'{where}: "{keys[0]}" and "{keys[1]}" must have the same turns before their last one')
    if context and prompt and context[-len(prompt):] != prompt:
        raise DataError(f'{where}: "prompt" differs from the turns before the answer in "{keys[0]}"')
    return context or prompt, [turns[-1]["content"] for turns in answers]


def _shared_beginning(chosen, rejected, where, expected):
    """Split two strings into (prompt, chosen, rejected) at their longest common prefix, cut back to the
    last whitespace so that no word is split between prompt and response."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = re.search(r"\s*\S*$", shared).start()
    if not shared[:cut].strip():
        raise DataError(f'{where}: "chosen" and "rejected" share no beginning to use as the prompt; add a '
                        f'"prompt" field ({expected})')
    return [{"role": "user", "content": shared[:cut]}], chosen[cut:], rejected[cut:]


def _pair(row, where, expected, prompt_required):
    """(prompt messages, [chosen, rejected]) of a preference row."""
    prompt, (chosen, rejected) = _dialogue(row, ("chosen", "rejected"), where, expected, prompt_required)
    if not chosen.strip() or not rejected.strip():
        raise _Filtered(EMPTY_RESPONSE)
    if chosen == rejected:
        raise _Filtered(IDENTICAL)
    if not prompt:
        prompt, chosen, rejected = _shared_beginning(chosen, rejected, where, expected)
    return prompt, [chosen, rejected]


def _parse(row, task, where):
    """(prompt messages or None for plain text, answer texts, whether earlier assistant turns train)."""
    expected = f"task {task} expects {LAYOUTS[task]}"
    if task != "sft":
        prompt, answers = _pair(row, where, expected, task == "prompted_preference")
        return prompt, answers, False
    if "messages" in row:  # a conversation: every assistant turn is trained
        turns = _turns(row, "messages", where, expected, "user")
        if turns[-1]["role"] != "assistant":
            raise DataError(f'{where}: the last message of "messages" must have role "assistant"')
        if not turns[-1]["content"].strip():
            raise _Filtered(EMPTY_RESPONSE)
        return turns[:-1], [turns[-1]["content"]], True
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'{where}: field "text" must be a non-empty string, got {_short(text)} ({expected})')
        return None, [text], False
    if "chosen" in row:  # a preference row under sft trains on the chosen answer
        prompt, answers = _pair(row, where, expected, False)
        return prompt, answers[:1], False
    prompt, answers = _dialogue(row, ("response",), where, expected, True)
    if not answers[0].strip():
        raise _Filtered(EMPTY_RESPONSE)
    return prompt, answers, False


def _prompt_pieces(messages, template, ids, train_assistant, where):
    """The prompt as pieces (text or special token id, trained); chatml ends with the assistant header."""
    if template == "raw":
        if len(messages) != 1:
            raise DataError(f"{where}: data.template=raw takes one prompt text, got {len(messages)} turns; "
                            "use data.template=chatml for system turns and conversations")
        return [(messages[0]["content"], False)]
    pieces = []
    for m in messages:
        if train_assistant and m["role"] == "assistant":
            pieces += [(ids["start"], False), ("assistant\n", False), (m["content"], True), (ids["end"], True)]
        else:
            pieces += [(ids["start"], False), (f"{m['role']}\n{m['content']}", False), (ids["end"], False)]
        pieces.append(("\n", False))
    return pieces + [(ids["start"], False), ("assistant\n", False)]


def _tokenize(rendered, tokenizer):
    """[(prompt pieces, [answer pieces])] -> [((ids, labels), [(ids, labels)])]. Every distinct text is
    encoded once, in one encode_batch call (parallel, in Rust); ids and labels are built together."""
    texts = list(dict.fromkeys(piece for prompt, answers in rendered for segment in (prompt, *answers)
                               for piece, _ in segment if isinstance(piece, str)))
    encoded = {t: e.ids for t, e in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False))}

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


def _processed(row, task, where, vocab_size):
    """(prompt (ids, labels), [answer (ids, labels)]) of a pre-tokenized row, checked strictly."""
    keys = PAIR_KEYS if task != "sft" else PAIR_KEYS[:2] if "chosen_input_ids" in row else SFT_KEYS
    problem = example_problem(row, keys, vocab_size)
    if problem:
        raise DataError(f"{where}: {problem} (task {task} with data.format=processed expects "
                        f"{{{', '.join(map(json.dumps, keys))}}})")
    rows = [(row[keys[i]], row[keys[i + 1]]) for i in range(0, len(keys), 2)]
    if len(rows) == 2 and rows[0] == rows[1]:
        raise _Filtered(IDENTICAL)
    start = min(first_trained(labels) for _, labels in rows)  # the prompt: before the first trained token
    if any(ids[:start] != rows[0][0][:start] for ids, _ in rows):
        raise DataError(f"{where}: chosen and rejected must start with the same prompt ids (the positions "
                        f"labelled {IGNORE_INDEX} before the first trained token)")
    return (rows[0][0][:start], rows[0][1][:start]), [(ids[start:], labels[start:]) for ids, labels in rows]


def _render(row, task, template, ids, where):
    """(prompt pieces, [answer pieces]) of a raw row."""
    prompt, answers, train_assistant = _parse(row, task, where)
    if prompt is None:  # {"text"}: plain language modelling, every token trained
        return [], [[(answers[0], True), (ids["eot"], True)]]
    return (_prompt_pieces(prompt, template, ids, train_assistant, where),
            [[(answer, True), (ids["end"], True)] for answer in answers])


def make_examples(rows, tokenizer, task, fmt="raw", template="chatml", max_length=512, max_prompt_length=256,
                  source="data"):
    """Rows [(where, dict)] -> (examples, report lines). See load_examples."""
    counts = dict.fromkeys((EMPTY_LABELS, EMPTY_RESPONSE, IDENTICAL), 0)
    ids = _template_ids(tokenizer, template) if fmt == "raw" else None
    vocab_size, segmented, rendered = tokenizer.get_vocab_size(), [], []
    for where, row in rows:
        try:
            if fmt == "processed":
                segmented.append(_processed(row, task, where, vocab_size))
            else:
                rendered.append(_render(row, task, template, ids, where))
        except _Filtered as reason:
            counts[str(reason)] += 1
    segmented += _tokenize(rendered, tokenizer)
    examples, cut = [], 0
    for prompt, answers in segmented:
        prompt, answers, was_cut = truncate(prompt, answers, max_length, max_prompt_length)
        example = make_example(prompt, answers)
        if any(labels.count(IGNORE_INDEX) == len(labels) for _, labels in rows_of(example)):  # no label tokens
            counts[EMPTY_LABELS] += 1
            continue
        cut += was_cut
        examples.append(example)
    unit = "rows" if task == "sft" else "pairs"
    report = [f"[data] Filtered {n} rows {reason}" for reason, n in counts.items() if n]
    report.append(f"[data] {source}: {len(examples)} {unit} ({cut} truncated to max_length={max_length})")
    if not examples:
        hint = (f"raise data.max_length (now {max_length}) or lower data.max_prompt_length (now "
                f"{max_prompt_length}) so that responses keep some tokens" if counts[EMPTY_LABELS]
                else f"check that the file holds {LAYOUTS[task]} rows")
        raise DataError(f"{source}: no usable {unit} left ({'; '.join(report[:-1]) or 'no rows'}); {hint}")
    return examples, report


def load_examples(path, tokenizer, task, fmt="raw", template="chatml", max_length=512, max_prompt_length=256):
    """Read a JSONL file and turn it into training examples: lists of ints, labels IGNORE_INDEX on the
    prompt. task: sft | preference | prompted_preference; fmt: raw (text, tokenized here with the chat
    template) | processed (ids and labels, checked). Returns (examples, report lines to print)."""
    return make_examples(read_jsonl(path), tokenizer, task, fmt, template, max_length, max_prompt_length, path)
