"""Data files in, checked: JSONL lines, the row layouts of data.task, messages and HH transcripts, processed rows.

data.py turns a row into ids and labels; this module reads and checks what it is given first, so data.py
holds the idea alone. Each problem is one line naming the file, the line and the fix:
- A malformed line is one line of error: `file:line`, the problem, the layout expected (LAYOUTS; a prompt
  or answer may be messages or an HH "Human: ... Assistant: ..." transcript, see turns).
- Memory and time follow max_length, not the file: a line over max(1 MiB, 64 bytes x max_length) is skipped
  unread (TooLong) and reported.
- Rows with no label tokens after truncation, an empty response, or chosen equal to rejected (as text, or
  as tokens after truncation) are dropped (Dropped, a key of FILTERS) and reported by line: 0/0 = NaN;
  identical answers are noise. report() writes the [data] lines.
"""
import json
import os
import re

from tokenizers import Tokenizer

from minorpo.batches import IGNORE_INDEX, PAIR_KEYS, SFT_KEYS, first_trained, segments
from minorpo.files import UserError, file_inside

LAYOUTS = {"sft": '{"prompt", "response"}, {"text"}, {"messages"} or {"prompt", "chosen", "rejected"}',
           "prompted_preference": '{"prompt", "chosen", "rejected"}',
           "preference": '{"chosen", "rejected"} and optionally "prompt"'}
ROLES = ("system", "user", "assistant")  # system only as the first message; chatml here has no tool turns
BY_LENGTH = "raise data.max_length (now {max_length}) or lower data.max_prompt_length (now {max_prompt_length})"
BY_BYTES = "shorten them or raise data.max_length (now {max_length}; the bound is max(1 MiB, 64 bytes x it))"
FILTERS = {  # why a well-formed row is dropped -> how to keep such rows ("" if nothing would)
    "longer than {bound} bytes": BY_BYTES,
    "with an empty response": "", "with identical chosen and rejected": "",
    "with empty labels (response truncated to 0 tokens)": BY_LENGTH,
    "with chosen and rejected identical after truncation": BY_LENGTH}
TOO_LONG, EMPTY_RESPONSE, IDENTICAL, EMPTY_LABELS, IDENTICAL_CUT = FILTERS
OVERLONG = "that do not fit data.max_length={max_length} (data.overlong=drop)"  # data.make_examples drops them
FILTERS[OVERLONG] = "raise data.max_length or set data.overlong=truncate"


class DataError(UserError):
    """A problem with the data or the tokenizer; the message names the file, the line and the fix."""


class TooLong(dict):
    """read_jsonl's row for a line over the bound: empty, never parsed, counted where it stands."""


class Dropped(Exception):
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


def read_jsonl(path, max_length=512, task=None, fmt="raw"):
    """Every non-blank line of a JSONL file as ("path:line", dict); one over the bound, never held whole, is TooLong.
    Given data.task, each row's layout is checked as it is read: a bad file stops at its first bad row."""
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
                if task:
                    check_layout(rows[-1][1], task, fmt, rows[-1][0])
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or blank); expected one JSON object a line")
    return rows


def _required(row, task, fmt, pairs=False):
    """The fields a row needs under data.task and data.format; under sft, its own keys choose the layout."""
    if fmt == "processed":
        return PAIR_KEYS if task != "sft" or pairs else PAIR_KEYS[:2] if "chosen_input_ids" in row else SFT_KEYS
    if task != "sft":
        return ("prompt",) * (task == "prompted_preference") + ("chosen", "rejected")
    if "chosen" in row:
        return "chosen", "rejected"
    return () if {"text", "messages"} & set(row) else ("prompt", "response")


