"""The one training script: python train.py presets/orpo.yml [key=value ...]   (--help lists the keys)

Read top to bottom: config -> processes, device and precision -> run folder, tokenizer and data
-> model (+ LoRA) -> AdamW -> learning-rate schedule -> batches -> the loop (batch, forward, loss,
backward, clip, step; log, evaluate, save) -> final/ -> optional extras.
training.type sft trains on the chosen answers only; orpo adds lambda * L_OR (Hong, Lee, Thorne 2024,
arXiv:2403.07691, Eq. 6): the maths is in minorpo/loss.py. What keeps a run safe (its folder, resume,
the guard, checkpoints, Ctrl-C, final/) is behind the named calls of minorpo/runkeeping.py.

Data parallel: torchrun --nproc_per_node=N train.py presets/orpo.yml ...  (training.fsdp=true: sharded)
pairs per optimizer step = training.batch_size x training.grad_accum_steps x N.
"""
import contextlib
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # minorpo needs no NumPy
import torch  # noqa: E402

from minorpo import (batches, checkpoint, config, data, distributed, formats, lora,  # noqa: E402
                     loss, packing, plot, runkeeping, runs, schedule, step)

# -----------------------------------------------------------------------------
# 1. config: a preset plus key=value overrides. A mistake in anything given ends in one line.
sys.excepthook = runs.excepthook
if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(config.help_text()))
cfg = config.load(*config.parse_args(sys.argv[1:]))
train_cfg, data_cfg, lora_cfg, sample_cfg = cfg["training"], cfg["data"], cfg["lora"], cfg["sample"]
objective = train_cfg["type"]  # sft | orpo
max_steps, batch_size, accum = train_cfg["max_steps"], train_cfg["batch_size"], train_cfg["grad_accum_steps"]

# 2. processes, device, threads and precision, decided once
on_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
if on_cuda and not torch.cuda.is_available():
    raise config.ConfigError("device=cuda but torch sees no CUDA GPU; use device=auto or device=cpu")
fsdp = train_cfg["fsdp"]  # shard the model over the ranks (FSDP2), or copy it to each (DDP)
launched, rank, world, device = distributed.setup(fsdp, on_cuda)  # torchrun's process group
master = rank == 0  # only rank 0 logs and writes files
model_ranks = master or fsdp  # who evaluates and samples: under FSDP every rank holds part of the model


def log(*args, **kwargs):
    if master:
        print(*args, **kwargs, flush=True)


# CPU threads: torch's default (one per core) is many times slower when other processes share the cores
omp = os.environ.get("OMP_NUM_THREADS", "")
threads = max(1, int(omp) if omp.isdigit() else (os.cpu_count() or 2) // 2 // world)
torch.set_num_threads(threads)
torch.manual_seed(cfg["seed"])  # the loop reseeds every step from (seed, step, rank): see state.py
# bf16: frozen weights bf16, trained weights fp32 (AdamW state too), bf16 autocast. fp32: fp32 only.
# The loss maths is fp32 either way (minorpo/loss.py). auto: bf16 on CUDA, fp32 on the CPU.
bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and on_cuda)
base_dtype = torch.bfloat16 if bf16 else torch.float32
ever_trained = sorted({g for phase in train_cfg["phases"] for g in phase["trainable"]})
load_dtype = torch.float32 if "all" in ever_trained else base_dtype  # full fine-tuning: fp32 masters


def autocast():  # bf16: the matmuls in bf16 (torch.autocast); fp32: nothing to do
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


runkeeping.claim(cfg, master)  # the run folder: checked and locked for this run before anything is printed
log(f"[config]\n{config.dump(cfg)}[device] {device}, {'bf16' if bf16 else 'fp32'}, "
    f"{threads} CPU threads, {world} process{'es' if world > 1 else ''}")
if cfg["loss"]["logp_reduction"] == "sum" and objective == "orpo":
    log(f"[warning] {loss.LOGP_SUM_WARNING}")

