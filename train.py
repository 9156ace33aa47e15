"""The one training script: python train.py presets/orpo.yml [key=value ...]    (--help lists the keys)

Read top to bottom: config -> run folder -> device and precision -> tokenizer and data -> model (+ LoRA)
-> AdamW -> learning-rate schedule -> the loop (forward, loss, backward, clip, step; logging, evaluation,
checkpoints) -> final/ -> optional extras. training.type sft trains on the chosen answers only; orpo adds
lambda * L_OR (Hong, Lee, Thorne 2024, arXiv:2403.07691, Eq. 6): the maths is in minorpo/loss.py.

Data parallel: torchrun --nproc_per_node=N train.py presets/orpo.yml ...   (training.fsdp=true: sharded)
pairs per optimizer step = training.batch_size x training.grad_accum_steps x N.
"""
import contextlib
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's note; minorpo needs no NumPy
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from minorpo import (batches, checkpoint, config, data, distributed, files, lora, loss, packing, plot,  # noqa: E402
                     runs, state, step, tiny)

# -----------------------------------------------------------------------------
# 1. config: a preset plus key=value overrides. A mistake in anything the user gives ends in one line.
sys.excepthook = runs.excepthook
if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(config.help_text()))
cfg = config.load(*config.parse_args(sys.argv[1:]))
train_cfg, data_cfg, lora_cfg, sample_cfg = cfg["training"], cfg["data"], cfg["lora"], cfg["sample"]
objective = train_cfg["type"]  # sft | orpo
run_dir = os.path.join(cfg["output_dir"], cfg["run_name"])

# 2. processes, device, threads and precision, decided once
on_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
if on_cuda and not torch.cuda.is_available():
    raise config.ConfigError("device=cuda but torch sees no CUDA GPU; use device=auto or device=cpu")
fsdp = train_cfg["fsdp"]  # shard the model over the ranks (FSDP2) instead of copying it to each (DDP)
launched, rank, world, device = distributed.setup(fsdp, on_cuda)  # launched by torchrun: a process group
master = rank == 0  # only rank 0 logs and writes files
model_ranks = master or fsdp  # who runs evaluation and samples: under FSDP every rank holds part of the model
log = (lambda *args, **kwargs: print(*args, **kwargs, flush=True)) if master else (lambda *args, **kwargs: None)
# CPU threads: torch's default (one per core) is many times slower when another process shares the cores
omp = os.environ.get("OMP_NUM_THREADS", "")
threads = max(1, int(omp) if omp.isdigit() else (os.cpu_count() or 2) // 2 // world)
torch.set_num_threads(threads)
torch.manual_seed(cfg["seed"])  # the loop reseeds every step from (seed, step, rank): see state.py
# bf16: frozen weights bf16, trained weights fp32 (AdamW state too), bf16 autocast. fp32: fp32 throughout.
# The loss maths is fp32 either way (minorpo/loss.py). auto: bf16 on CUDA, fp32 on the CPU.
bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and on_cuda)
base_dtype = torch.bfloat16 if bf16 else torch.float32
ever_trained = sorted({g for phase in train_cfg["phases"] for g in phase["trainable"]})
load_dtype = torch.float32 if "all" in ever_trained else base_dtype  # full fine-tuning: fp32 masters from disk
autocast = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
log(f"[config]\n{config.dump(cfg)}[device] {device}, {'bf16' if bf16 else 'fp32'}, {threads} CPU threads, "
    f"{world} process{'es' if world > 1 else ''}")
if cfg["loss"]["logp_reduction"] == "sum" and objective == "orpo":
    log(f"[warning] {loss.LOGP_SUM_WARNING}")

# 3. the run folder (never reused for a new run: minorpo/runs.py), tokenizer and data
model_dir = (tiny.ensure_model(os.path.join(cfg["output_dir"], "tiny-model"), build=master)  # the embedded demo
             if cfg["model_name"] == "tiny" else checkpoint.resolve(cfg["model_name"]))  # model, or a checkpoint
