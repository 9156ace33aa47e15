"""The one training script: python train.py presets/orpo.yml [key=value ...]

Read top to bottom: config -> device and precision -> tokenizer and data -> model (+ LoRA) -> AdamW ->
learning-rate schedule -> the loop (accumulation, clipping, phases, logging, evaluation, checkpoints)
-> final outputs. training.type sft trains on the chosen answers only; orpo adds lambda * L_OR
(Hong, Lee, Thorne 2024, arXiv:2403.07691, Eq. 6). The maths lives in minorpo/loss.py and one
optimizer step in minorpo/step.py (bench.py times that same function).

Data parallel: torchrun --nproc_per_node=N train.py presets/orpo.yml ...
pairs per optimizer step = training.batch_size x training.grad_accum_steps x N.
"""
import contextlib
import datetime
import json
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's note; minorpo needs no NumPy
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from minorpo import batches, checkpoint, config, data, files, lora, loss, state, step, tiny  # noqa: E402

# -----------------------------------------------------------------------------
# 1. config: a preset plus key=value overrides; a mistake stops here, in one line
try:
    cfg = config.load(*config.parse_args(sys.argv[1:]))
except config.ConfigError as e:
    sys.exit(f"config error: {e}")
t, d, lc = cfg["training"], cfg["data"], cfg["lora"]
objective = t["type"]  # sft | orpo
run_dir = os.path.join(cfg["output_dir"], cfg["run_name"])

# 2. processes, device and precision, decided once
ddp = "RANK" in os.environ  # launched by torchrun
on_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
if on_cuda and not torch.cuda.is_available():
    sys.exit("config error: device=cuda but torch sees no CUDA GPU; use device=auto or device=cpu")
if ddp:
    # rank 0 alone writes checkpoints while the others wait at the next collective: allow for big ones
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(hours=1))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ['LOCAL_RANK']}" if on_cuda else "cpu"
    if on_cuda:
        torch.cuda.set_device(device)
else:
    rank, world, device = 0, 1, "cuda" if on_cuda else "cpu"
master = rank == 0  # only rank 0 logs, evaluates and writes files
log = (lambda *args, **kwargs: print(*args, **kwargs, flush=True)) if master else (lambda *args, **kwargs: None)
torch.manual_seed(cfg["seed"])  # the loop reseeds every step from (seed, step, rank): see state.py
# CUDA: frozen weights bf16, trained weights fp32 (AdamW state too), bf16 autocast. CPU: fp32 throughout.
# The loss maths is fp32 either way (minorpo/loss.py).
base_dtype = torch.bfloat16 if on_cuda else torch.float32
ever_trained = sorted({g for phase in t["phases"] for g in phase["trainable"]})
load_dtype = torch.float32 if "all" in ever_trained else base_dtype  # full fine-tuning: fp32 masters from disk
autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext
log(f"[config]\n{config.dump(cfg)}", end="")
if master:
    config.save(cfg, run_dir)
if cfg["loss"]["logp_reduction"] == "sum" and objective == "orpo":
    log(f"[warning] {loss.LOGP_SUM_WARNING}")

# 3. tokenizer and data
try:
    if cfg["model_name"] == "tiny":  # the embedded demo model: built once, then loaded like any checkpoint
        model_dir = tiny.ensure_model(os.path.join(cfg["output_dir"], "tiny-model"), build=master)
    else:
        model_dir = checkpoint.resolve(cfg["model_name"])
    data_path = d["path"]
    if data_path == "tiny":  # the embedded synthetic preference pairs
        data_path = tiny.ensure_pairs(os.path.join(cfg["output_dir"], "tiny-data", "pairs.jsonl"), build=master)
    if ddp:
        dist.barrier()  # rank 0 has written them
    tokenizer = data.load_tokenizer(model_dir)
    rows = data.read_jsonl(data_path)
    if d["eval_path"]:
        train_rows, eval_rows = rows, data.read_jsonl(d["eval_path"])
    else:  # split the rows, not the examples, so the held-out set does not depend on filtering
        train_rows, eval_rows = batches.split_examples(rows, d["eval_fraction"], cfg["seed"])
    kw = dict(fmt=d["format"], template=d["template"], max_length=d["max_length"],
              max_prompt_length=d["max_prompt_length"])
    train_set, report = data.make_examples(train_rows, tokenizer, d["task"], source=data_path, **kw)
    # An SFT run on preference rows still evaluates the pairs, to watch the rejected answers (paper, Fig. 7).
    pairs = eval_rows and any(k in eval_rows[0][1] for k in ("rejected", "rejected_input_ids"))
    eval_task = "prompted_preference" if d["task"] == "sft" and pairs else d["task"]
    eval_set, eval_report = data.make_examples(eval_rows, tokenizer, eval_task, source=d["eval_path"] or
                                               f"{data_path} (held out)", **kw) if eval_rows else ([], [])
    stop_ids, pad_id = data.stop_and_pad_ids(tokenizer, d["template"])