# 3. the run folder (checked, never reused for a new run), tokenizer and data
run_dir, model_dir, data_path, data_paths = runkeeping.prepare(cfg, master, launched, log)
tokenizer = data.load_tokenizer(model_dir)
max_length, eval_path = data_cfg["max_length"], data_cfg["eval_path"]
rows = data.read_jsonl(data_path, max_length=max_length, task=data_cfg["task"], fmt=data_cfg["format"])
if eval_path:
    train_rows, eval_rows = rows, data.read_jsonl(eval_path, max_length, data_cfg["task"], data_cfg["format"])
else:  # split the rows, not the examples, so the held-out set does not depend on filtering
    train_rows, eval_rows = batches.split_examples(rows, data_cfg["eval_fraction"], cfg["seed"])
preprocess = dict(fmt=data_cfg["format"], template=data_cfg["template"], max_length=max_length,
                  max_prompt_length=data_cfg["max_prompt_length"], overlong=data_cfg["overlong"])
train_set, filter_lines = data.make_examples(train_rows, tokenizer, data_cfg["task"], source=data_path,
                                             **preprocess)
pairs = formats.eval_pairs(data_cfg["task"], eval_rows)  # an SFT run on pairs still scores held-out pairs
eval_source = eval_path or f"{data_path} (held out)"
eval_set, eval_filter_lines = data.make_examples(eval_rows, tokenizer, data_cfg["task"], source=eval_source,
                                                 pairs=pairs, **preprocess) if eval_rows else ([], [])
stop_ids, pad_id = data.stop_and_pad_ids(tokenizer, data_cfg["template"])
for line in filter_lines + eval_filter_lines:
    log(line)
log(batches.show_example(train_set[0], tokenizer))


# 4. model: the base weights strictly, then LoRA wrappers if a phase trains a LoRA group
def build_model(device):
    model = checkpoint.load_model(model_dir, dtype=load_dtype, device=device)
    if {"lora", "attn_lora"} & set(ever_trained):
        torch.manual_seed(cfg["seed"])  # LoRA's A: the same on every rank, whatever drew before
        lora.inject_lora(model, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["dropout"],
                         targets=lora_cfg["targets"] if "lora" in ever_trained else [],
                         attn_targets=lora_cfg["attn_targets"] if "attn_lora" in ever_trained else [],
                         start_layer=lora_cfg["start_layer"], num_layers=lora_cfg["num_layers"])
    lora.fp32_trained_parameters(model, ever_trained)  # what AdamW holds, whichever phase is active
    return model


model = build_model(device)
checkpoint.check_fits(model, tokenizer, model_dir, max_length, sample_cfg["max_new_tokens"])
trained = lora.trained_parameters(model, ever_trained)
model.gradient_checkpointing = train_cfg["gradient_checkpointing"]
if train_cfg["compile"] == "on" or (train_cfg["compile"] == "auto" and on_cuda):
    for layer in model.model.layers:  # per layer: small graphs, one compile reused 28 times
        layer.compile()
scorer = step.ResponseLogps(model, cfg["loss"]["head_chunk_size"])  # model + response-only head
# several processes: DDP wraps the scorer, FSDP shards the model (AdamW then holds the shards)
train_scorer, trained = distributed.parallel(scorer, trained, ever_trained, train_cfg, launched, bf16,
                                             device)
sync = distributed.grad_sync(train_scorer)  # DDP: all-reduce the gradients in the last backward only

# 5. AdamW: weight decay on matrices only, never on norms and biases; fused kernels on CUDA
names = list(trained)
learning_rate, weight_decay = train_cfg["learning_rate"], train_cfg["weight_decay"]
optimizer = step.adamw(trained, learning_rate, weight_decay, fused=on_cuda)
distributed.log_memory_once(model, optimizer, rank, world)


# 6. learning rate: a linear warm-up, then training.lr_schedule: cosine decay to learning_rate * min_lr_ratio,
# inverse_sqrt (the paper's) or constant. The formulas: minorpo/schedule.py
def get_lr(it):
    return schedule.lr_at(it, train_cfg["lr_schedule"], learning_rate, train_cfg["warmup_steps"], max_steps,
                          train_cfg["min_lr_ratio"])