data_path = data_cfg["path"]
if data_path == "tiny":  # the embedded synthetic preference pairs
    data_path = tiny.ensure_pairs(os.path.join(cfg["output_dir"], "tiny-data", "pairs.jsonl"), build=master)
data_paths = [data_path] + ([data_cfg["eval_path"]] if data_cfg["eval_path"] else [])
if master:
    runs.check_run_folder(run_dir, train_cfg["resume_from"], model_dir, data_paths)
    for line in runs.recover(run_dir):
        log(line)
dist.barrier() if launched else None  # rank 0 has written the tiny model and data, and checked the run folder
tokenizer = data.load_tokenizer(model_dir)
rows = data.read_jsonl(data_path, max_length=data_cfg["max_length"])
if data_cfg["eval_path"]:
    train_rows, eval_rows = rows, data.read_jsonl(data_cfg["eval_path"], max_length=data_cfg["max_length"])
else:  # split the rows, not the examples, so the held-out set does not depend on filtering
    train_rows, eval_rows = batches.split_examples(rows, data_cfg["eval_fraction"], cfg["seed"])
preprocess = dict(fmt=data_cfg["format"], template=data_cfg["template"], max_length=data_cfg["max_length"],
                  max_prompt_length=data_cfg["max_prompt_length"])
train_set, filter_lines = data.make_examples(train_rows, tokenizer, data_cfg["task"], source=data_path, **preprocess)
# An SFT run on preference rows still evaluates the pairs, to watch the rejected answers (paper, Fig. 7).
pairs = any(k in next((row for _, row in eval_rows if row), {}) for k in ("rejected", "rejected_input_ids"))
eval_task = "prompted_preference" if data_cfg["task"] == "sft" and pairs else data_cfg["task"]
eval_set, eval_filter_lines = data.make_examples(
    eval_rows, tokenizer, eval_task, source=data_cfg["eval_path"] or f"{data_path} (held out)", **preprocess
) if eval_rows else ([], [])
stop_ids, pad_id = data.stop_and_pad_ids(tokenizer, data_cfg["template"])
for line in filter_lines + eval_filter_lines:
    log(line)
log(batches.show_example(train_set[0], tokenizer))

# 4. model: the base weights strictly, then LoRA wrappers if a phase trains a LoRA group
def build_model(device):
    model = checkpoint.load_model(model_dir, dtype=load_dtype, device=device)
    if {"lora", "attn_lora"} & set(ever_trained):
        torch.manual_seed(cfg["seed"])  # LoRA's A: the same on every rank, whatever used the RNG before
        lora.inject_lora(model, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["dropout"],
                         targets=lora_cfg["targets"] if "lora" in ever_trained else [],
                         attn_targets=lora_cfg["attn_targets"] if "attn_lora" in ever_trained else [],
                         start_layer=lora_cfg["start_layer"], num_layers=lora_cfg["num_layers"])
    lora.fp32_trained_parameters(model, ever_trained)  # what AdamW holds, whichever phase is active (fp32)
    return model


model = build_model(device)
checkpoint.check_fits(model, tokenizer, model_dir, data_cfg["max_length"], sample_cfg["max_new_tokens"])
context = model.config.max_position_embeddings
trained = lora.trained_parameters(model, ever_trained)
model.gradient_checkpointing = train_cfg["gradient_checkpointing"]
if train_cfg["compile"] == "on" or (train_cfg["compile"] == "auto" and on_cuda):
    for layer in model.model.layers:  # per layer: small graphs, one compile reused 28 times
        layer.compile()
scorer = step.ResponseLogps(model, cfg["loss"]["head_chunk_size"])
train_scorer = scorer
if fsdp:  # the sharded parameters are new objects: AdamW must hold those
    trained = {n: p for n, p in distributed.shard(model, bf16).items() if n in trained}
