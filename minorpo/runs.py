"""The run folder, and the rules that keep a user's work safe in it.

    outputs/<run_name>/config.yml      the resolved config
                       metrics.jsonl   one JSON line per log step
                       step_000100/    resumable checkpoints: the last training.keep_checkpoints of them
                       final/          the trained model, written before anything optional runs

Decisions:
- A run folder belongs to one run: starting a run in a folder that holds one is refused (continue that run
  with training.resume_from=its latest checkpoint), and a run never writes where its model or data come from.
  While a run runs, its LOCK file (runkeeping.lock) keeps a second start with the same run_name out.
- A checkpoint records all that decides the rest of the trajectory: every setting but the RESUMABLE ones, a
  hash of the data and a fingerprint of the base model. A resume differing in any of it is refused, listing
  the differences; a RESUMABLE key is applied from the new config.
- Every write is atomic (files.py): a killed run leaves complete files and temporary names, which recover()
  removes at the next start, putting an interrupted folder swap back.
"""
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
import uuid

import torch

from minorpo.files import UserError, atomic_file, naming

STEP = re.compile(r"^step_(\d{6,})$")
# the temporary names files.atomic_folder (.name.1234abcd.tmp/.old) and atomic_write (name.1234abcd.tmp) use here
LEFTOVER = re.compile(r"^(?:\.(final|step_\d{6,})|(config\.yml|metrics\.jsonl|metrics\.svg))\.[0-9a-f]{8}\.(tmp|old)$")
LOCK = ".lock"  # the run folder's claim by the process that runs in it (runkeeping.claim): its pid
CHECKPOINT_FILES = {"weights.safetensors", "optimizer.safetensors", "state.json"}  # what state.save writes
RESUMABLE = ("run_name", "output_dir", "model_name", "device", "data.path", "data.eval_path",
             "training.max_steps", "training.log_every", "training.eval_every", "training.save_every",
             "training.keep_checkpoints", "training.resume_from", "training.max_bad_steps", "training.compile",
             "training.gradient_checkpointing", "loss.head_chunk_size",
             "sample.prompts", "sample.max_new_tokens", "sample.temperature", "sample.top_p")
RESUMABLE += ("training.epochs",)  # like max_steps: how long the run lasts (it sets max_steps)


def checkpoints(run_dir):
    """The complete step_NNNNNN checkpoints of a run folder, oldest first: by step, not by name
    (step_1000000 sorts before step_999999 as text)."""
    names = sorted((n for n in os.listdir(run_dir) if STEP.match(n)), key=lambda n: int(STEP.match(n)[1])) \
        if os.path.isdir(run_dir) else []
    paths = [os.path.join(run_dir, n) for n in names]
    return [p for p in paths if not os.path.islink(p) and os.path.isfile(os.path.join(p, "state.json"))]


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_run_folder(run_dir, resume_from, model_dir, data_paths):
    """Refuse, in one line, every start that could overwrite a user's work."""
    if _inside(run_dir, model_dir) or _inside(model_dir, run_dir):
        raise UserError(f"run folder {run_dir} and model folder {model_dir} overlap: the run would write over "
                        "its own input model; choose another run_name or output_dir")
    for path in data_paths:
        if _inside(path, run_dir):
            raise UserError(f"the data file {path} is inside the run folder {run_dir}; move it or choose another "
                            "run_name")
    if os.path.islink(run_dir):
        raise UserError(f"{run_dir} is a symbolic link; a run folder must be a real folder inside output_dir")
    if not os.path.isdir(run_dir) or not set(os.listdir(run_dir)) - {LOCK}:
        return
    last = (checkpoints(run_dir) or [None])[-1]
    if resume_from and last and os.path.realpath(resume_from) == os.path.realpath(last):
        return
    if resume_from and _inside(resume_from, run_dir):
        raise UserError(f"{resume_from} is not the latest checkpoint of {run_dir} ({last}); resuming there would "
                        f"mix two trajectories: resume from {last}, or copy it and resume into a new run_name")
    if last:
        raise UserError(f"{run_dir} already holds a run; continue it with training.resume_from={last}, or start "
                        f"over with a new run_name (or delete {run_dir})")
    raise UserError(f"{run_dir} already holds a run, with no checkpoint to continue from (training.save_every was 0); "
                    f"start over with a new run_name, or delete {run_dir}")


def check_eval_path(data_path, eval_path):
    """data.eval_path may not be data.path again (the same file, or a copy): the held-out numbers would be
    measured on the training pairs."""
    if not eval_path or not (os.path.isfile(data_path) and os.path.isfile(eval_path)):
        return  # a missing file is read_jsonl's to report
    same = os.path.samefile(data_path, eval_path)
    if same or os.path.getsize(data_path) == os.path.getsize(eval_path) and \
            file_hash(data_path, sample_above=None) == file_hash(eval_path, sample_above=None):
        raise UserError(f"data.eval_path={eval_path} is {'the same file as' if same else 'a copy of'} data.path="
                        f"{data_path}: the held-out numbers would be measured on the training pairs; give other "
                        "pairs, or data.eval_path=null to hold out data.eval_fraction of data.path")


