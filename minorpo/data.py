"""The preprocessor: JSONL rows in, token ids and labels out, one dict of int lists per row (see batches.py).

    rows = read_jsonl("pairs.jsonl", max_length=512)          # [("pairs.jsonl:1", {...}), ...]
    examples, report = make_examples(rows, load_tokenizer("/ckpt/Qwen3-0.6B"), "prompted_preference")

Decisions (ids and labels built together, one segment at a time, as nanochat does):
- Prompt and responses are separate segments: an exact boundary, and the prompt ids generation sees. A
  response ends with `<|im_end|>` (chatml) or `<|endoftext|>` (raw), lost when cut: no learning to stop at
  a cut. No BOS. Template tokens go in by id; special-token text in data is plain text: it cannot forge a turn.
- Rows with no label tokens after truncation, an empty response, or chosen equal to rejected (as text, or
  as tokens after truncation) are dropped and reported by line: 0/0 = NaN; identical answers are noise.
- Memory and time follow max_length, not the file: a line over max(1 MiB, 64 bytes x max_length) is skipped
  unread and reported; strings are cut to CHARS_PER_TOKEN x max_length characters before tokenizing.
- A malformed line is one line of error: `file:line`, the problem, the layout expected (LAYOUTS; a prompt
  or answer may be messages or an HH "Human: ... Assistant: ..." transcript, see _turns).
"""
import json
import os
import re
import sys
import time

from tokenizers import Tokenizer

from minorpo.batches import (IGNORE_INDEX, PAIR_KEYS, SFT_KEYS, example_problem, make_example, rows_of, segments,
                             truncate)
from minorpo.files import UserError, file_inside

LAYOUTS = {"sft": '{"prompt", "response"}, {"text"}, {"messages"} or {"prompt", "chosen", "rejected"}',
           "prompted_preference": '{"prompt", "chosen", "rejected"}',
           "preference": '{"chosen", "rejected"} and optionally "prompt"'}
ROLES = ("system", "user", "assistant")  # system only as the first message; chatml here has no tool turns
CHARS_PER_TOKEN = 16  # strings are cut to this many characters per token of max_length before tokenizing
BY_LENGTH = "raise data.max_length (now {max_length}) or lower data.max_prompt_length (now {max_prompt_length})"
BY_BYTES = "shorten them or raise data.max_length (now {max_length}; the bound is max(1 MiB, 64 bytes x it))"
FILTERS = {  # why a well-formed row is dropped -> how to keep such rows ("" if nothing would)
    "longer than {bound} bytes": BY_BYTES,
    "with an empty response": "", "with identical chosen and rejected": "",
    "with empty labels (response truncated to 0 tokens)": BY_LENGTH,
    "with chosen and rejected identical after truncation": BY_LENGTH}
TOO_LONG, EMPTY_RESPONSE, IDENTICAL, EMPTY_LABELS, IDENTICAL_CUT = FILTERS


class DataError(UserError):
    """A problem with the data or the tokenizer; the message names the file, the line and the fix."""


class TooLong(dict):
    """read_jsonl's row for a line over the bound: empty, never parsed, counted where it stands."""


class _Filtered(Exception):
    """A well-formed row that cannot be trained on; its reason (a key of FILTERS) is reported."""


def load_tokenizer(folder):
    """The model folder's tokenizer.json (Hugging Face tokenizers format), a regular file inside it."""
    path = file_inside(folder, "tokenizer.json", "tokenizer")
    if os.path.getsize(path) > 100 << 20:  # the largest real ones are about 35 MB
        raise DataError(f"{path}: {os.path.getsize(path):,} bytes is not a tokenizer (at most 100 MB)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise DataError(f"{path}: not a readable tokenizer ({(str(e) or repr(e)).splitlines()[0][:200]}); copy it "
                        "again from the model") from None


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


