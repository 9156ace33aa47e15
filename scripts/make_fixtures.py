"""Dev-only: write tests/fixtures/ (tiny random models, their logits) with transformers; needs transformers 5.

    python scripts/make_fixtures.py                # (re)write tests/fixtures/
    python scripts/make_fixtures.py qwen35-tiny    # (re)write the named fixtures only
    python scripts/make_fixtures.py --check        # check that a folder written by minorpo's write_model
                                                   # loads in transformers with equal logits

No test imports this script and minorpo does not depend on transformers; it runs in a developer's
environment (transformers 5 with models/qwen3_5, 5.24 made them; peft not needed). It builds tiny random
models with transformers, fills *every* parameter with random values (transformers initialises norm gains
to 1 and biases to 0, which would hide a missing bias or a misplaced norm), saves them as checkpoint
folders, and stores input ids with the reference fp32 logits (eager attention) next to them. Between them
the fixtures cover:

| fixture     | family  | head_dim       | lm_head | weights                 | config.json spelling         |
|-------------|---------|----------------|---------|-------------------------|------------------------------|
| qwen2-tiny  | qwen2   | hidden / heads | tied    | bf16, model.safetensors | transformers 4 (rope_theta)  |
| qwen3-tiny  | qwen3   | 16 != 48 / 4   | untied  | fp32, sharded + index   | transformers 5 (rope_params) |
| qwen35-tiny | qwen3_5 | 16, RoPE on 4  | tied    | bf16, model.safetensors | transformers 5, text_config  |

The bf16 fixtures' weights are rounded to bf16 before the reference logits are computed, so loading them
into fp32 reproduces the reference model exactly.

qwen35-tiny is laid out as the released Qwen3.5 checkpoints are: a vision-language model
(Qwen3_5ForConditionalGeneration, with a one-block vision encoder) whose language model sits under
`model.language_model.*`, plus a few `mtp.*` tensors (the multi-token-prediction head that the releases
ship and transformers ignores). Its text model has three Gated DeltaNet layers and one gated attention
layer, twice as many value heads as key heads, and 80 input tokens, so the DeltaNet's 64-token chunks
are crossed. A_log is drawn so that the heads' decay rates range from slow to fast forgetting. Its
reference file also holds the bf16 model's logits.
"""
import argparse
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

try:
    import transformers
except ImportError:
    transformers = None  # main() says so in one line; --help still works

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
COMMON = dict(vocab_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, attn_implementation="eager")
SPECS = {  # fixture: (transformers config class name, its arguments)
    "qwen2-tiny": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, tie_word_embeddings=True,
                                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, **COMMON)),
    "qwen3-tiny": ("Qwen3Config", dict(hidden_size=48, intermediate_size=96, head_dim=16,
                                       tie_word_embeddings=False, rope_theta=500_000.0, rms_norm_eps=1e-5,
                                       **COMMON)),
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


QWEN35_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                   max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   attn_output_gate=True, mamba_ssm_dtype="float32", mtp_num_hidden_layers=1,
                   rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                    "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                                    "mrope_interleaved": True})
QWEN35_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=2,
                     temporal_patch_size=2, spatial_merge_size=1, out_hidden_size=32, num_position_embeddings=4)


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


def build(name, spec):
    config = getattr(transformers, spec[0])(**spec[1])
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