except (checkpoint.CheckpointError, data.DataError, OSError) as e:
    sys.exit(f"error: {e}")
for line in report + eval_report:
    log(line)
log(batches.show_example(train_set[0], tokenizer))

# 4. model: the base weights strictly, then LoRA wrappers if a phase trains a LoRA group
try:
    model = checkpoint.load_model(model_dir, dtype=load_dtype, device=device)
except checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
mc = model.config
if d["max_length"] > mc.max_position_embeddings:
    sys.exit(f"config error: data.max_length={d['max_length']} is longer than the model's context "
             f"({mc.max_position_embeddings} positions in {model_dir}/config.json); lower data.max_length")
if tokenizer.get_vocab_size() > mc.vocab_size:
    sys.exit(f"error: {model_dir}/tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model only "
             f"{mc.vocab_size} embeddings; the tokenizer belongs to another model")
if {"lora", "attn_lora"} & set(ever_trained):
    try:
        lora.inject_lora(model, lc["rank"], lc["alpha"], lc["dropout"],
                         targets=lc["targets"] if "lora" in ever_trained else [],
                         attn_targets=lc["attn_targets"] if "attn_lora" in ever_trained else [],
                         start_layer=lc["start_layer"], num_layers=lc["num_layers"])
    except ValueError as e:
        sys.exit(f"config error: {e}")
trained = lora.master_parameters(model, ever_trained)  # what AdamW holds, whichever phase is active
model.gradient_checkpointing = t["gradient_checkpointing"]
if t["compile"] == "on" or (t["compile"] == "auto" and on_cuda):
    for layer in model.model.layers:  # per layer: small graphs, one compile reused 28 times
        layer.compile()
policy = step.Policy(model, cfg["loss"]["head_chunk_size"])
train_policy = policy
if ddp:  # DDP registers the parameters that require grad at wrap time: every one any phase trains
    lora.set_trainable(model, ever_trained)
    # The only buffers are the RoPE tables, the same on every rank: no need to broadcast them (~40 MB for
    # Qwen3) before every forward. Newer torch renames the flag and warns; the old one still works.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    train_policy = DDP(policy, device_ids=[device] if on_cuda else None, broadcast_buffers=False,
                       find_unused_parameters=len(t["phases"]) > 1)

# 5. AdamW: weight decay on matrices only, never on norms and biases; fused kernels on CUDA
names = list(trained)
optimizer = step.adamw(trained, t["learning_rate"], t["weight_decay"], fused=on_cuda)


# 6. learning rate: linear warmup, then cosine decay to learning_rate * min_lr_ratio
def get_lr(it):
    peak, floor = t["learning_rate"], t["learning_rate"] * t["min_lr_ratio"]
    if it < t["warmup_steps"]:  # 1) linear warmup
        return peak * (it + 1) / t["warmup_steps"]
    progress = (it - t["warmup_steps"]) / max(1, t["max_steps"] - t["warmup_steps"])  # 2) 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - floor)  # 3) cosine


# 7. batches: a global micro-batch holds batch_size * world pairs; each rank collates its own slice
lengths = [batches.example_length(ex) for ex in train_set]  # a pair's longer row: sets the padded length
real_tokens = [sum(len(ids) for ids, _ in batches.rows_of(ex)) for ex in train_set]  # all its rows
eval_batches = [batches.collate(eval_set[i:i + t["batch_size"]], pad_id)
                for i in range(0, len(eval_set), t["batch_size"])]


