"""Talk to a model: a ChatML conversation in the terminal, the answer printed token by token as it is made.

    python -m minorpo.chat outputs/orpo/final                          # type; /reset, /exit, Ctrl-D
    python -m minorpo.chat outputs/orpo/final --prompt "Reverse: red fox oak"   # one answer, then exit
    python -m minorpo.chat Qwen/Qwen3-0.6B --adapter outputs/qwen3-0.6b-lora-orpo/final/adapter \\
        --system "Answer briefly." --temperature 0.7 --top-p 0.9 --max-new-tokens 256

Decisions:
- Prompts are rendered by data.prompt_ids, as the training prompts were, so the model is asked in the
  format it was trained on; generation stops at the template's stop ids. template=raw has no turns.
- Each turn renders the whole conversation again: one forward pass fills the KV cache, then each new token
  costs one position. Keeping the cache across turns would save that pass, but dropping old turns (to fit
  max_position_embeddings; the system text stays) would rebuild it anyway. A message too long alone is refused.
- Streaming: the answer is decoded again after every token and only the new text printed; a token that
  ends inside a character (byte-level BPE splits UTF-8) waits for the next one.
- Sampling as in a preset's sample section, from one generator seeded by --seed; bf16 on CUDA, fp32 on the
  CPU, as train.py. A LoRA adapter (train.py's final/adapter) is loaded onto its base model and merged.
"""
import argparse
import math
import os
import re
import sys

import torch
from safetensors import SafetensorError

from minorpo import checkpoint, data, lora
from minorpo.files import UserError, file_inside, read_json, read_tensors, read_yaml, safetensors_header

HELP = "[chat] /reset starts a new conversation, /exit or Ctrl-D ends it"