# 7. batches: a global micro-batch holds batch_size * world pairs; each rank collates its own slice
if not model.packs:  # the Qwen3.5 hybrid's DeltaNet state cannot skip the chosen answer: it pads
    data_cfg["layout"] = "padded"  # and config.yml records the layout used
collate = packing.collate_for(data_cfg["layout"], pad_id, max_length)  # examples -> a batch
prompt_loss = cfg["loss"]["sft_tokens"] == "prompt_and_response"  # the NLL trains the prompt too (eval: never)
train_collate = packing.collate_for(data_cfg["layout"], pad_id, max_length, prompt_loss)
lengths = [batches.example_length(ex) for ex in train_set]  # a pair's longer row: its padded length
real_tokens = [sum(len(ids) for ids, _ in batches.rows_of(ex)) for ex in train_set]  # all its rows
eval_batches = [collate(eval_set[i:i + batch_size]) for i in range(0, len(eval_set), batch_size)]
sample_prompts = [data.prompt_ids(tokenizer, p, data_cfg["template"]) for p in sample_cfg["prompts"]]
sample_prompts = sample_prompts or [batches.prompt_of(ex) for ex in eval_set[:3]]  # or held-out ones
reduction, orpo_lambda = cfg["loss"]["logp_reduction"], train_cfg["orpo_lambda"]


def batch_order(epoch):  # the global micro-batches of an epoch, a function of (seed, epoch)
    return batches.batch_order(lengths, batch_size * world, cfg["seed"], epoch,
                               data_cfg["group_by_length"], ranks=world)


if train_cfg["epochs"]:  # training.epochs: whole passes over the training pairs, as the loop below takes them
    num_batches = len(batch_order(0))  # the same count every epoch (only the order changes)
    max_steps, old_max_steps = schedule.max_steps_for_epochs(train_cfg["epochs"], num_batches, accum), max_steps
    train_cfg["max_steps"] = max_steps  # what resume checks and config.yml records
    log(schedule.epochs_line(train_cfg["epochs"], max_steps, len(train_set), num_batches, batch_size, world, accum,
                             old_max_steps))


def run_eval():  # pairs are scored as ORPO scores them; an SFT run's total is its SFT loss (lambda 0)
    kind = "orpo" if "chosen_labels" in eval_set[0] else "sft"
    lam = orpo_lambda if objective == "orpo" else 0.0
    metrics = step.evaluate(scorer, eval_batches, kind, lam, reduction, autocast, device)
    return {f"eval/{k}": v for k, v in metrics.items()}


def show_samples(title):
    runkeeping.show_samples(title, model, tokenizer, sample_prompts, sample_cfg, stop_ids, autocast,
                            log)


def save_checkpoint(it):  # every rank calls it (FSDP gathers the shards); only finite weights
    runkeeping.check_finite(trained, launched, device, it, "no checkpoint was", last_saved)
    meta = {**fingerprint, "step": it, "epoch": epoch, "position": position, "skipped": skipped}
    return runkeeping.save_checkpoint(run_dir, model, optimizer, names, meta, train_cfg, master, log)


# 8. resume (or start at step 0), then the loop
metrics_log = runs.MetricsLog(os.path.join(run_dir, "metrics.jsonl"), objective, enabled=master)
fingerprint = runs.trajectory(config.flat(cfg), data_paths, checkpoint.fingerprint_files(model_dir), world)
fingerprint.update({"train examples": len(train_set), "precision": "bf16" if bf16 else "fp32"})
it, epoch, position, skipped = runkeeping.resume(train_cfg, model, optimizer, names, fingerprint, run_dir)  # or 0s
bad_in_row, last_saved = 0, train_cfg["resume_from"] or None
order = batch_order(epoch)
runkeeping.check_order(order, position, len(train_set), train_cfg, world, last_saved)
runkeeping.begin(cfg, run_dir, it, metrics_log, master, log)  # the first writes, after every check
phase = lora.phase_at(train_cfg["phases"], it)
n_train, n_total = distributed.set_trainable(model, phase)
log(f"[model] {model_dir}: training {phase}: {n_train:,} of {n_total:,} parameters "
    f"({100 * n_train / n_total:.2f}%)")