def batch_order(epoch):
    """The global micro-batches of an epoch; under DDP, a last batch too small to give every rank a pair
    is dropped (a rank with nothing to do could not join the gradient all-reduce)."""
    order = batches.batch_order(lengths, t["batch_size"] * world, cfg["seed"], epoch, d["group_by_length"])
    return [idx for idx in order if len(idx) >= world]


def show_samples(title):
    prompts = [data.prompt_ids(tokenizer, p, d["template"]) for p in cfg["sample"]["prompts"]] or \
              [batches.prompt_of(ex) for ex in eval_set[:3]]
    log(f"[sample] {title}")
    model.eval()
    room = max(1, mc.max_position_embeddings - cfg["sample"]["max_new_tokens"])  # keep the prompt's end
    for ids in prompts:
        with autocast():  # on CUDA, trained weights (fp32) and frozen ones (bf16) meet here
            new = model.generate(ids[-room:], cfg["sample"]["max_new_tokens"], stop_ids=stop_ids,
                                 temperature=cfg["sample"]["temperature"], top_p=cfg["sample"]["top_p"],
                                 generator=torch.Generator().manual_seed(0))
        log(f"  {tokenizer.decode(ids)!r} -> {tokenizer.decode(new)!r}")
    model.train()


def run_eval():  # pairs are scored as ORPO scores them; an SFT run's total is its SFT loss (lambda 0)
    kind = "orpo" if "chosen_labels" in eval_set[0] else "sft"
    lam = t["orpo_lambda"] if objective == "orpo" else 0.0
    m = step.evaluate(policy, eval_batches, kind, lam, cfg["loss"]["logp_reduction"], autocast, device)
    return {f"eval/{k}": v for k, v in m.items()}


def report(row, eta=None):
    """One readable log line, and the same numbers as one JSON line in metrics.jsonl (rank 0 only)."""
    line = f"step {row['step']:5d}"
    if "train/total_loss" in row:
        line += f" | loss {row['train/total_loss']:.4f} | sft {row['train/sft_loss']:.4f}"
        if objective == "orpo":
            line += (f" | or {row['train/orpo_loss']:.4f} | log_odds {row['train/log_odds']:+.3f}"
                     f" | acc {row['train/pref_accuracy']:.2f}")
        line += (f" | lr {row['train/lr']:.2e} | grad {row['train/grad_norm']:.2f}"
                 f" | {row['train/tokens_per_s']:,.0f} tok/s")
        line += f" | mem {row['train/memory_gb']:.1f} GB" if "train/memory_gb" in row else ""
        line += f" | eta {eta:.0f}s"
    if "eval/pref_accuracy" in row:
        line += (f" || eval acc {row['eval/pref_accuracy']:.3f} | chosen {row['eval/chosen_logps']:.3f}"
                 f" | rejected {row['eval/rejected_logps']:.3f}")
    log(line)
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


# 8. resume, then the loop
metrics_path = os.path.join(run_dir, "metrics.jsonl")
position_depends_on = {"seed": cfg["seed"], "batch_size": t["batch_size"], "grad_accum_steps": t["grad_accum_steps"],
                       "world_size": world, "train_examples": len(train_set), "group_by_length": d["group_by_length"]}
it, epoch, position, skipped, bad_in_row = 0, 0, 0, 0, 0
if t["resume_from"]:
    try:
        meta = state.load(t["resume_from"], model, optimizer, names, position_depends_on)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    it, epoch, position, skipped = meta["step"], meta["epoch"], meta["position"], meta["skipped"]
    log(f"[resume] {t['resume_from']}: continuing at step {it}")
if master and os.path.isfile(metrics_path):  # a rerun starts a new log; a resumed run keeps the rows up to it
    with open(metrics_path) as f:
        kept = [line for line in f if t["resume_from"] and json.loads(line)["step"] <= it]
    with open(metrics_path, "w") as f:
        f.writelines(kept)
phase = lora.phase_at(t["phases"], it)
n_train, n_total = lora.set_trainable(model, phase)
log(f"[model] {model_dir}: training {phase}: {n_train:,} of {n_total:,} parameters "
    f"({100 * n_train / n_total:.2f}%)")
if master and it == 0 and eval_set:
    show_samples("before training")
    if t["eval_every"]:  # the starting point of the eval curves
        report({"step": 0, **run_eval()})
order = batch_order(epoch)
if not order:
    sys.exit(f"data error: {len(train_set)} training examples cannot give each of {world} ranks a pair")