def recover(run_dir):
    """Undo what a killed run left (a folder swap stopped halfway, temporary names); a line per thing done."""
    done = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        match, path = LEFTOVER.match(name), os.path.join(run_dir, name)
        if STEP.match(name) and os.path.isdir(path) and not os.path.islink(path) \
                and not os.path.lexists(os.path.join(path, "state.json")):  # a deletion killed halfway
            if set(os.listdir(path)) <= CHECKPOINT_FILES:
                shutil.rmtree(path)
                done.append(f"[recover] removed {path}: a checkpoint without state.json, left by a killed deletion")
            else:
                done.append(f"[recover] {path} has no state.json, so it is no checkpoint, and holds files minorpo "
                            "does not write: left as it is; move it out of the run folder")
        if not match or os.path.islink(path) or match[2] and match[3] == "old":
            continue  # never ours: atomic_write leaves no .old, and neither writes links
        target = os.path.join(run_dir, match[1] or match[2])
        if match[3] == "old" and not os.path.exists(target):
            os.rename(path, target)  # the crash came between the two renames of atomic_folder
            done.append(f"[recover] {target}: restored from {name}")
        else:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            done.append(f"[recover] removed {path}, left by a run that was killed while writing")
    return done


def rotate(run_dir, keep, protect=None):
    """Delete all but the last `keep` checkpoints, never `protect` (the one this run resumed from). Each is
    renamed to a temporary name first (atomic), so a kill mid-delete leaves a name recover() removes."""
    for folder in checkpoints(run_dir)[:-keep]:
        if not (protect and os.path.realpath(folder) == os.path.realpath(protect)):
            doomed = os.path.join(run_dir, f".{os.path.basename(folder)}.{uuid.uuid4().hex[:8]}.tmp")
            os.rename(folder, doomed)
            shutil.rmtree(doomed)


