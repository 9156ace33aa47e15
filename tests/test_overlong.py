"""data.overlong: truncate (the default, batches.truncate) or drop the pairs that do not fit data.max_length."""
import pytest
from test_data import CHATML, PAIR, build_tokenizer, enc, make

from minorpo.data import CHARS_PER_TOKEN, DataError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_drop_skips_the_pairs_that_do_not_fit_and_reports_them_by_line(tok):
    (ex,), _ = make(tok, PAIR, max_length=2048)
    n = max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))  # prompt + the longer answer
    long = dict(PAIR, chosen="The answer is four, not five. " * 4)
    rows = [PAIR, long, PAIR, long, long, long]
    kept, report = make(tok, *rows, max_length=n, max_prompt_length=n - 2, overlong="drop")
    assert kept == [ex, ex]  # exactly max_length fits, untouched
    assert report[0] == (f"[data] data: filtered 4 rows that do not fit data.max_length={n} (data.overlong=drop) "
                         "(lines 2, 4, 5, ...); to keep such rows, raise data.max_length or set data.overlong=truncate")
    assert report[-1] == f"[data] data: 2 pairs (0 truncated to data.max_length={n})"
    with pytest.raises(DataError, match="filtered 3 rows that do not fit"):  # one token less: none fits
        make(tok, PAIR, long, PAIR, max_length=n - 1, max_prompt_length=n - 3, overlong="drop")
    # the same rows under truncate (the default): all kept, the four long ones cut
    kept, report = make(tok, *rows, max_length=n, max_prompt_length=n - 2)
    assert len(kept) == 6 and report == [f"[data] data: 6 pairs (4 truncated to data.max_length={n}, lines 2, 4, 5, ...; "
                                        "raise data.max_length to keep them whole)"]


def test_drop_also_skips_text_cut_before_tokenizing_and_processed_rows(tok):
    cut_exactly = "Four." * (CHARS_PER_TOKEN * 512 // 5 + 1)  # over the text cap, yet short in tokens
    long = dict(PAIR, chosen="The answer is four, not five. " * 80)  # over 512 tokens, under the text cap
    kept, report = make(tok, PAIR, long, dict(PAIR, chosen=cut_exactly), max_length=512, overlong="drop")
    assert len(kept) == 1
    assert report[0].startswith("[data] data: filtered 2 rows that do not fit data.max_length=512 (data.overlong=drop) "
                                "(lines 2, 3)")
    processed, _ = make(tok, PAIR, long, max_length=2048)
    n = max(len(processed[0]["chosen_input_ids"]), len(processed[0]["rejected_input_ids"]))
    kept, report = make(tok, *processed, fmt="processed", max_length=n, max_prompt_length=n - 2, overlong="drop")
    assert kept == processed[:1] and "filtered 1 row that do not fit" in report[0] and "(line 2)" in report[0]


def test_dropping_every_pair_is_an_error_naming_the_setting(tok):
    with pytest.raises(DataError, match=r"no usable pairs left: filtered 1 row that do not fit data.max_length=8 "
                                        r"\(data.overlong=drop\) \(line 1\); to keep such rows"):
        make(tok, PAIR, max_length=8, max_prompt_length=4, overlong="drop")
