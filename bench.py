"""Benchmark: time one minorpo ORPO training step on Qwen3-0.6B shapes; needs a CUDA GPU (--tiny: the CPU).

It times step.train_step, the very function train.py calls, on a fixed synthetic batch (8 pairs, 8,450
real tokens, random weights: nothing is downloaded) and prints one JSON line per configuration. What is
timed, the warm-up, how tokens and peak memory are counted, the baseline and the targets:
docs/benchmark.md. scripts/gpu_check.py runs it beside the Hugging Face baseline (scripts/hf_baseline.py).

    python bench.py                    # LoRA r16 and full fine-tuning, on the GPU
    python bench.py --shape qwen3.5-0.8b --configs lora   # the hybrid DeltaNet model
    python bench.py --tiny             # tiny shapes on the CPU: checks that it runs (the tests do this)
    python bench.py --configs lora --compile off --grad-ckpt on
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's note; minorpo needs no NumPy
import torch  # noqa: E402

from minorpo import batches, config, data, lora, packing, step, tiny  # noqa: E402
from minorpo.loss import IGNORE_INDEX  # noqa: E402
from minorpo.model import ModelConfig, Qwen  # noqa: E402
from minorpo.qwen35 import Qwen35, Qwen35Config  # noqa: E402

SHAPES = {  # (model class, config); random weights, so nothing is downloaded
    "qwen3-0.6b": (Qwen, ModelConfig(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=4096, model_type="qwen3",
        tie_word_embeddings=True)),
    "qwen3.5-0.8b": (Qwen35, Qwen35Config(  # the text model of Qwen3.5-0.8B: 18 DeltaNet + 6 attention layers
        vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
        linear_key_head_dim=128, linear_value_head_dim=128, rope_theta=1e7, max_position_embeddings=4096,
        tie_word_embeddings=True)),
    "tiny": (Qwen, ModelConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=128, model_type="qwen3",
        tie_word_embeddings=True)),
    "tiny-qwen-vocab": (Qwen, ModelConfig(  # tiny layers, Qwen's vocabulary: the output head dominates the step
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=128, model_type="qwen3",
        tie_word_embeddings=True)),
    "tiny-default": (Qwen, ModelConfig(**tiny.TINY_MODEL)),  # the embedded default's model (--data tiny)
    "tiny-qwen3.5": (Qwen35, Qwen35Config(  # 3 DeltaNet layers + 1 attention layer
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True)),
}
LORA_TARGETS = dict(targets=["gate_proj", "up_proj", "down_proj"],  # all seven projections, as the baseline
                    attn_targets=["q_proj", "k_proj", "v_proj", "o_proj"])
DELTANET_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj"]  # Qwen3.5's linear-attention projections


def protocol_examples(pairs, vocab_size, lo=32, hi=512, max_len=1024, seed=0):
    """The protocol's pairs: per pair, lengths (prompt, chosen, rejected) then the ids in that order,
    from one seeded generator; each row prompt+answer cut to max_len, the prompt unlabelled."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(pairs):
        lengths = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(3)]
        p, c, r = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
        example = {}
        for side, answer in (("chosen", c), ("rejected", r)):
            example[f"{side}_input_ids"] = (p + answer)[:max_len]
            example[f"{side}_labels"] = ([IGNORE_INDEX] * len(p) + answer)[:max_len]
        examples.append(example)
    return examples


def embedded_examples():
    """The embedded default's micro-batches in epoch 0's order, tokenized and grouped as train.py does with
    presets/orpo.yml's data and batch settings (read from the preset, so the two cannot drift apart)."""
    cfg = config.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets", "orpo.yml"))
    d = cfg["data"]
    rows = [(f"tiny:{i + 1}", row) for i, row in enumerate(tiny.make_pairs(2000))]
    examples, _ = data.make_examples(rows, tiny.build_tokenizer(), d["task"], template=d["template"],
                                     max_length=d["max_length"], max_prompt_length=d["max_prompt_length"])
    order = batches.batch_order([batches.example_length(e) for e in examples], cfg["training"]["batch_size"],
                                cfg["seed"], epoch=0, group_by_length=d["group_by_length"])
    return [[examples[i] for i in idx] for idx in order], d["max_length"]


def batches_for(shape, pairs, layout, data_name):
    """The micro-batches a step cycles through, in the layout, and (real tokens, max_length): the protocol
    batch (32-512 tokens per part, 8-32 for tiny shapes: a CPU check) or the embedded default's batches."""
    if data_name == "tiny":
        groups, max_len = embedded_examples()
    else:
        lo, hi, max_len = (8, 32, 64) if shape.startswith("tiny") else (32, 512, 1024)
        groups = [protocol_examples(pairs, SHAPES[shape][1].vocab_size, lo, hi, max_len)]
    collate = packing.collate_for(layout, 0, max_len)  # as train.py builds its micro-batches
    real = [sum(len(ids) for e in exs for ids, _ in batches.rows_of(e)) for exs in groups]  # both rows of a pair
    return [collate(exs) for exs in groups], real