elif launched:  # DDP registers the parameters that require grad at wrap time: every one any phase trains
    lora.set_trainable(model, ever_trained)
    train_scorer = distributed.wrap_ddp(scorer, device, on_cuda, find_unused=len(train_cfg["phases"]) > 1)

# 5. AdamW: weight decay on matrices only, never on norms and biases; fused kernels on CUDA
names = list(trained)
optimizer = step.adamw(trained, train_cfg["learning_rate"], train_cfg["weight_decay"], fused=on_cuda)
distributed.log_memory_once(model, optimizer, rank, world)


# 6. learning rate: linear warmup, then cosine decay to learning_rate * min_lr_ratio
def get_lr(it):
    peak, floor = train_cfg["learning_rate"], train_cfg["learning_rate"] * train_cfg["min_lr_ratio"]
    if it < train_cfg["warmup_steps"]:  # 1) linear warmup
        return peak * (it + 1) / train_cfg["warmup_steps"]
    progress = (it - train_cfg["warmup_steps"]) / max(1, train_cfg["max_steps"] - train_cfg["warmup_steps"])
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (peak - floor)  # 2) cosine, 0 -> 1


# 7. batches: a global micro-batch holds batch_size * world pairs; each rank collates its own slice
if not model.packs:  # the Qwen3.5 hybrid's DeltaNet state cannot skip the chosen answer: it pads (packing.py)
    data_cfg["layout"] = "padded"  # and config.yml records the layout used
collate = packing.collate_for(data_cfg["layout"], pad_id, data_cfg["max_length"])  # a list of examples -> a batch
lengths = [batches.example_length(ex) for ex in train_set]  # a pair's longer row: sets the padded length
real_tokens = [sum(len(ids) for ids, _ in batches.rows_of(ex)) for ex in train_set]  # all its rows
eval_batches = [collate(eval_set[i:i + train_cfg["batch_size"]])
                for i in range(0, len(eval_set), train_cfg["batch_size"])]


def show_samples(title):
    prompts = [data.prompt_ids(tokenizer, p, data_cfg["template"]) for p in sample_cfg["prompts"]] or \
              [batches.prompt_of(ex) for ex in eval_set[:3]]
    log(f"[sample] {title}")
    model.eval()
    room = context - sample_cfg["max_new_tokens"]  # keep the prompt's end
    for ids in prompts:
        with autocast():  # trained weights (fp32) and frozen ones (bf16) meet here
            new = model.generate(ids[-room:], sample_cfg["max_new_tokens"], stop_ids=stop_ids,
                                 temperature=sample_cfg["temperature"], top_p=sample_cfg["top_p"],
                                 generator=torch.Generator().manual_seed(0))
        log(f"  {tokenizer.decode(ids)!r} -> {tokenizer.decode(new)!r}")
    model.train()


def run_eval():  # pairs are scored as ORPO scores them; an SFT run's total is its SFT loss (lambda 0)
    kind = "orpo" if "chosen_labels" in eval_set[0] else "sft"
    lam = train_cfg["orpo_lambda"] if objective == "orpo" else 0.0
    metrics = step.evaluate(scorer, eval_batches, kind, lam, cfg["loss"]["logp_reduction"], autocast, device)
    return {f"eval/{k}": v for k, v in metrics.items()}


def check_finite(what):  # stop before saving a non-finite weight, naming the last good checkpoint
    bad = distributed.first_nonfinite(trained, launched, device)
    if bad:
        sys.exit(f"error: {bad} holds NaN or inf at step {it}; {what} not written. The last good checkpoint is "
                 f"{last_saved}: resume from it with a lower training.learning_rate")


def save_checkpoint(it):
    """A resumable checkpoint (only finite weights: state.py refuses others), then the oldest ones go.
    Every rank calls it (FSDP gathers the shards); rank 0 writes."""
    folder = os.path.join(run_dir, f"step_{it:06d}")
    state.save(folder, model, optimizer, names, {**fingerprint, "step": it, "epoch": epoch,
                                                "position": position, "skipped": skipped}, write=master)
    if master:
        runs.rotate(run_dir, train_cfg["keep_checkpoints"], protect=train_cfg["resume_from"])
    log(f"[save] {folder}")
    return folder