def _parse_line(line, where):
    """One JSONL line (bytes) as a dict; any problem is a DataError of one line."""
    try:
        text = line.decode("utf-8-sig")
        row = json.loads(text)
        if re.search(r"\\u[dD][89a-fA-F]", text):  # a lone \ud800-\udfff: json accepts it, tokenizers do not
            json.dumps(row, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # Unicode{De,En}codeError and JSONDecodeError are ValueErrors
        problem = {UnicodeDecodeError: "not UTF-8 ({e}); save the file as UTF-8",
                   UnicodeEncodeError: "a lone surrogate (\\ud800 to \\udfff without its pair) is not text",
                   RecursionError: "JSON nested too deeply; a row is one flat object {{...}}"}
        raise DataError(f"{where}: " + problem.get(type(e), "not valid JSON ({e})").format(e=e)) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object {{...}}, got {type(row).__name__}")
    return row


def read_jsonl(path, max_length=512):
    """Every non-blank line of a JSONL file as ("path:line", dict); one over the bound, never held whole, is TooLong."""
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not found" if not os.path.exists(path) else "not a file"
        raise DataError(f"{path}: {kind}; expected a JSONL file (one JSON object a line), or `tiny`")
    rows, bound = [], max(1 << 20, 64 * max_length)  # bytes: far more than max_length tokens of any text
    with open(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(bound + 1), b""), 1):
            if len(line) > bound and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the line, 1 MiB at a time
                    line = f.readline(1 << 20)
                rows.append((f"{path}:{number}", TooLong()))
            elif line.strip():
                rows.append((f"{path}:{number}", _parse_line(line, f"{path}:{number}")))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or blank); expected one JSON object a line")
    return rows


def _turns(row, key, where, expected, role):
    """row[key] as a list of {"role", "content"} messages: a string is one message with `role`; an answer
    in Anthropic HH's "\n\nHuman: ...\n\nAssistant: ..." form is split into its turns (pairs split there)."""
    if key not in row:
        raise DataError(f'{where}: missing field "{key}" ({expected})')
    value, got = row[key], json.dumps(row[key], ensure_ascii=False)[:60]
    if isinstance(value, str):
        if role != "assistant" or not re.match(r"\s*Human:", value) or "\n\nAssistant:" not in value:
            return [{"role": role, "content": value}]
        parts = re.split(r"(?:^|\n\n)(Human|Assistant): ?", value.lstrip())  # ['', 'Human', said, 'Assistant', ...]
        return [{"role": "user" if who == "Human" else "assistant", "content": said}
                for who, said in zip(parts[1::2], parts[2::2])]
    if isinstance(value, list) and value:
        bad = next((i for i, m in enumerate(value) if not isinstance(m, dict) or
                    not isinstance(m.get("content"), str) or m.get("role") not in ROLES[min(i, 1):]), None)
        if bad is None:
            return [{"role": m["role"], "content": m["content"]} for m in value]
        got = f"message {bad + 1}: {json.dumps(value[bad], ensure_ascii=False)[:60]}"
    raise DataError(f'{where}: field "{key}" must be a string or a list of {{"role", "content"}} messages, '
                    f"content a string, role system (first only), user or assistant; got {got} ({expected})")


def _dialogue(row, keys, where, expected, prompt_required):
    """(prompt messages, answer texts) of a row whose answers are under `keys`; an empty answer is filtered."""
    prompt = []
    if prompt_required or "prompt" in row:
        prompt = _turns(row, "prompt", where, expected, "user")
        if not any(m["content"].strip() for m in prompt):
            raise DataError(f'{where}: field "prompt" is empty ({expected})')
    answers = [_turns(row, key, where, expected, "assistant") for key in keys]
    for key, turns in zip(keys, answers):
        if turns[-1]["role"] != "assistant":
            raise DataError(f'{where}: "{key}" must end with an "assistant" turn, got "{turns[-1]["role"]}"')
    context = answers[0][:-1]  # a transcript's turns before its answer are the prompt
    if any(turns[:-1] != context for turns in answers):
        raise DataError(f'{where}: "{keys[0]}" and "{keys[1]}" must have the same turns before their last one')
    if context and prompt and context[-len(prompt):] != prompt:
        raise DataError(f'{where}: "prompt" differs from the turns before the answer in "{keys[0]}"')
    if not all(turns[-1]["content"].strip() for turns in answers):
        raise _Filtered(EMPTY_RESPONSE)
    return context or prompt, [turns[-1]["content"] for turns in answers]


def _parse(row, task, where):
    """(prompt messages or None for plain text, answer texts, whether earlier assistant turns train)."""
    expected = f"task {task} expects {LAYOUTS[task]}"
    if task != "sft" or "chosen" in row:  # a preference row under sft trains on the chosen answer
        prompt, answers = _dialogue(row, ("chosen", "rejected"), where, expected, task == "prompted_preference")
        if answers[0] == answers[1]:
            raise _Filtered(IDENTICAL)
        if not prompt:  # their shared beginning, cut back to a whitespace boundary (no split word)
            shared = os.path.commonprefix(answers)  # not a regex: linear time even on a long shared run
            if not shared[-1:].isspace():  # it may end inside a word: leave that word to the responses
                shared = shared[:len(shared) - len((shared.split() or [""])[-1])]
            cut = len(shared.rstrip())
            if not cut:
                raise DataError(f'{where}: "chosen" and "rejected" share no beginning to use as the prompt; '
                                f'add a "prompt" field ({expected})')
            prompt, answers = [{"role": "user", "content": answers[0][:cut]}], [a[cut:] for a in answers]
        return prompt, answers[:1] if task == "sft" else answers, False
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f'{where}: field "text" must be a non-empty string ({expected})')
        return None, [row["text"]], False
    key = "messages" if "messages" in row else "response"  # a conversation: every assistant turn trains
    return (*_dialogue(row, (key,), where, expected, key == "response"), key == "messages")


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