def _did_you_mean(row, task, fmt, missing):
    """The setting (or field name) that fits a row whose layout data.task or data.format does not: '' if none."""
    keys, ids, text = set(row), {"input_ids", "chosen_input_ids"}, {"prompt", "chosen", "response", "text", "messages"}
    pairs = {"chosen", "rejected"} <= keys or {"chosen_input_ids", "rejected_input_ids"} <= keys
    if fmt == "raw" and keys & ids and not keys & text:
        return "data.format=processed (these rows hold token ids)"
    if fmt == "processed" and keys & text and not keys & ids:
        return "data.format=raw (these rows hold text)"
    if task == "prompted_preference" and pairs and missing == "prompt":
        return "data.task=preference (it takes the shared beginning of chosen and rejected as the prompt)"
    if task != "sft" and not pairs and keys & {"response", "text", "messages", "input_ids"}:
        return "presets/sft.yml (training.type=sft data.task=sft): these rows have no rejected answer"
    alias = next((k for k in ("completion", "output", "answer") if k in keys), None)
    return f'"response" for the field "{alias}"' if missing == "response" and alias else ""


def check_layout(row, task, fmt, where, pairs=False):
    """A row missing a field of its layout is one line naming the field, the layout and, if another setting
    fits the row, that setting: 'did you mean data.task=preference?'."""
    if isinstance(row, TooLong):
        return
    missing = next((key for key in _required(row, task, fmt, pairs) if key not in row), None)
    if missing:
        expected = (f"task {task} expects {LAYOUTS[task]}" if fmt == "raw" else f"task {task} with data.format="
                    f"processed expects {{{', '.join(map(json.dumps, _required(row, task, fmt, pairs)))}}}")
        hint = _did_you_mean(row, task, fmt, missing)
        raise DataError(f'{where}: missing field "{missing}" ({expected})' + f"; did you mean {hint}?" * bool(hint))


def turns(row, key, where, expected, role):
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
    """(prompt messages, answer texts) of a row whose answers are under `keys`; an empty answer is Dropped."""
    prompt = []
    if prompt_required or "prompt" in row:
        prompt = turns(row, "prompt", where, expected, "user")
        if not any(m["content"].strip() for m in prompt):
            raise DataError(f'{where}: field "prompt" is empty ({expected})')
    answers = [turns(row, key, where, expected, "assistant") for key in keys]
    for key, answer in zip(keys, answers):
        if answer[-1]["role"] != "assistant":
            raise DataError(f'{where}: "{key}" must end with an "assistant" turn, got "{answer[-1]["role"]}"')
    context = answers[0][:-1]  # a transcript's turns before its answer are the prompt
    if any(answer[:-1] != context for answer in answers):
        raise DataError(f'{where}: "{keys[0]}" and "{keys[1]}" must have the same turns before their last one')
    if context and prompt and context[-len(prompt):] != prompt:
        raise DataError(f'{where}: "prompt" differs from the turns before the answer in "{keys[0]}"')
    if not all(answer[-1]["content"].strip() for answer in answers):
        raise Dropped(EMPTY_RESPONSE)
    return context or prompt, [answer[-1]["content"] for answer in answers]


def parse(row, task, where, pairs=False):
    """(prompt messages or None for plain text, answer texts, whether earlier assistant turns train) of a
    raw row under data.task; a malformed row is a DataError, one that cannot be trained on is Dropped.
    pairs: an sft row's rejected answer is kept too (the held-out pairs of an SFT run)."""
    if isinstance(row, TooLong):
        raise Dropped(TOO_LONG)
    check_layout(row, task, "raw", where, pairs)
    expected = f"task {task} expects {LAYOUTS[task]}"
    if task != "sft" or "chosen" in row:  # a preference row under sft trains on the chosen answer
        prompt, answers = _dialogue(row, ("chosen", "rejected"), where, expected, task == "prompted_preference")
        if answers[0] == answers[1]:
            raise Dropped(IDENTICAL)
        if not prompt:  # their shared beginning, cut back to a whitespace boundary (no split word)
            shared = os.path.commonprefix(answers)  # not a regex: linear time even on a long shared run
            if not shared[-1:].isspace():  # it may end inside a word: leave that word to the responses
                shared = shared[:len(shared) - len((shared.split() or [""])[-1])]
            cut = len(shared.rstrip())
            if not cut:
                raise DataError(f'{where}: "chosen" and "rejected" share no beginning to use as the prompt; '
                                f'add a "prompt" field ({expected})')
            prompt, answers = [{"role": "user", "content": answers[0][:cut]}], [a[cut:] for a in answers]
        return prompt, answers[:1] if task == "sft" and not pairs else answers, False
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f'{where}: field "text" must be a non-empty string ({expected})')
        return None, [row["text"]], False
    key = "messages" if "messages" in row else "response"  # a conversation: every assistant turn trains
    return (*_dialogue(row, (key,), where, expected, key == "response"), key == "messages")


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
        if (t := next((t for t, i in enumerate(ids) if not 0 <= i < vocab_size), None)) is not None:
            return (f'"{ids_key}"[{t}] = {ids[t]} is outside the vocabulary (0 to {vocab_size - 1}); '
                    "was it tokenized with another tokenizer?")
        t = next((t for t, (i, label) in enumerate(zip(ids, labels)) if label not in (i, IGNORE_INDEX)), None)
        if t is not None:
            return f'"{labels_key}"[{t}] = {labels[t]} must be {IGNORE_INDEX} or the id at that position ({ids[t]})'
    start = min(first_trained(example[key]) for key in keys[1::2])
    if any(example[key][:start] != example[keys[0]][:start] for key in keys[0::2]):
        return (f"chosen and rejected must start with the same prompt ids (the positions labelled "
                f"{IGNORE_INDEX} before the first trained token)")
    return None