# 8. resume, then the loop
metrics_log = runs.MetricsLog(os.path.join(run_dir, "metrics.jsonl"), objective, enabled=master)
fingerprint = runs.trajectory(config.flat(cfg), data_paths, checkpoint.fingerprint_files(model_dir), world)
fingerprint.update({"train examples": len(train_set), "precision": "bf16" if bf16 else "fp32"})  # auto, resolved
it, epoch, position, skipped, bad_in_row, last_saved = 0, 0, 0, 0, 0, None
if train_cfg["resume_from"]:
    meta = state.load(train_cfg["resume_from"], model, optimizer, names, fingerprint)
    it, epoch, position, skipped = meta["step"], meta["epoch"], meta["position"], meta["skipped"]
    last_saved = train_cfg["resume_from"]
    if it >= train_cfg["max_steps"]:
        raise config.ConfigError(f"{train_cfg['resume_from']} is at step {it} and training.max_steps is "
                                 f"{train_cfg['max_steps']}: nothing to train; raise training.max_steps")
    for line in metrics_log.keep_up_to(it):
        log(line)
    log(f"[resume] {train_cfg['resume_from']}: continuing at step {it} of {train_cfg['max_steps']}")
config.save(cfg, run_dir) if master else None  # after the resume checks: config.yml never records a refused setting
phase = lora.phase_at(train_cfg["phases"], it)
n_train, n_total = distributed.set_trainable(model, phase)
log(f"[model] {model_dir}: training {phase}: {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.2f}%)")
if model_ranks and it == 0 and (eval_set or sample_cfg["prompts"]):
    show_samples("before training")
if model_ranks and it == 0 and eval_set and train_cfg["eval_every"]:  # the starting point of the eval curves
    metrics_log.write({"step": 0, **run_eval()})
def batch_order(epoch):  # the global micro-batches of an epoch (batches.py)
    return batches.batch_order(lengths, train_cfg["batch_size"] * world, cfg["seed"], epoch,
                               data_cfg["group_by_length"], ranks=world)


order = batch_order(epoch)
if not order:
    raise data.DataError(f"{len(train_set)} training examples cannot give each of {world} ranks a pair")
if position > len(order):  # only a damaged or hand-edited state.json says so
    raise files.UserError(f"{last_saved}/state.json: position {position} past the {len(order)} batches; {state.FIX}")