if model_ranks and it == 0 and sample_prompts:
    show_samples("before training")
eval_every, save_every = train_cfg["eval_every"], train_cfg["save_every"]
if model_ranks and it == 0 and eval_set and eval_every:  # the start of the eval curves
    metrics_log.write({"step": 0, **run_eval()})
stop = runs.CtrlC()  # a first Ctrl-C or SIGTERM asks the loop to finish its step, save, and say how to resume
t_start, start_it = time.time(), it
while it < max_steps:
    if lora.phase_at(train_cfg["phases"], it) != phase:  # a new phase: switch the trainable groups
        phase = lora.phase_at(train_cfg["phases"], it)
        n_train, _ = distributed.set_trainable(model, phase)
        log(f"[phase] step {it}: training {phase}: {n_train:,} of {n_total:,} parameters")
    if position + accum > len(order):  # a new epoch: a new shuffle of the batches
        epoch, position = epoch + 1, 0
        order = batch_order(epoch)
    step_idx = order[position:position + accum]  # this step's global micro-batches
    mine = [idx[rank::world] for idx in step_idx]  # this rank's share of each micro-batch
    micro_batches = [train_collate([train_set[j] for j in idx]) for idx in mine]
    position += accum
    torch.manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank)  # dropout: a function of these three
    lr = get_lr(it)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # one optimizer step: forward (label log-probs) -> loss (loss.py) -> backward -> clip -> guard -> AdamW
    metrics = step.train_step(train_scorer, optimizer, micro_batches, objective, orpo_lambda, reduction,
                              train_cfg["max_grad_norm"], autocast, device, sync)
    it += 1
    skipped, bad_in_row = runkeeping.guard(metrics, it, skipped, bad_in_row, train_cfg["max_bad_steps"],
                                           last_saved, log)  # a skipped step made no update
    if not metrics["skipped"]:  # averaged until the next log line, with this rank's real (non-pad) tokens
        metrics_log.add(metrics, tokens=sum(real_tokens[j] for idx in mine for j in idx))
    last = it == max_steps
    do_eval = bool(eval_set) and (last or (eval_every and it % eval_every == 0))
    if (it % train_cfg["log_every"] == 0 or last or do_eval) and metrics_log.pending:
        row = metrics_log.averages(it, lr, skipped, step.all_reduce if launched else None, device)
        if on_cuda:
            row["train/memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if model_ranks and do_eval:
            row.update(run_eval())
        metrics_log.write(row, eta=(time.time() - t_start) / (it - start_it) * (max_steps - it))
    metrics_log.progress(it, max_steps, metrics, time.time() - t_start)
    stopping = runkeeping.stop_asked(stop, launched, device)  # Ctrl-C, on any rank
    if save_every and (it % save_every == 0 or last) or stopping and it > start_it:
        last_saved = save_checkpoint(it)
    if stopping:
        runkeeping.interrupted(it, last_saved)  # exits with the command that continues the run

# 9. final/: the merged model and the LoRA adapter alone, complete before anything optional runs
runkeeping.check_trained(it, skipped)  # a run in which every step was skipped writes no final/
runkeeping.check_finite(trained, launched, device, it, "final/ was", last_saved)
if fsdp:  # the whole model, on rank 0
    model = distributed.gather_model(model, master, lambda: build_model(device))
if master:
    runkeeping.write_final(run_dir, model, model_dir, base_dtype, metrics_log, log)
runkeeping.finish(launched)  # the other ranks wait for rank 0's final/, then the process group ends

# 10. optional extras: a failure here loses nothing, final/ is complete
if master:
    with runkeeping.optional():
        if sample_prompts:
            show_samples("after training")
        log(f"[plot] {plot.write_svg(metrics_log.path, os.path.join(run_dir, 'metrics.svg'))}")