@torch.no_grad()
def randomize_qwen35(model, generator):
    """Every parameter random, each around the value its role has (A_log, dt_bias, gains centred on 0 or 1)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if name.endswith("A_log"):  # A = exp(A_log) from 0.01 (slow decay) to 2 (fast)
            p.copy_(torch.empty(p.shape).uniform_(-4.6, 0.7, generator=generator))
        elif name.endswith(("linear_attn.norm.weight", "dt_bias")):  # plain gains and dt_bias, around 1
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:  # the (1 + w) RMSNorm gains and biases: around 0
            p.copy_(0.2 * noise)
        elif name.endswith("conv1d.weight"):  # (channels, 1, 4): a short filter
            p.copy_(0.4 * noise)
        else:
            p.copy_(0.15 * noise)


def build_qwen35(name="qwen35-tiny"):
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    text = transformers.Qwen3_5TextConfig(**QWEN35_TEXT)
    config = transformers.Qwen3_5Config(text_config=text.to_dict(), vision_config=QWEN35_VISION,
                                        tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.Qwen3_5ForConditionalGeneration(config).float().eval()
    randomize_qwen35(model, generator)
    for p in model.parameters():  # bf16-representable values: the bf16 checkpoint holds exactly these weights
        p.data = p.data.bfloat16().float()
    input_ids = torch.randint(0, text.vocab_size, (2, 80), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()  # (2, 80, vocab)
    folder = os.path.join(FIXTURES, name)
    model.to(torch.bfloat16).save_pretrained(folder)
    os.remove(os.path.join(folder, "generation_config.json"))
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["text_config"]["full_attention_interval"] = 4  # the released configs state both it and layer_types
    with open(path, "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    weights = os.path.join(folder, "model.safetensors")
    tensors = load_file(weights)
    tensors.update({"mtp.fc.weight": torch.randn(32, 64, generator=generator).bfloat16(),
                    "mtp.norm.weight": torch.zeros(32, dtype=torch.bfloat16)})
    save_file(tensors, weights, metadata={"format": "pt"})
    reloaded = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                            attn_implementation="eager")
    with torch.no_grad():  # the folder as written (mtp tensors and all) loads into the reference unchanged
        diff = (reloaded(input_ids=input_ids).logits - logits).abs().max().item()
    assert diff == 0.0, f"the saved fixture reloads with logits {diff} away"
    with torch.no_grad():  # bf16 logits too: this model's bf16 rounding moves its logits by ~0.8
        logits_bf16 = model(input_ids=input_ids).logits  # (2, 80, vocab), the model is bf16 since saving
    save_file({"input_ids": input_ids, "logits": logits.contiguous(), "logits_bf16": logits_bf16.contiguous()},
              os.path.join(FIXTURES, f"{name}.reference.safetensors"))
    print(f"{name}: {sorted(os.listdir(folder))}, {os.path.getsize(weights)} bytes of weights")


def check_save_loads_in_transformers():
    """minorpo load -> write_model -> transformers from_pretrained: equal logits (fp32 and bf16 saves).
    Qwen3.5's tolerance is its test's: fp32 rounding, amplified through the DeltaNet layers, gives ~4e-5."""
    sys.path.insert(0, ROOT)
    from minorpo.checkpoint import load_model, write_model
    for name, tolerance in [(name, 1e-5) for name in SPECS] + [("qwen35-tiny", 1e-4)]:
        reference = load_file(os.path.join(FIXTURES, f"{name}.reference.safetensors"))
        ours = load_model(os.path.join(FIXTURES, name))
        for dtype in (torch.float32, torch.bfloat16):
            with tempfile.TemporaryDirectory() as tmp:
                write_model(ours, tmp, dtype=dtype)
                theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
                with torch.no_grad():
                    want = theirs(reference["input_ids"]).logits
                    got = load_model(tmp)(reference["input_ids"])
                diff = (want - got).abs().max().item()
                print(f"{name} saved as {dtype}: transformers {type(theirs).__name__} vs minorpo, "
                      f"max abs logit diff {diff:.2e}")
                assert diff <= tolerance, diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="fixtures to write (default: all of "
                                             f"{', '.join([*SPECS, 'qwen35-tiny'])})")
    ap.add_argument("--check", action="store_true", help="check minorpo's saved folders in transformers instead")
    a = ap.parse_args()
    if transformers is None:
        sys.exit("scripts/make_fixtures.py needs transformers 5 (pip install transformers)")
    if a.check:
        return check_save_loads_in_transformers()
    for fixture_name in a.names or [*SPECS, "qwen35-tiny"]:
        if fixture_name == "qwen35-tiny":
            build_qwen35(fixture_name)
        else:
            build(fixture_name, SPECS[fixture_name])


if __name__ == "__main__":
    main()
