"""chat: answers are what model.generate makes from data.prompt_ids of the conversation so far, printed
as they are made; /reset, /exit, end of input and Ctrl-C end cleanly; bad settings are one line."""
import builtins
import io

import pytest
from conftest import tiny_base
import torch

from minorpo import chat, data, lora, tiny
from minorpo.checkpoint import load_model

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_base(str(tmp_path_factory.mktemp("chat") / "tiny-base"))


def expected_answer(folder, messages, max_new_tokens=MAX_NEW, model=None):
    """The greedy answer to a message list, made here without the chat command."""
    model = model or load_model(folder)
    tokenizer = data.load_tokenizer(folder)
    stop_ids, _ = data.stop_and_pad_ids(tokenizer, "chatml")
    new = model.generate(data.prompt_ids(tokenizer, messages), max_new_tokens, stop_ids)
    return tokenizer.decode([i for i in new if i not in stop_ids])


def printed(*answers):
    """The answers, one per line, as a text-mode pipe reads them (universal newlines: \\r and \\r\\n are \\n)."""
    return "".join(a + "\n" for a in answers).replace("\r\n", "\n").replace("\r", "\n")


def user(text):
    return {"role": "user", "content": text}


def chat_args(folder, *more):
    return ["-m", "minorpo.chat", folder, "--max-new-tokens", str(MAX_NEW), *more]


def test_prompt_is_answered_once_greedily_and_deterministically(tiny_model, run_limited):
    p = run_limited(chat_args(tiny_model, "--prompt", "Sort: 3 1 2"))  # another process: same greedy answer
    assert p.returncode == 0, p.stderr
    answer = expected_answer(tiny_model, [user("Sort: 3 1 2")])
    assert answer.strip() and p.stdout == printed(answer)


def test_answer_is_printed_piece_by_piece_as_tokens_are_made(tiny_model, monkeypatch):
    writes = []
    monkeypatch.setattr(builtins, "print", lambda text="", end="\n", **_: writes.append(text + end))
    chat.main([tiny_model, "--prompt", "Repeat: cat dog", "--max-new-tokens", str(MAX_NEW)])
    answer = expected_answer(tiny_model, [user("Repeat: cat dog")])
    assert "".join(writes) == answer + "\n"
    assert len([w for w in writes if w]) > 1


def run_chat(run_limited, tmp_path, args, stdin):
    """run_limited(args) with `stdin` as standard input: run_limited has no stdin of its own, so a small
    wrapper points file descriptor 0 at a file before it runs the chat module."""
    path = tmp_path / "stdin.txt"
    path.write_text(stdin)
    wrapper = ("import os, runpy, sys; os.dup2(os.open(sys.argv[1], os.O_RDONLY), 0); sys.argv[1:2] = []; "
               "runpy.run_module('minorpo.chat', run_name='__main__')")
    return run_limited(["-c", wrapper, str(path), *args[2:]])


def test_conversation_keeps_history_until_reset_and_stops_at_exit(tiny_model, run_limited, tmp_path):
    stdin = "Repeat: cat dog\nSort: 3 1 2\n/reset\n\nReverse: owl bee\n/exit\nSort: 9 8\n"
    p = run_chat(run_limited, tmp_path, chat_args(tiny_model, "--system", "Be brief."), stdin)
    assert p.returncode == 0, p.stderr
    model, system = load_model(tiny_model), {"role": "system", "content": "Be brief."}
    first = expected_answer(tiny_model, [system, user("Repeat: cat dog")], model=model)
    second = expected_answer(tiny_model, [system, user("Repeat: cat dog"), {"role": "assistant", "content": first},
                                          user("Sort: 3 1 2")], model=model)
    third = expected_answer(tiny_model, [system, user("Reverse: owl bee")], model=model)
    assert p.stdout == printed(first, second, third)  # nothing for the blank line, nothing after /exit
    assert "a new conversation" in p.stderr


def test_end_of_input_exits_cleanly(tiny_model, run_limited, tmp_path):
    p = run_chat(run_limited, tmp_path, chat_args(tiny_model), "Sort: 2 1\n")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert p.stdout == printed(expected_answer(tiny_model, [user("Sort: 2 1")]))


