"""The README's Hugging Face rows (UltraFeedback-binarized: prompt, and chosen and rejected as message lists)
are read as they are, and give the same example as the plain-string row."""
import json

from test_data import build_tokenizer

from minorpo.data import make_examples, read_jsonl

PROMPT, GOOD, BAD = "What is two plus two?", "Four.", "Five."


def conversation(answer):
    return [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}]


def test_ultrafeedback_binarized_rows_are_read_as_they_are(tmp_path):
    path = tmp_path / "ultrafeedback.jsonl"
    with open(path, "w") as f:  # what the README's datasets lines write: the three columns, one row a line
        f.write(json.dumps({"prompt": PROMPT, "chosen": conversation(GOOD), "rejected": conversation(BAD)}) + "\n")
    tok = build_tokenizer()
    plain, _ = make_examples([("x:1", {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD})], tok, "prompted_preference")
    examples, report = make_examples(read_jsonl(str(path)), tok, "prompted_preference", source=str(path))
    assert examples == plain and report == [f"[data] {path}: 1 pair (0 truncated to data.max_length=512)"]
    # without the prompt column (data.task: preference) the turns before the answers are the prompt
    row = [("x:1", {"chosen": conversation(GOOD), "rejected": conversation(BAD)})]
    assert make_examples(row, tok, "preference")[0] == plain
