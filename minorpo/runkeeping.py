"""train.py's run keeping, behind a few named calls so that its loop reads in one screen.

What a first reader of train.py may skip: the folders a run reads and writes (checked before anything is
written), resume (the position in the data, the counters, the kept log), the guard against non-finite steps,
checkpoints, Ctrl-C, writing final/, and the samples. The rules they follow are runs.py's (the run folder),
state.py's (a checkpoint) and distributed.py's (several processes); the messages are the README's promises.

Decisions:
- Every rank calls these (FSDP gathers its shards to save); rank 0 alone writes files and prints (`log`).
- The run folder is claimed (a lock) and checked before anything is printed; every check of a resume comes
  before the first write (begin()), so a refused start leaves config.yml and metrics.jsonl as they were.
- A non-finite weight is caught before it is saved, naming the last good checkpoint, which stays untouched.
"""
import atexit
import contextlib
import fcntl
import os
import sys

import torch
import torch.distributed as dist

from minorpo import checkpoint, config, data, distributed, files, lora, runs, state, step, tiny


def _places(cfg):
    """(run_dir, model_dir, data_path, eval_path): where the run writes and reads, nothing built yet."""
    model_dir = (os.path.join(cfg["output_dir"], "tiny-base") if cfg["model_name"] == "tiny"  # the embedded demo
                 else checkpoint.resolve(cfg["model_name"]))  # a model folder, Hub id, or a run's checkpoint
    data_path = cfg["data"]["path"]
    if data_path in tiny.VARIANTS:  # the embedded synthetic preference pairs: tiny, tiny-lengths
        data_path = os.path.join(cfg["output_dir"], "tiny-data", tiny.VARIANTS[data_path])
    return os.path.join(cfg["output_dir"], cfg["run_name"]), model_dir, data_path, cfg["data"]["eval_path"]


def claim(cfg, master):
    """Before anything is printed or written: rank 0 checks the run folder (runs.check_run_folder: never reused
    for a new run), then claims it for this process (a lock naming it, gone at exit), then checks it again
    (another start may have written there meanwhile)."""
    if not master:
        return
    run_dir, model_dir, data_path, eval_path = _places(cfg)
    check = lambda: runs.check_run_folder(run_dir, cfg["training"]["resume_from"], model_dir,  # noqa: E731
                                          [data_path] + ([eval_path] if eval_path else []))
    check()
    lock(run_dir)
    check()


def lock(run_dir):
    """Claim run_dir: its .lock file, held with flock (which ends with the process, so a killed run's lock is
    free again) and holding our pid; removed at exit, with the folders made for it if they stayed empty.
    A folder another live process holds is refused in one line naming that process."""
    made = []
    for folder in (run_dir, os.path.dirname(run_dir)):
        if folder and not os.path.exists(folder):
            made.append(folder)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, runs.LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise files.UserError(f"{run_dir} is in use: process {pid} is running there (started with the same "
                                  "run_name); wait for it to end, or choose another run_name") from None
        except OSError as e:  # a file system without locks (some network ones): run, and say what is not guarded
            print(f"[warning] {path}: cannot lock ({e.strerror}); a second run started here would not be stopped",
                  file=sys.stderr)
            break
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break  # still the file at that name: not one that the process before us removed as we opened it
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    atexit.register(_unlock, fd, path, made)


def _unlock(fd, path, made):
    with contextlib.suppress(OSError):
        os.remove(path)
    os.close(fd)
    for folder in made:  # deepest first; only an empty folder goes
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def prepare(cfg, master, launched, log):
    """(run_dir, model_dir, data_path, data_paths), after claim(): the embedded tiny model and pairs are built if
    asked for, and rank 0 removes a killed run's leftovers (runs.recover)."""
    run_dir, model_dir, data_path, eval_path = _places(cfg)
    if cfg["model_name"] == "tiny":
        tiny.ensure_model(model_dir, build=master)
    if cfg["data"]["path"] in tiny.VARIANTS:
        tiny.ensure_pairs(data_path, build=master, variant=cfg["data"]["path"])
    data_paths = [data_path] + ([eval_path] if eval_path else [])
    if master:
        runs.check_eval_path(data_path, eval_path)
        for line in runs.recover(run_dir):
            log(line)
    dist.barrier() if launched else None  # rank 0 has written the tiny model and data, and checked the run folder
    return run_dir, model_dir, data_path, data_paths