stop = runs.CtrlC()  # the first Ctrl-C asks the loop to finish its step, save, and say how to resume
t_start, start_it = time.time(), it
while it < train_cfg["max_steps"]:
    if lora.phase_at(train_cfg["phases"], it) != phase:  # a new phase: switch the trainable groups
        phase = lora.phase_at(train_cfg["phases"], it)
        n_train, _ = distributed.set_trainable(model, phase)
        log(f"[phase] step {it}: training {phase}: {n_train:,} of {n_total:,} parameters")
    if position + train_cfg["grad_accum_steps"] > len(order):  # a new epoch: a new shuffle of the batches
        epoch, position = epoch + 1, 0
        order = batch_order(epoch)
    step_idx = order[position:position + train_cfg["grad_accum_steps"]]
    micro_batches = [collate([train_set[j] for j in idx[rank::world]]) for idx in step_idx]
    position += train_cfg["grad_accum_steps"]
    torch.manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank)  # dropout masks: a function of (seed, step, rank)
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # one optimizer step: forward (label log-probs) -> loss (loss.py) -> backward -> clip -> guard -> AdamW
    metrics = step.train_step(scorer=train_scorer, optimizer=optimizer, micro_batches=micro_batches,
                              objective=objective, orpo_lambda=train_cfg["orpo_lambda"],
                              reduction=cfg["loss"]["logp_reduction"], max_grad_norm=train_cfg["max_grad_norm"],
                              autocast=autocast, device=device)
    it += 1
    if metrics["skipped"]:  # the guard: no update was made; stop if it keeps happening
        skipped, bad_in_row = skipped + 1, bad_in_row + 1
        log(f"[guard] step {it}: non-finite loss or gradient norm ({metrics['grad_norm']}); update skipped")
        if bad_in_row >= train_cfg["max_bad_steps"]:
            sys.exit(f"[guard] {bad_in_row} non-finite steps in a row: stopping (last checkpoint: {last_saved}). "
                     "Lower training.learning_rate or check the data (README: Troubleshooting)")
    else:  # averaged over the steps since the last log line, with this rank's real (non-pad) tokens
        bad_in_row = 0
        metrics_log.add(metrics, tokens=sum(real_tokens[j] for idx in step_idx for j in idx[rank::world]))
    last = it == train_cfg["max_steps"]
    do_eval = bool(eval_set) and (last or (train_cfg["eval_every"] and it % train_cfg["eval_every"] == 0))
    if (it % train_cfg["log_every"] == 0 or last or do_eval) and metrics_log.pending:
        row = metrics_log.averages(it, lr, skipped, step.all_reduce if launched else None, device)
        if on_cuda:
            row["train/memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if model_ranks and do_eval:
            row.update(run_eval())
        metrics_log.write(row, eta=(time.time() - t_start) / (it - start_it) * (train_cfg["max_steps"] - it))
    metrics_log.progress(it, train_cfg["max_steps"], metrics, time.time() - t_start)
    if launched:  # every rank stops at the same step
        stop.asked = bool(step.all_reduce(torch.tensor(float(stop.asked), device=device)))
    if train_cfg["save_every"] and (it % train_cfg["save_every"] == 0 or last) or stop.asked and it > start_it:
        check_finite("no checkpoint was")
        last_saved = save_checkpoint(it)
    if stop.asked:
        sys.exit(f"[interrupt] stopped at step {it}. Continue with:\n  {runs.resume_command(sys.argv, last_saved)}"
                 if last_saved else f"[interrupt] stopped at step {it}; nothing was saved")

# 9. final/: the merged model and the adapter alone (PEFT's layout), complete before anything optional runs
if it == skipped:
    sys.exit(f"error: every one of the {it} steps was skipped (non-finite loss or gradients): no final/ written. "
             "Lower training.learning_rate or check the data")
check_finite("final/ was")
model = distributed.gather_model(model, master, lambda: build_model(device)) if fsdp else model  # whole, on rank 0
if master:
    final, has_adapter = os.path.join(run_dir, "final"), bool(lora.lora_layers(model))
    with files.atomic_folder(final) as tmp:
        if has_adapter:
            lora.save_adapter(model, os.path.join(tmp, "adapter"), base_model_name=os.path.abspath(model_dir))
            lora.merge_lora(model)
        checkpoint.write_model(model, tmp, tokenizer_from=model_dir, dtype=base_dtype)
        metrics_log.copy_to(tmp, config_path=os.path.join(run_dir, "config.yml"))
    log(f"[save] {final}: the trained model{' (LoRA merged; the adapter alone in adapter/)' if has_adapter else ''}; "
        f"chain it with model_name={final}")
if launched:
    dist.barrier()  # the other ranks wait for rank 0's final outputs before the group goes away
    dist.destroy_process_group()

# 10. optional extras: a failure here loses nothing, final/ is complete
if master:
    try:
        if eval_set or sample_cfg["prompts"]:
            show_samples("after training")
        log(f"[plot] {plot.write_svg(metrics_log.path, os.path.join(run_dir, 'metrics.svg'))}")
    except Exception as e:  # noqa: BLE001 - any failure of an extra is reported, never lost silently
        sys.exit(f"error: an optional step after training failed ({type(e).__name__}: {e}); "
                 "final/ is complete and safe")