def run(shape, kind, pairs, compile_layers, grad_ckpt, chunk_size, steps, warmup, layout="padded", data_name=None):
    """Time `steps` optimizer steps after `warmup` untimed ones (compilation, allocator warm-up); returns
    the JSON row. Peak memory is read over the timed steps only (the statistics are reset after warm-up)."""
    on_cuda = torch.cuda.is_available() and not shape.startswith("tiny")
    device = "cuda" if on_cuda else "cpu"
    model_class, cfg = SHAPES[shape]
    # built on the CPU (deterministic init), then moved; the precision policy is train.py's: frozen
    # weights bf16 on CUDA, trained ones fp32 masters, bf16 autocast
    model = model_class(cfg, seed=0).to(device=device, dtype=torch.bfloat16 if on_cuda else torch.float32)
    if kind == "lora":
        targets = dict(LORA_TARGETS)
        if model_class is Qwen35:
            targets["attn_targets"] = targets["attn_targets"] + DELTANET_TARGETS
        lora.inject_lora(model, 16, 32.0, 0.0, **targets)
        groups = ["lora", "attn_lora"]
    else:
        groups = ["all"]
    trained = lora.fp32_trained_parameters(model, groups)
    lora.set_trainable(model, groups)
    model.gradient_checkpointing = grad_ckpt
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    scorer = step.ResponseLogps(model, chunk_size)
    optimizer = step.adamw(trained, lr=1e-5, weight_decay=0.0, fused=on_cuda)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext
    layout = layout if model.packs else "padded"  # the Qwen3.5 hybrid cannot be packed (minorpo/packing.py)
    micro_batches, reals = batches_for(shape, pairs, layout, data_name)
    times, metrics, tokens, real_tokens = [], {}, [], []
    for i in range(warmup + steps):
        batch = micro_batches[i % len(micro_batches)]  # the protocol batch; the embedded default's in order
        if on_cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = step.train_step(scorer, optimizer, [batch], "orpo", 0.1, "mean", 1.0, autocast, device)
        if on_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: wait for them before reading the clock
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(batch["input_ids"].numel())
            real_tokens.append(reals[i % len(micro_batches)])
    step_s, real_tokens = statistics.median(times), round(statistics.mean(real_tokens))
    pairs = len(batch["labels"]) // 2  # --data tiny: the preset's batch_size
    return dict(name=f"minorpo_{kind}{'_compile' if compile_layers else ''}{'_gc' if grad_ckpt else ''}",
                shape=shape, layout=layout, data=data_name or "protocol", pairs=pairs,
                step_ms=round(step_s * 1e3, 2), step_s=round(step_s, 5),
                real_tokens=real_tokens, tokens_processed=round(statistics.mean(tokens)),
                real_tok_per_s=round(real_tokens / step_s), pairs_per_s=round(pairs / step_s, 2),
                peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
                peak_rss_mb=None if on_cuda else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                loss=round(metrics["total_loss"], 4), trainable_params=sum(p.numel() for p in trained.values()),
                device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--configs", default="lora,full", help="comma list of lora, full")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    ap.add_argument("--grad-ckpt", choices=["on", "off"], default="off")
    ap.add_argument("--chunk-size", type=int, default=4096, help="response tokens per output-head chunk")
    ap.add_argument("--layout", choices=["packed", "padded"], default="packed",
                    help="packed: each prompt once, pairs share rows (minorpo/packing.py) | padded: a row per answer")
    ap.add_argument("--data", choices=["protocol", "tiny"], default="protocol",
                    help="protocol: the fixed synthetic batch | tiny: the embedded default's batches on its model")
    ap.error = lambda message: sys.exit(f"error: {message} (python bench.py --help lists the arguments)")
    a = ap.parse_args()
    kinds = a.configs.split(",")
    for name, value, low, high in (("--pairs", a.pairs, 1, 65536), ("--steps", a.steps, 1, 10**6),
                                   ("--warmup", a.warmup, 0, 10**6), ("--chunk-size", a.chunk_size, 1, 1 << 20)):
        if not low <= value <= high:
            sys.exit(f"error: {name} {value}: use a whole number from {low} to {high}")
    if bad := [kind for kind in kinds if kind not in ("lora", "full")]:
        sys.exit(f"error: --configs {a.configs}: {bad[0]!r} is not a configuration; use lora, full or lora,full")
    shape = "tiny-default" if a.data == "tiny" else "tiny" if a.tiny else a.shape
    if not shape.startswith("tiny") and not torch.cuda.is_available():
        sys.exit(f"bench.py: no CUDA device; the {shape} benchmark needs a GPU. "
                 "On the CPU, run `python bench.py --tiny` (tiny shapes: checks that it runs)")
    # CPU threads as train.py chooses them: half the cores (torch's default, one a core, is many times slower
    # when another process shares them), unless OMP_NUM_THREADS says otherwise
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = max(1, int(omp) if omp.isdigit() else (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    print(f"[device] {threads} CPU threads ({'OMP_NUM_THREADS' if omp.isdigit() else 'half the cores'}, as "
          "train.py chooses them)", file=sys.stderr, flush=True)
    use_compile = a.compile == "on" or (a.compile == "auto" and not shape.startswith("tiny"))
    for kind in kinds:
        row = run(shape, kind, a.pairs, use_compile, a.grad_ckpt == "on", a.chunk_size,
                  a.steps, a.warmup, a.layout, a.data if a.data == "tiny" else None)
        print(json.dumps({**row, "cpu_threads": threads}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