def resume(train_cfg, model, optimizer, names, fingerprint, run_dir):
    """(step, epoch, position, skipped): zeros for a new run; for training.resume_from, the checkpoint's, after
    state.py has checked it against `fingerprint` and loaded the weights and AdamW state. Checks only: nothing
    is written before begin(). A checkpoint at training.max_steps whose run has no final/ goes on to final/."""
    if not train_cfg["resume_from"]:
        return 0, 0, 0, 0
    meta = state.load(train_cfg["resume_from"], model, optimizer, names, fingerprint)
    it, final = meta["step"], os.path.join(run_dir, "final")
    if it > train_cfg["max_steps"] or it == train_cfg["max_steps"] and os.path.lexists(final):
        has = f", and {final} already holds its model" if it == train_cfg["max_steps"] else ""
        key = "training.epochs" if train_cfg["epochs"] else "training.max_steps"  # whichever set the length
        raise config.ConfigError(f"{train_cfg['resume_from']} is at step {it} and training.max_steps is "
                                 f"{train_cfg['max_steps']}{has}: nothing to train; raise {key}")
    return it, meta["epoch"], meta["position"], meta["skipped"]


def begin(cfg, run_dir, it, metrics_log, master, log):
    """The first writes, after every check: metrics.jsonl kept up to the resumed step, config.yml (never a
    refused setting)."""
    train_cfg = cfg["training"]
    if train_cfg["resume_from"]:
        for line in metrics_log.keep_up_to(it):
            log(line)
        log(f"[resume] {train_cfg['resume_from']}: continuing at step {it} of {train_cfg['max_steps']}" +
            " (training.max_steps: writing final/ only)" * (it == train_cfg["max_steps"]))
    config.save(cfg, run_dir) if master else None


def check_order(order, position, examples, train_cfg, world, last_saved):
    """An epoch's batch order must give every rank a pair and each step its micro-batches, and a resumed
    position must lie inside it."""
    if not order:
        raise data.DataError(f"{examples} training examples cannot give each of {world} ranks a pair")
    accum, ranks = train_cfg["grad_accum_steps"], f" x {world} ranks" * (world > 1)
    if accum > len(order):
        raise config.ConfigError(f"training.grad_accum_steps={accum} asks for more micro-batches a step than an epoch "
                                 f"has: {examples} training examples make {len(order)} of training.batch_size="
                                 f"{train_cfg['batch_size']}{ranks}; lower grad_accum_steps to {len(order)} or less, "
                                 "or lower training.batch_size")
    if position > len(order):  # only a damaged or hand-edited state.json says so
        raise files.UserError(f"{last_saved}/state.json: position {position} past the {len(order)} batches; "
                              f"{state.FIX}")


def guard(metrics, it, skipped, bad_in_row, max_bad_steps, last_saved, log):
    """(skipped, bad_in_row) after a step: a skipped step (no update was made: step.py) is counted and said,
    and the run stops after max_bad_steps of them in a row."""
    if not metrics["skipped"]:
        return skipped, 0
    skipped, bad_in_row = skipped + 1, bad_in_row + 1
    log(f"[guard] step {it}: non-finite loss or gradient norm ({metrics['grad_norm']}); update skipped")
    if bad_in_row >= max_bad_steps:
        sys.exit(f"[guard] {bad_in_row} non-finite steps in a row: stopping (last checkpoint: {last_saved}). "
                 "Lower training.learning_rate or check the data (README: Troubleshooting)")
    return skipped, bad_in_row