class ChatError(UserError):
    """A bad setting or folder given to the chat command; the message names it and the fix."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m minorpo.chat", description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message} (python -m minorpo.chat --help lists the arguments)")
    parser.add_argument("model", help="a checkpoint folder (outputs/orpo/final) or a cached Hugging Face id")
    parser.add_argument("--adapter", help="a LoRA adapter folder to merge into the model (PEFT layout)")
    parser.add_argument("--system", help="a system message that starts every conversation")
    parser.add_argument("--prompt", help="answer this one message and exit, instead of a conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens (256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, else in [0.01, 100] (0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from this much probability (1.0)")
    parser.add_argument("--template", choices=("chatml", "raw"), default="chatml", help="as data.template")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if seen")
    args = parser.parse_args(argv)
    if not (args.temperature == 0 or 0.01 <= args.temperature <= 100):  # below 0.01 logits/T overflow
        raise ChatError(f"--temperature {args.temperature}: use 0 (greedy) or a value in [0.01, 100]")
    if not 0 < args.top_p <= 1:
        raise ChatError(f"--top-p {args.top_p}: use a value in (0, 1]; 1 samples from every token")
    if not 0 <= args.seed < 2**63:
        raise ChatError(f"--seed {args.seed}: use an integer in [0, 2**63)")
    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens {args.max_new_tokens}: use 1 or more")
    if args.system and args.template == "raw":
        raise ChatError("--system needs --template chatml; a raw prompt has no system turn")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: torch sees no CUDA GPU; use --device auto or cpu")
    for name in ("system", "prompt"):  # bytes that were not UTF-8 on the command line become U+FFFD
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return args


def load_adapter(model, folder, model_folder=None):
    """Wrap the layers a PEFT-layout adapter folder (train.py's final/adapter) names and load its weights.
    Returns the wrapped layer names. Every file is read inside the folder, with a checked header, and every
    field and shape checked first; an adapter made for another model folder than model_folder is refused."""
    fix = "an adapter folder holds adapter_config.json and adapter_model.safetensors, as train.py writes them"
    config_path = file_inside(folder, "adapter_config.json", "adapter config")
    config = read_json(config_path, fix)
    if model_folder:
        check_base(folder, config.get("base_model_name_or_path"), model_folder)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if type(r) is not int or not 1 <= r <= 1 << 16 or type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise ChatError(f"{config_path}: r must be a whole number from 1 and lora_alpha a finite number, got "
                        f"r={r!r:.30}, lora_alpha={alpha!r:.30}; {fix}")
    path = file_inside(folder, "adapter_model.safetensors", "adapter weights")
    shapes, linears = safetensors_header(path, fix), dict(model.named_modules())
    pattern = re.compile(re.escape(lora.PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")
    for key, shape in shapes.items():  # each names a linear layer of this model, in the shape r implies
        match = pattern.fullmatch(key)
        base = linears.get(match[1]) if match else None
        if not isinstance(base, torch.nn.Linear):
            raise ChatError(f"{path}: tensor {key!r:.100} is not the LoRA weight of a linear layer of this model")
        want = [r, base.in_features] if match[2] == "A" else [base.out_features, r]
        if list(shape) != want or f"{lora.PEFT_PREFIX}{match[1]}.lora_{'BA'[match[2] == 'B']}.weight" not in shapes:
            raise ChatError(f"{path}: tensor {key} has shape {list(shape)}, but r={r} and the layer imply {want}, "
                            "with its lora_A and lora_B pair")
    names = sorted({key[len(lora.PEFT_PREFIX):].rsplit(".lora_", 1)[0] for key in shapes})
    for name in names:
        layer = lora.LoRALinear(model.get_submodule(name), config["r"], config["lora_alpha"],
                                group=lora._group_of(name))
        lora._replace(model, name, layer)
        tensors = dict(read_tensors(path, [f"{lora.PEFT_PREFIX}{name}.lora_{x}.weight" for x in "AB"]))
        with torch.no_grad():
            layer.lora_A.copy_(tensors[f"{lora.PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"{lora.PEFT_PREFIX}{name}.lora_B.weight"])
    return names


def check_base(folder, base, model_folder):
    """Refuse an adapter given to a model that already holds it merged (train.py's final/ and its adapter/),
    or to another model folder than the base its adapter_config.json names, when that folder exists."""
    real = os.path.realpath(model_folder)
    if os.path.dirname(os.path.realpath(folder)) == real:
        raise ChatError(f"{model_folder} already holds this adapter, merged (train.py writes final/ merged, the "
                        "adapter alone in adapter/); drop --adapter, or give the base model it names in "
                        "adapter_config.json")
    if isinstance(base, str) and os.path.isdir(base) and os.path.realpath(base) != real:
        raise ChatError(f"it was trained on {base} (base_model_name_or_path in adapter_config.json), not on "
                        f"{model_folder}; give that model folder, or drop --adapter")


def load(args):
    """(model, tokenizer) for args.model, with args.adapter merged in, in eval mode on its device."""
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    model = checkpoint.load_model(args.model, torch.bfloat16 if on_cuda else torch.float32,
                                  "cuda" if on_cuda else "cpu")
    tokenizer = data.load_tokenizer(checkpoint.resolve(args.model))
    needed = ("<|im_start|>", "<|im_end|>", "<|endoftext|>") if args.template == "chatml" else ("<|endoftext|>",)
    if missing := [token for token in needed if tokenizer.token_to_id(token) is None]:
        fix = "use --template raw (prompt + answer, for a base model)" if args.template == "chatml" else \
            "a raw prompt ends at it; this tokenizer belongs to no model chat can talk to"
        raise ChatError(f"{checkpoint.resolve(args.model)}/tokenizer.json: no {missing[0]} token, which "
                        f"--template {args.template} needs; {fix}")
    if args.max_new_tokens >= model.config.max_position_embeddings:
        raise ChatError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                        f"{model.config.max_position_embeddings} positions; lower it")
    checkpoint.check_fits(model, tokenizer, args.model, 1, 0)  # the tokenizer's ids within the embeddings
    if args.adapter:
        try:
            load_adapter(model, args.adapter, checkpoint.resolve(args.model))
        except ChatError as e:
            raise ChatError(f"--adapter {args.adapter}: {e}") from None
        except (ValueError, OSError, KeyError, TypeError, AttributeError, SafetensorError) as e:
            raise ChatError(f"--adapter {args.adapter}: {e}; is it an adapter of {args.model}?") from None
        lora.merge_lora(model)
    return model.eval(), tokenizer


def fit(tokenizer, system, turns, room, template):
    """The prompt ids of the conversation, its oldest exchanges dropped until it fits `room` positions.
    turns: [user, assistant, ..., user] messages. Returns (ids, exchanges dropped), ids None if the
    last message alone does not fit."""
    head = [{"role": "system", "content": system}] if system else []
    for start in range(0, len(turns), 2):  # keep the turns from a user message on
        ids = data.prompt_ids(tokenizer, head + turns[start:], template)
        if len(ids) <= room:
            return ids, start // 2
    return None, 0


def reply(model, tokenizer, prompt_ids, args, stop_ids, generator):
    """Generate an answer to prompt_ids, printing it as it grows; returns its text."""
    answer_ids, shown = [], ""

    def show(token_id):
        nonlocal shown
        if token_id not in stop_ids:
            answer_ids.append(token_id)
        text = tokenizer.decode(answer_ids)
        if not text.endswith("\ufffd"):  # a character cut between two tokens waits for its next byte
            print(text[len(shown):], end="", flush=True)
            shown = text
    model.generate(prompt_ids, args.max_new_tokens, stop_ids, args.temperature, args.top_p, generator,
                   on_token=show)
    text = tokenizer.decode(answer_ids)
    print(text[len(shown):], flush=True)
    return text


def read_message(interactive, limit=1 << 20):
    """One line of input, or None at its end. A piped line longer than `limit` characters is read to its
    end in pieces and replaced by "" with a warning, so that memory stays bounded."""
    if interactive:  # the terminal bounds a line; input() gives line editing
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline(limit)
    if not line:
        return None
    if len(line) == limit and not line.endswith("\n"):
        while (rest := sys.stdin.readline(limit)) and not rest.endswith("\n"):
            pass
        print(f"error: a message is at most {limit:,} characters; this one was skipped", file=sys.stderr)
        return ""
    return line.rstrip("\n")


def single_turn_note(model_folder):
    """A note for a model trained only on single turns (the embedded demo's pairs, as its final/config.yml
    says), shown once, when a conversation reaches its second turn; None for any other model."""
    try:
        tree = read_yaml(file_inside(model_folder, "config.yml"))[0] if os.path.lexists(
            os.path.join(model_folder, "config.yml")) else {}
    except UserError:  # not train.py's config.yml: nothing to say about the data
        return None
    if isinstance(tree.get("data"), dict) and tree["data"].get("path") in ("tiny", "tiny-lengths"):
        return (f"[chat] {model_folder} was trained on single-turn pairs (the embedded demo's, data.path: tiny): "
                "answers to later turns are outside its training; /reset starts a new conversation")
    return None


def converse(model, tokenizer, args):
    """Answer args.prompt once, or read messages from stdin until /exit or end of input."""
    stop_ids, _ = data.stop_and_pad_ids(tokenizer, args.template)
    context = model.config.max_position_embeddings
    room, generator, turns = context - args.max_new_tokens, torch.Generator().manual_seed(args.seed), []
    note = single_turn_note(checkpoint.resolve(args.model))

    def answer(message):
        nonlocal note
        if args.template == "raw":  # no turns: every message stands alone
            turns.clear()
        if turns and note:  # a second turn, to a model that never saw one: said once
            print(note, file=sys.stderr)
            note = None
        turns.append({"role": "user", "content": message})
        ids, dropped = fit(tokenizer, args.system, turns, room, args.template)
        if ids is None:
            turns.pop()
            raise ChatError(f"the message does not fit the model's {context} positions with --max-new-tokens "
                            f"{args.max_new_tokens} kept for the answer; shorten it or lower --max-new-tokens")
        if dropped:
            print(f"[chat] dropped the oldest {dropped} exchange(s) to fit {context} positions", file=sys.stderr)
            del turns[:2 * dropped]
        turns.append({"role": "assistant", "content": reply(model, tokenizer, ids, args, stop_ids, generator)})

    if args.prompt is not None:
        return answer(args.prompt)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        message = read_message(interactive)
        if message is None or message.strip() == "/exit":  # None: Ctrl-D, or the end of piped input
            return
        if message.strip() == "/reset":
            turns.clear()
            print("[chat] a new conversation", file=sys.stderr)
        elif message.strip():
            try:
                answer(message)
            except ChatError as e:  # one message too long: say so and keep the conversation
                print(f"error: {e}", file=sys.stderr)


def main(argv=None):
    try:
        args = parse_args(argv)
        converse(*load(args), args)
    except (UserError, OSError) as e:  # CheckpointError, DataError and ChatError are UserErrors
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: leave quietly, with the shell's code for it
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a traceback
    main()
