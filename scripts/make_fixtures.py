"""DEV-ONLY: build the golden test fixtures with the reference implementation (needs transformers).

    python scripts/make_fixtures.py            # (re)write tests/fixtures/
    python scripts/make_fixtures.py --check    # check that a folder written by minorpo's save_model
                                               # loads in transformers with equal logits

No test imports this script and minorpo does not depend on transformers; it runs in a developer's
environment (transformers >= 5, peft not needed). It builds two tiny random models with transformers,
fills *every* parameter with random values (transformers initialises norm gains to 1 and biases to 0,
which would hide a missing bias or a misplaced norm), saves them as checkpoint folders, and stores input
ids with the reference fp32 logits (eager attention) next to them. Between them the fixtures cover:

| fixture     | family | head_dim       | lm_head | weights                 | config.json spelling         |
|-------------|--------|----------------|---------|-------------------------|------------------------------|
| qwen2-tiny  | qwen2  | hidden / heads | tied    | bf16, model.safetensors | transformers 4 (rope_theta)  |
| qwen3-tiny  | qwen3  | 16 != 48 / 4   | untied  | fp32, sharded + index   | transformers 5 (rope_params) |

The bf16 fixture's weights are rounded to bf16 before the reference logits are computed, so loading it
into fp32 reproduces the reference model exactly.
"""
import json
import os
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file, load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
COMMON = dict(vocab_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, attn_implementation="eager")
SPECS = {
    "qwen2-tiny": transformers.Qwen2Config(hidden_size=32, intermediate_size=64, tie_word_embeddings=True,
                                           rope_theta=1_000_000.0, rms_norm_eps=1e-6, **COMMON),
    "qwen3-tiny": transformers.Qwen3Config(hidden_size=48, intermediate_size=96, head_dim=16,
                                           tie_word_embeddings=False, rope_theta=500_000.0,
                                           rms_norm_eps=1e-5, **COMMON),
}


@torch.no_grad()
def randomize(model, generator):
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith("bias"):
            p.copy_(0.2 * noise)
        elif p.ndim == 1:  # RMSNorm gains
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.15 * noise)


def to_transformers4_spelling(folder):
    """Rewrite config.json as transformers 4 wrote it: top-level rope_theta, torch_dtype."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    raw["rope_scaling"] = None
    raw["torch_dtype"] = raw.pop("dtype")
    raw["transformers_version"] = "4.51.0"
    with open(path, "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)


def build(name, config):
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomize(model, generator)
    bf16 = name == "qwen2-tiny"
    if bf16:  # bf16-representable values, so the bf16 checkpoint holds exactly the reference weights
        for p in model.parameters():
            p.data = p.data.bfloat16().float()
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits.float()  # (2, 16, vocab)
    folder = os.path.join(FIXTURES, name)
    if bf16:
        model.to(torch.bfloat16).save_pretrained(folder)
        to_transformers4_spelling(folder)
    else:
        model.save_pretrained(folder, max_shard_size="100KB")
    os.remove(os.path.join(folder, "generation_config.json"))  # not needed: keep the fixtures minimal
    save_file({"input_ids": input_ids, "logits": logits.contiguous()},
              os.path.join(FIXTURES, f"{name}.reference.safetensors"))
    print(f"{name}: {sorted(os.listdir(folder))}")


def check_save_loads_in_transformers():
    """minorpo load -> save_model -> transformers from_pretrained: equal logits (fp32 and bf16 saves)."""
    sys.path.insert(0, ROOT)
    from minorpo.checkpoint import load_model, save_model
    for name in SPECS:
        reference = load_file(os.path.join(FIXTURES, f"{name}.reference.safetensors"))
        ours = load_model(os.path.join(FIXTURES, name))
        for dtype in (torch.float32, torch.bfloat16):
            with tempfile.TemporaryDirectory() as tmp:
                save_model(ours, os.path.join(tmp, "saved"), dtype=dtype)
                theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "saved"),
                                                                           dtype=torch.float32)
                with torch.no_grad():
                    want = theirs(reference["input_ids"]).logits
                    got = load_model(os.path.join(tmp, "saved"))(reference["input_ids"])
                diff = (want - got).abs().max().item()
                print(f"{name} saved as {dtype}: transformers {type(theirs).__name__} vs minorpo, "
                      f"max abs logit diff {diff:.2e}")
                assert diff <= 1e-5, diff


if __name__ == "__main__":
    if "--check" in sys.argv:
        check_save_loads_in_transformers()
    else:
        for fixture_name, fixture_config in SPECS.items():
            build(fixture_name, fixture_config)