def test_ctrl_c_exits_quietly_with_code_130(tiny_model, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(chat, "read_message", interrupted)
    with pytest.raises(SystemExit) as stop:
        chat.main([tiny_model])
    assert stop.value.code == 130


def test_oldest_exchanges_are_dropped_to_fit_the_context(tiny_model, run_limited, tmp_path):
    # the tiny model has 512 positions; a message of 300 words fits alone, two do not, 600 never fit
    long_one, long_two, too_long = "cat " * 300, "dog " * 300, "owl " * 600
    p = run_chat(run_limited, tmp_path, chat_args(tiny_model), f"{long_one}\n{long_two}\n{too_long}\n")
    assert p.returncode == 0, p.stderr
    assert "[chat] dropped the oldest 1 exchange(s) to fit 512 positions" in p.stderr
    assert "error: the message does not fit the model's 512 positions" in p.stderr
    model = load_model(tiny_model)
    assert p.stdout == printed(expected_answer(tiny_model, [user(long_one)], model=model),
                               expected_answer(tiny_model, [user(long_two)], model=model))  # answered alone


def test_adapter_is_merged_into_the_model(tiny_model, run_limited, tmp_path):
    model = load_model(tiny_model)
    lora.inject_lora(model, rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0, 3.0, generator=torch.Generator().manual_seed(0))  # enough to change the answer
    lora.save_adapter(model, str(tmp_path / "adapter"), base_model_name=tiny_model)
    p = run_limited(chat_args(tiny_model, "--adapter", str(tmp_path / "adapter"), "--prompt", "Sort: 3 1 2"))
    assert p.returncode == 0, p.stderr
    merged = expected_answer(tiny_model, [user("Sort: 3 1 2")], model=lora.merge_lora(model))
    assert p.stdout == printed(merged) != printed(expected_answer(tiny_model, [user("Sort: 3 1 2")]))


@pytest.mark.parametrize("setting, needle", [
    (["--temperature", "-1"], "--temperature -1.0"), (["--temperature", "101"], "--temperature 101.0"),
    (["--temperature", "nan"], "--temperature nan"), (["--temperature", "1e-300"], "[0.01, 100]"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"), (["--top-p", "0"], "--top-p 0.0"),
    (["--top-p", "1.5"], "--top-p 1.5"), (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--template", "raw", "--system", "hi"], "--system"),
])
def test_bad_setting_is_refused_in_one_line_naming_it(setting, needle):
    with pytest.raises(chat.ChatError, match="^[^\\n]*$") as error:
        chat.parse_args(["model", *setting])
    assert needle in str(error.value)


def test_a_wrong_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        chat.parse_args(["model", "--top-p", "lots"])
    assert "--top-p" in str(e.value.code) and "\n" not in str(e.value.code) and capsys.readouterr().err == ""


def test_command_line_bytes_that_are_not_utf8_become_replacement_characters():
    assert chat.parse_args(["model", "--prompt", "caf\udce9"]).prompt == "caf\ufffd"


def test_a_piped_line_too_long_is_skipped_and_reading_goes_on(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 250 + "\nhello\n"))
    assert [chat.read_message(False, limit=100) for _ in range(3)] == ["", "hello", None]
    assert "at most 100 characters" in capsys.readouterr().err


def test_bad_settings_and_folders_stop_the_command_with_one_line(tiny_model, run_many, one_line_error, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {  # name: (arguments, what the error line names)
        "top-p": ([tiny_model, "--top-p", "2"], ["--top-p 2.0"]),
        "no room": ([tiny_model, "--max-new-tokens", "512"], ["512 positions"]),
        "no folder": ([str(tmp_path / "nothing")], ["nothing"]),
        "empty folder": ([str(tmp_path / "empty")], ["config.json"]),
        "empty adapter": ([tiny_model, "--adapter", str(tmp_path / "empty")], ["--adapter", "adapter_config.json"]),
    }
    results = run_many({name: ["-m", "minorpo.chat", *args, "--prompt", "hi"] for name, (args, _) in cases.items()})
    for name, (_, needles) in cases.items():
        one_line_error(results[name], *needles)