def file_hash(path, sample_above=1 << 26):
    """sha256 of a file; for a file over 64 MB (model weights), of its size and 64 KB at 16 places, so
    identifying a base model costs milliseconds, not a read of gigabytes."""
    digest, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        if sample_above is None or size <= sample_above:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for i in range(16):
                f.seek(i * (size - (1 << 16)) // 15)
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def trajectory(flat_cfg, data_paths, model_files, world):
    """What a checkpoint must agree on with the run that resumes it (flat keys, JSON values). model_files:
    {what: [paths]} (checkpoint.fingerprint_files: weights, config.json, tokenizer.json), or the weight files."""
    models = model_files if isinstance(model_files, dict) else {"base model": model_files}
    return {**{k: v for k, v in flat_cfg.items() if k not in RESUMABLE},
            "data": "".join(file_hash(p, sample_above=None) for p in data_paths),  # every byte: it is read anyway
            **{what: file_hash(paths[0]) + "".join(file_hash(p)[:4] for p in paths[1:]) for what, paths in
               models.items()},
            "ranks": world}


def _skip_hole(f):
    """Move a binary file past a hole (unwritten zero bytes of a sparse file) at its position, if it has one."""
    if hasattr(os, "SEEK_DATA"):
        try:
            f.seek(os.lseek(f.fileno(), f.tell(), os.SEEK_DATA))
        except OSError as e:  # ENXIO: a hole to the end; anything else: no SEEK_DATA here, read the zeros
            if e.errno == errno.ENXIO:
                f.seek(0, os.SEEK_END)


class MetricsLog:
    """metrics.jsonl (one JSON line per log step), the readable log line on stdout, and a progress line on
    stderr every few seconds: refreshed in place on a terminal, a plain line every 30 s when piped."""

    def __init__(self, path, objective, enabled=True):
        self.path, self.objective, self.enabled, self.shown = path, objective, enabled, 0.0
        self.sums, self.tokens, self.pending, self.since, self.averaged = {}, 0, 0, time.time(), 0

    def add(self, metrics, tokens):
        """Sum one step's metrics and real tokens until the next log line."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.tokens, self.pending = self.tokens + tokens, self.pending + 1

    def averages(self, step, lr, skipped, all_reduce=None, device="cpu"):
        """The row of a log line: the steps' mean metrics and tokens per second (summed over ranks)."""
        tokens = int(all_reduce(torch.tensor(self.tokens, device=device))) if all_reduce else self.tokens
        row = {"step": step, **{f"train/{k}": v / self.pending for k, v in self.sums.items() if k != "skipped"},
               "train/lr": lr, "train/tokens": tokens, "train/tokens_per_s": tokens / (time.time() - self.since),
               "train/skipped_steps": skipped}
        self.averaged = self.pending  # how many steps the next log line's numbers are the mean of
        self.sums, self.tokens, self.pending, self.since = {}, 0, 0, time.time()
        return row

    def keep_up_to(self, step, max_line=1 << 20):
        """On resume: keep the rows up to the checkpoint's step, copied line by line; a line cut by a crash, or
        longer than any row (a crash can leave gigabytes of zero bytes), is dropped: memory stays one line."""
        if not self.enabled or not os.path.isfile(self.path):
            return []
        bad, first = 0, None
        with open(self.path, "rb") as f, atomic_file(self.path) as out:
            for number, line in enumerate(iter(lambda: f.readline(max_line + 1), b""), 1):
                row = None
                if len(line) > max_line:  # read past the rest of it in pieces
                    while line and not line.endswith(b"\n"):
                        _skip_hole(f)
                        line = f.readline(max_line)
                else:
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError):  # a cut line, or one no run of ours wrote
                        pass
                if not isinstance(row, dict):
                    bad, first = bad + 1, first or number
                elif isinstance(row.get("step"), int) and row["step"] <= step:
                    out.write(json.dumps(row) + "\n")
        what = "an unreadable line (cut by a crash?) is" if bad == 1 else f"{bad} unreadable lines, the first here, are"
        return [f"[warning] {self.path}:{first}: {what} dropped"] if bad else []

    def write(self, row, eta=None):
        """Print one readable line and append the same numbers as one JSON line."""
        line = f"step {row['step']:5d}"
        if "train/total_loss" in row:
            mean = f"mean of {self.averaged} steps" if self.averaged != 1 else "this step"
            line += f" | {mean}: loss {row['train/total_loss']:.4f} | sft {row['train/sft_loss']:.4f}"
            if self.objective == "orpo":
                line += (f" | or {row['train/orpo_loss']:.4f} | log OR {row['train/log_odds_ratio']:+.3f}"
                         f" | acc {row['train/pref_accuracy']:.2f}")
            line += (f" | lr {row['train/lr']:.2e} | grad {row['train/grad_norm']:.2f}"
                     f" | {row['train/tokens_per_s']:,.0f} tok/s")
            line += f" | mem {row['train/memory_gb']:.1f} GB" if "train/memory_gb" in row else ""
            line += f" | eta {eta:.0f}s" if eta is not None else ""
        if "eval/pref_accuracy" in row:
            line += (f" || eval acc {row['eval/pref_accuracy']:.3f} | chosen {row['eval/chosen_logps']:.3f}"
                     f" | rejected {row['eval/rejected_logps']:.3f}")
            if "eval/pref_accuracy_longer" in row:  # chosen answer longer | shorter than the rejected one
                line += (f" | acc longer {row['eval/pref_accuracy_longer']:.3f}"
                         f" shorter {row['eval/pref_accuracy_shorter']:.3f}")
        if self.enabled:
            print(line, flush=True)
            with naming(self.path), open(self.path, "a") as f:  # a full disk names the file
                f.write(json.dumps(row) + "\n")

    def progress(self, step, max_steps, metrics, elapsed):
        tty = sys.stderr.isatty()
        if not self.enabled or elapsed - self.shown < (2 if tty else 30) and step < max_steps:
            return
        self.shown = elapsed
        eta = elapsed / max(step, 1) * (max_steps - step)
        loss = metrics.get("total_loss", float("nan"))  # the last step's, where the log line has a mean
        line = f"[progress] step {step}/{max_steps} | this step's loss {loss:.4f} | {elapsed:.0f}s elapsed | " \
               f"eta {eta:.0f}s"
        print(f"\r{line}\033[K" if tty else line, end="\n" if not tty or step == max_steps else "",
              file=sys.stderr, flush=True)

    def copy_to(self, folder, config_path):
        """Put metrics.jsonl and config.yml beside the final model, so final/ tells how it was made."""
        for path in (self.path, config_path):
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


class CtrlC:
    """The first Ctrl-C, or SIGTERM (what a scheduler sends before it takes the machine back), sets `asked`, so
    the loop can finish its step and save; a second one stops at once."""

    def __init__(self):
        self.asked = False
        signal.signal(signal.SIGINT, self.ask)
        signal.signal(signal.SIGTERM, self.ask)

    def ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"\n[interrupt] {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: stopping after this step to "
              "save a checkpoint (Ctrl-C again to stop now)", file=sys.stderr, flush=True)


def resume_command(argv, folder):
    """The command line that continues this run from `folder`, quoted for a POSIX shell."""
    kept = [a for a in argv if not a.startswith("training.resume_from=")]
    return " ".join(shlex.quote(a) for a in ["python", *kept, f"training.resume_from={folder}"])


def excepthook(kind, error, tb):
    """A user's mistake, a full disk and Ctrl-C end in one line; anything else is a bug: it keeps its traceback."""
    if issubclass(kind, UserError):
        print(f"error: {error}", file=sys.stderr)
    elif issubclass(kind, OSError):
        where = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        print(f"error: {where} (the files written before this one are complete: every write is atomic)",
              file=sys.stderr)
    elif issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, tb)