def processed(row, task, where, vocab_size, pairs=False):
    """(prompt (ids, labels), [answer (ids, labels)]) of a pre-tokenized row (data.format=processed), checked."""
    if isinstance(row, TooLong):
        raise Dropped(TOO_LONG)
    check_layout(row, task, "processed", where, pairs)
    keys = _required(row, task, "processed", pairs)
    if problem := example_problem(row, keys, vocab_size):
        raise DataError(f"{where}: {problem} (task {task} with data.format=processed expects "
                        f"{{{', '.join(map(json.dumps, keys))}}})")
    return segments(dict(zip(PAIR_KEYS if len(keys) == 4 else SFT_KEYS, (row[key] for key in keys))))


def eval_pairs(task, eval_rows):
    """Whether the held-out rows are scored as pairs: always under ORPO's tasks, and under sft when every one
    is a pair, parsed as sft parses it (an SFT run on preference rows still watches the rejected answers:
    paper, Fig. 7); other sft rows are scored as SFT rows."""
    return task != "sft" or all("rejected" in row or "rejected_input_ids" in row for _, row in eval_rows
                                if not isinstance(row, TooLong))


def _lines(wheres):
    """'line 3' or 'lines 3, 9, 12, ...': the first line numbers of "path:line" places."""
    numbers = [where.rsplit(":", 1)[-1] for where in wheres[:3]] + ["..."] * (len(wheres) > 3)
    return f"line{'s' * (len(wheres) > 1)} {', '.join(numbers)}"


def _note(reason, wheres, settings):
    """'filtered 2 rows with ... (lines 3, 9); raise ...': how many, why, the first line numbers, the fix."""
    n = len(wheres)
    note = f"filtered {n} row{'s' * (n > 1)} {reason} ({_lines(wheres)})"
    return (note + f"; to keep such rows, {FILTERS[reason]}" * bool(FILTERS[reason])).format(**settings)


def report(dropped, examples, cut, task, source, max_length, max_prompt_length, pairs=False):
    """The [data] lines of make_examples: each filter's rows with their fix, then what is kept with the first
    lines truncation shortened and the fix (a DataError if nothing is kept). dropped: {reason: [where, ...]};
    cut: [where] of the kept examples that truncation shortened."""
    settings = dict(bound=max(1 << 20, 64 * max_length), max_length=max_length, max_prompt_length=max_prompt_length)
    notes = [_note(reason, wheres, settings) for reason, wheres in dropped.items() if wheres]
    unit = "row" if task == "sft" and not pairs else "pair"
    if not examples:
        raise DataError(f"{source}: no usable {unit}s left: {'; '.join(notes) or 'no rows'}")
    where = f", {_lines(cut)}; raise data.max_length to keep them whole" if cut else ""
    kept = f"{len(examples)} {unit}{'s' * (len(examples) != 1)} ({len(cut)} truncated to data.max_length="
    return [f"[data] {source}: {line}" for line in notes + [f"{kept}{max_length}{where})"]]
