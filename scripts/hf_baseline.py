"""Dev-only: time the Hugging Face baseline's ORPO step (transformers + PEFT, TRL-style); needs transformers and peft.

The step minorpo's speed is compared with (docs/benchmark.md): transformers' Qwen3ForCausalLM with
Qwen3-0.6B shapes and random weights (nothing is downloaded), PEFT LoRA r16 on all seven projections,
bench.py's batch (8 pairs, 8,450 real tokens), bf16 weights under bf16 autocast, fused AdamW. The loss
is computed the way TRL's ORPO trainer does it: one forward over the chosen and rejected rows together,
full-vocabulary logits, log_softmax over the vocabulary, the label tokens gathered and averaged per row,
plus the cross-entropy on the chosen rows. Written here from the ORPO paper (Eq. 6); nothing is copied
from TRL. Nothing in minorpo imports this file.

    pip install transformers peft
    python scripts/hf_baseline.py                     # with and without gradient checkpointing (GPU)
    python scripts/hf_baseline.py --grad-ckpt on      # one of them
    python scripts/hf_baseline.py --tiny              # tiny shapes on the CPU: checks that it runs
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames the checkpointing switch
try:
    import peft
    import transformers
except ImportError:
    peft = transformers = None  # main() says so in one line; --help still works
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402  (the same shapes and the same batch as minorpo's side)
from minorpo.loss import IGNORE_INDEX  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape, grad_ckpt, device):
    """transformers' Qwen3 with the shape's config, random weights in bf16 (fp32 on the CPU), PEFT LoRA r16."""
    cfg = bench.SHAPES[shape][1]
    hf_config = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: fast on the GPU
        model = transformers.Qwen3ForCausalLM(hf_config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32)
    if grad_ckpt:  # the non-reentrant kind, which PEFT needs no input-gradient hook for
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                  task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora_config).train()  # PEFT keeps the adapters in fp32


def orpo_loss(logits, labels, beta=0.1):
    """TRL-style ORPO on full logits (2P, T, V): NLL on the chosen rows + beta * -log sigmoid(log odds)."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    pairs = labels.shape[0] // 2
    nll = F.cross_entropy(logits[:pairs].flatten(0, 1), labels[:pairs].flatten(), ignore_index=IGNORE_INDEX)
    mask = labels != IGNORE_INDEX
    logps_all = logits.log_softmax(-1)  # (2P, T-1, V) in fp32: the whole vocabulary, as TRL does
    token_logps = logps_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask).sum(-1) / mask.sum(-1)  # mean log P per row
    chosen, rejected = logps[:pairs], logps[pairs:]
    # log odds(y) = log P - log(1 - P); log1p(-exp(x)) is log(1 - P)
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    return nll - beta * F.logsigmoid(log_odds).mean()


def run(shape, grad_ckpt, pairs=8, steps=8, warmup=3):
    """Time `steps` steps after `warmup` untimed ones, as bench.run does; returns the JSON row."""
    on_cuda = torch.cuda.is_available() and not shape.startswith("tiny")
    device = "cuda" if on_cuda else "cpu"
    model = build_model(shape, grad_ckpt, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0, fused=on_cuda)
    (batch,), (real_tokens,) = bench.batches_for(shape, pairs, "padded", None)  # the protocol batch, padded
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    # right padding: a row ends at its last labelled token (its answer comes last)
    positions = torch.arange(labels.shape[1], device=device)
    ends = torch.where(labels != IGNORE_INDEX, positions, -1).amax(-1, keepdim=True) + 1
    attention_mask = (positions < ends).long()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=on_cuda)
    times = []
    for i in range(warmup + steps):
        if on_cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = orpo_loss(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del logits
    step_s = statistics.median(times)
    return dict(name=f"hf_peft_trl_style_{'gc' if grad_ckpt else 'nogc'}", shape=shape, pairs=pairs,
                step_ms=round(step_s * 1e3, 2), step_s=round(step_s, 5), real_tokens=real_tokens,
                tokens_processed=input_ids.numel(), real_tok_per_s=round(real_tokens / step_s),
                peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
                loss=round(loss.item(), 4), trainable_params=sum(p.numel() for p in trained),
                device=torch.cuda.get_device_name() if on_cuda else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    ap.add_argument("--grad-ckpt", choices=["on", "off", "both"], default="both")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    a = ap.parse_args()
    if peft is None or transformers is None:
        sys.exit("scripts/hf_baseline.py needs transformers and peft (pip install transformers peft)")
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("scripts/hf_baseline.py: no CUDA device; the baseline needs a GPU. "
                 "On the CPU, run it with --tiny (tiny shapes: checks that it runs)")
    for grad_ckpt in {"on": [True], "off": [False], "both": [True, False]}[a.grad_ckpt]:
        print(json.dumps(run("tiny" if a.tiny else "qwen3-0.6b", grad_ckpt, a.pairs, a.steps, a.warmup)), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