sums, tokens, t0, t_start, start_it = {}, 0, time.time(), time.time(), it
while it < t["max_steps"]:
    if lora.phase_at(t["phases"], it) != phase:  # a new phase: switch the trainable groups
        phase = lora.phase_at(t["phases"], it)
        n_train, _ = lora.set_trainable(model, phase)
        log(f"[phase] step {it}: training {phase}: {n_train:,} of {n_total:,} parameters")
    if position + t["grad_accum_steps"] > len(order):  # a new epoch: a new shuffle of the batches
        epoch, position = epoch + 1, 0
        order = batch_order(epoch)
    step_idx = order[position:position + t["grad_accum_steps"]]
    micro = [batches.collate([train_set[j] for j in idx[rank::world]], pad_id) for idx in step_idx]
    position += t["grad_accum_steps"]
    torch.manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank)  # dropout masks: a function of (seed, step, rank)
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    try:
        m = step.train_step(train_policy, optimizer, micro, objective, t["orpo_lambda"],
                            cfg["loss"]["logp_reduction"], t["max_grad_norm"], autocast, device)
    except ValueError as e:  # a row without label tokens (loss.py), which the data filter should have dropped
        sys.exit(f"error: {e}")
    it += 1
    if m["skipped"]:  # the guard: no update was made; stop if it keeps happening
        skipped, bad_in_row = skipped + 1, bad_in_row + 1
        log(f"[guard] step {it}: non-finite loss or gradient norm ({m['grad_norm']}); update skipped")
        if bad_in_row >= t["max_bad_steps"]:
            sys.exit(f"[guard] {bad_in_row} non-finite steps in a row: stopping. Lower training.learning_rate, "
                     "check the data, or resume from the last checkpoint (README: Troubleshooting)")
    else:
        bad_in_row = 0
        for k, v in {**m, "steps": 1}.items():  # averaged over the steps since the last log line
            sums[k] = sums.get(k, 0.0) + v
        tokens += sum(real_tokens[j] for idx in step_idx for j in idx[rank::world])  # this rank's real tokens
    do_eval = bool(eval_set) and (it == t["max_steps"] or (t["eval_every"] and it % t["eval_every"] == 0))
    if (it % t["log_every"] == 0 or it == t["max_steps"] or do_eval) and sums:
        n, dt = sums.pop("steps"), time.time() - t0
        if ddp:  # every rank counted its own shard
            tokens = int(step.all_reduce(torch.tensor(tokens, device=device)))
        row = {"step": it, **{f"train/{k}": v / n for k, v in sums.items() if k != "skipped"},
               "train/lr": lr, "train/tokens": tokens, "train/tokens_per_s": tokens / dt,
               "train/skipped_steps": skipped}
        if on_cuda:
            row["train/memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if master and do_eval:
            row.update(run_eval())
        report(row, eta=(time.time() - t_start) / (it - start_it) * (t["max_steps"] - it))
        sums, tokens, t0 = {}, 0, time.time()
    if master and t["save_every"] and it % t["save_every"] == 0 and it < t["max_steps"]:
        folder = os.path.join(run_dir, f"step_{it:06d}")
        state.save(folder, model, optimizer, names,
                   {**position_depends_on, "step": it, "epoch": epoch, "position": position, "skipped": skipped})
        log(f"[save] {folder} (resume with training.resume_from={folder})")

# 9. final outputs: the adapter alone (PEFT's layout) and the merged model, a complete checkpoint folder
if master:
    show_samples("after training")
    final = os.path.join(run_dir, "final")
    with files.atomic_folder(final) as tmp:
        if lora.lora_layers(model):
            lora.save_adapter(model, os.path.join(tmp, "adapter"), base_model_name=cfg["model_name"])
            lora.merge_lora(model)
        checkpoint.write_model(model, tmp, tokenizer_from=model_dir, dtype=base_dtype)  # bf16 on CUDA
    has_adapter = os.path.isdir(os.path.join(final, "adapter"))
    merged = " (LoRA merged; the adapter alone in final/adapter)" if has_adapter else ""
    log(f"[save] {final}: the trained model{merged}; chain it with model_name={final}")
if ddp:
    dist.barrier()  # the other ranks wait for rank 0's final outputs before the group goes away
    dist.destroy_process_group()