def check_finite(trained, launched, device, it, what, last_saved):
    """Stop before saving a non-finite weight, naming the last good checkpoint."""
    bad = distributed.first_nonfinite(trained, launched, device)
    if bad:
        sys.exit(f"error: {bad} holds NaN or inf at step {it}; {what} not written. The last good checkpoint is "
                 f"{last_saved}: resume from it with a lower training.learning_rate")


def save_checkpoint(run_dir, model, optimizer, names, meta, train_cfg, master, log):
    """A resumable checkpoint step_NNNNNN/ (state.py), then the oldest ones go, never the one this run resumed
    from. meta: the fingerprint and the position (step, epoch, position, skipped). Returns its folder."""
    folder = os.path.join(run_dir, f"step_{meta['step']:06d}")
    state.save(folder, model, optimizer, names, meta, write=master)
    if master:
        runs.rotate(run_dir, train_cfg["keep_checkpoints"], protect=train_cfg["resume_from"])
    log(f"[save] {folder}")
    return folder


def stop_asked(stop, launched, device):
    """Whether a Ctrl-C asked to stop (runs.CtrlC); under torchrun, on any rank, so that all stop at one step."""
    if launched:
        stop.asked = bool(step.all_reduce(torch.tensor(float(stop.asked), device=device)))
    return stop.asked


def interrupted(it, last_saved):
    """After a Ctrl-C: stop, with the command that continues the run."""
    sys.exit(f"[interrupt] stopped at step {it}. Continue with:\n  {runs.resume_command(sys.argv, last_saved)}"
             if last_saved else f"[interrupt] stopped at step {it}; nothing was saved")


def check_trained(it, skipped):
    """A run in which every step was skipped writes no final/."""
    if it == skipped:
        sys.exit(f"error: every one of the {it} steps was skipped (non-finite loss or gradients): no final/ "
                 "written. Lower training.learning_rate or check the data")


def write_final(run_dir, model, model_dir, dtype, metrics_log, log):
    """final/: the merged model and, for LoRA, the adapter alone in adapter/ (PEFT's layout), with the tokenizer,
    config.yml and metrics.jsonl; written under a temporary name and renamed when complete."""
    final, has_adapter = os.path.join(run_dir, "final"), bool(lora.lora_layers(model))
    with files.atomic_folder(final) as tmp:
        if has_adapter:
            lora.save_adapter(model, os.path.join(tmp, "adapter"), base_model_name=os.path.abspath(model_dir))
            lora.merge_lora(model)
        checkpoint.write_model(model, tmp, tokenizer_from=model_dir, dtype=dtype)
        metrics_log.copy_to(tmp, config_path=os.path.join(run_dir, "config.yml"))
    log(f"[save] {final}: the trained model{' (LoRA merged; the adapter alone in adapter/)' if has_adapter else ''}; "
        f"chain it with model_name={final}")


def finish(launched):
    """The other ranks wait for rank 0's final outputs before the process group goes away."""
    if launched:
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def optional():
    """For what runs after final/: a failure is reported in one line and exits nonzero, final/ stays as it is."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure of an extra is reported, never lost silently
        sys.exit(f"error: an optional step after training failed ({type(e).__name__}: {e}); "
                 "final/ is complete and safe")


def show_samples(title, model, tokenizer, prompts, sample_cfg, stop_ids, autocast, log):
    """The model's answers to prompts (lists of ids), generated as sample.* says; a prompt keeps its end."""
    log(f"[sample] {title}")
    model.eval()
    room = model.config.max_position_embeddings - sample_cfg["max_new_tokens"]  # keep the prompt's end
    for ids in prompts:
        with autocast():  # trained weights (fp32) and frozen ones (bf16) meet here
            new = model.generate(ids[-room:], sample_cfg["max_new_tokens"], stop_ids=stop_ids,
                                 temperature=sample_cfg["temperature"], top_p=sample_cfg["top_p"],
                                 generator=torch.Generator().manual_seed(0))
        log(f"  {tokenizer.decode(ids)!r} -> {tokenizer.decode(new)!r}")
    model.train()