def _processed(row, task, where, vocab_size):
    """(prompt (ids, labels), [answer (ids, labels)]) of a pre-tokenized row, checked strictly."""
    keys = PAIR_KEYS if task != "sft" else PAIR_KEYS[:2] if "chosen_input_ids" in row else SFT_KEYS
    if problem := example_problem(row, keys, vocab_size):
        raise DataError(f"{where}: {problem} (task {task} with data.format=processed expects "
                        f"{{{', '.join(map(json.dumps, keys))}}})")
    return segments(dict(zip(PAIR_KEYS if len(keys) == 4 else SFT_KEYS, (row[key] for key in keys))))


def _render(row, task, template, ids, where, cap):
    """(prompt pieces, [answer pieces]) of a raw row. Strings are cut to `cap` characters as truncation
    cuts tokens: an answer keeps its beginning (and loses its end token), a prompt message its end."""
    prompt, answers, train_assistant = _parse(row, task, where)
    end = ids["eot"] if prompt is None else ids["end"]  # None: a {"text"} row, every token trained
    answers = [[(a[:cap], True)] + [(end, True)] * (len(a) <= cap) for a in answers]
    if prompt is None:
        return [], answers
    prompt = [dict(m, content=m["content"][-cap:]) for m in prompt]
    return _prompt_pieces(prompt, template, ids, train_assistant, where), answers


def _note(reason, wheres, settings):
    """'filtered 2 rows with ... (lines 3, 9); raise ...': how many, why, the first line numbers, the fix."""
    n, numbers = len(wheres), [where.rsplit(":", 1)[-1] for where in wheres[:3]] + ["..."] * (len(wheres) > 3)
    note = f"filtered {n} row{'s' * (n > 1)} {reason} (line{'s' * (n > 1)} {', '.join(numbers)})"
    return (note + f"; to keep such rows, {FILTERS[reason]}" * bool(FILTERS[reason])).format(**settings)


def make_examples(rows, tokenizer, task, fmt="raw", template="chatml", max_length=512, max_prompt_length=256,
                  source="data"):
    """Rows [(where, dict)] from read_jsonl -> (examples, report lines to print). task: sft | preference |
    prompted_preference; fmt: raw (text, tokenized with the chat template) | processed (ids and labels)."""
    filtered = {reason: [] for reason in FILTERS}  # reason -> the where of every row it dropped
    ids = _template_ids(tokenizer, template) if fmt == "raw" else None
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1  # ids may have gaps: the largest + 1
    parsed, places = [], []
    for where, row in rows:
        try:
            if isinstance(row, TooLong):
                raise _Filtered(TOO_LONG)
            parsed.append(_processed(row, task, where, vocab_size) if fmt == "processed" else
                          _render(row, task, template, ids, where, CHARS_PER_TOKEN * max_length))
            places.append(where)
        except _Filtered as reason:
            filtered[str(reason)].append(where)
    examples, cut = [], 0
    for where, (prompt, answers) in zip(places, parsed if fmt == "processed" else _tokenize(parsed, tokenizer)):
        prompt, answers, was_cut = truncate(prompt, answers, max_length, max_prompt_length)
        example = make_example(prompt, answers)
        if any(labels.count(IGNORE_INDEX) == len(labels) for _, labels in rows_of(example)):  # no label tokens
            filtered[EMPTY_LABELS].append(where)
        elif len(answers) == 2 and answers[0] == answers[1]:
            filtered[IDENTICAL_CUT if was_cut else IDENTICAL].append(where)
        else:
            cut += was_cut
            examples.append(example)
    settings = dict(bound=max(1 << 20, 64 * max_length), max_length=max_length, max_prompt_length=max_prompt_length)
    notes = [_note(reason, wheres, settings) for reason, wheres in filtered.items() if wheres]
    unit = "row" if task == "sft" else "pair"
    if not examples:
        raise DataError(f"{source}: no usable {unit}s left: {'; '.join(notes) or 'no rows'}")
    kept = f"{len(examples)} {unit}{'s' * (len(examples) != 1)} ({cut} truncated to data.max_length={max_length})"
    return examples, [f"[data] {source}: {line}" for line in notes + [kept]]
