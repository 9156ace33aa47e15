"""Every GPU check in one call of at most 8 minutes; needs a CUDA GPU, transformers and peft (--dry-run: the CPU).

    python scripts/gpu_check.py                          # on the GPU machine: bench/results/gpu_check.json
    python scripts/gpu_check.py --dry-run --out x.json   # the same pipeline on the CPU, tiny shapes, < 1 minute
    python scripts/gpu_check.py --only tests,train_lora  # some parts again

Each part runs as its own process group with its own time limit and is killed whole at the limit; a
part that fails or runs out of time is recorded and the next one runs. The JSON file is rewritten after
every part, so whatever was measured survives. Parts, in order, and what they add to the JSON:
- minorpo_lora, hf_peft_trl_style_gc, hf_peft_trl_style_nogc, minorpo_full: the speed protocol of
  docs/benchmark.md, one JSON row each from bench.py or scripts/hf_baseline.py (real_tok_per_s,
  peak_gb, step_ms, ...), on the same batch; the hf_* parts are skipped where transformers or peft is
  missing. `targets` holds each ratio of docs/benchmark.md, its target and whether it is met.
- tests: tests/test_cuda.py (fp32 parity with the transformers fixtures on CUDA, bf16 within the
  stated tolerance, compiled layers equal eager) -> tests_passed, tests_failed, tests_skipped.
- model_folder, then train.py on random-init Qwen3-0.6B shapes (tiny in a dry run) and the tiny task's
  pairs: train_lora (LoRA, eager, a checkpoint halfway), train_resume (from that checkpoint: the same
  losses within RESUME_TOLERANCE), train_full (full fine-tuning, eager). Each records its losses,
  whether they are finite and fall, whether final/ was written and every saved tensor is finite.
- minorpo_qwen35_lora: bench.py's LoRA step on the Qwen3.5-0.8B hybrid shape.
- train_compiled: train_lora's run with train.py's default compile setting (on for CUDA), if time is left.
"""
import argparse
import contextlib
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from xml.etree import ElementTree

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SPEED_ROWS = ("minorpo_lora", "minorpo_full", "hf_peft_trl_style_gc", "hf_peft_trl_style_nogc", "minorpo_qwen35_lora")
EMPTY_ROW = {"status": "not run", "real_tok_per_s": None, "peak_gb": None, "step_ms": None}
TRAIN_RUNS = ("train_lora", "train_resume", "train_full", "train_compiled")
RESUME_TOLERANCE = 1e-3  # relative, per logged loss: CUDA's backward kernels may add in another order
# (part, seconds it may take at most); the whole run stops starting parts when --budget runs out
PARTS = [("minorpo_lora", 100), ("hf_peft_trl_style_gc", 60), ("hf_peft_trl_style_nogc", 60), ("minorpo_full", 90),
         ("tests", 90), ("model_folder", 60), ("train_lora", 75), ("train_resume", 60), ("train_full", 90),
         ("minorpo_qwen35_lora", 75), ("train_compiled", 120)]


class Skipped(Exception):
    """A part that cannot run here (a missing package, an earlier part that failed)."""


class Failed(Exception):
    """A part that ran and failed; the message is its last error line."""


def run_python(args, timeout, log_name, work):
    """Run `python args...` from the repository root in a new process group, killed whole at the
    timeout (compile workers included). Returns its stdout; raises Failed on a timeout or an error."""
    out_path, err_path = (os.path.join(work, f"{log_name}.{kind}") for kind in ("out", "err"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the part at a timeout, or what it left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(err_path) as f:
        last = (f.read().strip().splitlines() or [""])[-1]
    if code is None:
        raise Failed(f"timeout after {timeout:.0f} s (log: {err_path}); last line: {last}")
    if code != 0:
        raise Failed(f"exit {code}: {last} (log: {err_path})")
    with open(out_path) as f:
        return f.read()


def speed_part(name, dry):
    """A speed row: the last JSON line that bench.py or hf_baseline.py prints."""
    quick = ["--steps", "2", "--warmup", "1"] if dry else []
    args = {"minorpo_lora": ["bench.py", "--configs", "lora"] + (["--tiny"] if dry else []),
            "minorpo_full": ["bench.py", "--configs", "full"] + (["--tiny"] if dry else []),
            "minorpo_qwen35_lora": ["bench.py", "--configs", "lora",
                                    "--shape", "tiny-qwen3.5" if dry else "qwen3.5-0.8b"],
            "hf_peft_trl_style_gc": ["scripts/hf_baseline.py", "--grad-ckpt", "on"] + (["--tiny"] if dry else []),
            "hf_peft_trl_style_nogc": ["scripts/hf_baseline.py", "--grad-ckpt", "off"] + (["--tiny"] if dry else [])}

    def part(ctx, timeout):
        if name.startswith("hf_") and not all(importlib.util.find_spec(p) for p in ("transformers", "peft")):
            raise Skipped("transformers or peft is not installed (pip install transformers peft)")
        lines = [line for line in run_python(args[name] + quick, timeout, name, ctx["work"]).splitlines()
                 if line.startswith("{")]
        if not lines:
            raise Failed("printed no JSON row")
        return json.loads(lines[-1])
    return part


def tests_part(ctx, timeout):
    xml = os.path.join(ctx["work"], "tests.xml")
    with contextlib.suppress(Failed):  # failing tests exit 1: the report below counts them
        run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", f"--junitxml={xml}"],
                   timeout, "tests", ctx["work"])
    if not os.path.isfile(xml):
        raise Failed(f"pytest wrote no report (timeout or crash; log: {ctx['work']}/tests.err)")
    suite = ElementTree.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total, failures, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total - failures - errors - skipped, "failed": failures + errors, "skipped": skipped,
            "failed_tests": failed, "ok": not failed}


def write_random_model(folder, shape):
    """A checkpoint folder with random weights of bench's `shape` (bf16) and the tiny task's tokenizer."""
    import bench
    from minorpo import checkpoint, files, tiny
    model_class, cfg = bench.SHAPES[shape]
    with files.atomic_folder(folder) as tmp:
        checkpoint.write_model(model_class(cfg, seed=0), tmp, dtype=torch.bfloat16)
        tiny.build_tokenizer().save(os.path.join(tmp, "tokenizer.json"))
    tiny.ensure_pairs(os.path.join(os.path.dirname(folder), "pairs.jsonl"))


def model_folder_part(ctx, timeout):
    shape = "tiny" if ctx["dry"] else "qwen3-0.6b"
    run_python([os.path.join("scripts", "gpu_check.py"), "--write-model", ctx["model"], "--shape", shape],
               timeout, "model_folder", ctx["work"])
    return {"shape": shape, "folder": ctx["model"]}


def saved_tensors_finite(run_dir):
    """Every tensor in every safetensors file under run_dir (final/, step_*/) is finite."""
    from safetensors import safe_open
    paths = glob.glob(os.path.join(run_dir, "**", "*.safetensors"), recursive=True)
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return False
    return bool(paths)


def logged_losses(run_dir):
    """{step: total loss} from the run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["step"]: row["train/total_loss"] for row in rows if "train/total_loss" in row}


def train_part(name):
    def part(ctx, timeout):
        if not os.path.isfile(os.path.join(ctx["model"], "config.json")):
            raise Skipped("no model folder (the model_folder part did not run or failed)")
        steps = 4 if ctx["dry"] else 8
        runs = os.path.join(ctx["work"], "runs")
        args = ["train.py", "presets/qwen3-0.6b-lora-orpo.yml", f"model_name={ctx['model']}", f"output_dir={runs}",
                f"data.path={os.path.join(ctx['work'], 'pairs.jsonl')}", f"run_name={name}",
                f"training.max_steps={steps}", "training.warmup_steps=0", "training.log_every=1",
                "training.eval_every=0", "training.batch_size=8", "training.grad_accum_steps=1",
                "data.max_length=128", "data.max_prompt_length=64", "data.eval_fraction=0.02",
                "sample.max_new_tokens=4", "lora.dropout=0.0"]
        if name == "train_full":
            args += ["training.learning_rate=1e-4", "training.phases=[{step: 0, trainable: [all]}]"]
        else:
            args += ["training.learning_rate=1e-3", f"training.save_every={steps // 2}"]
        if name != "train_compiled":  # eager, so the resumed run can be compared step for step; the
            args.append("training.compile='off'")  # last run keeps train.py's default (compiled on CUDA)
        resume_from = os.path.join(runs, "train_lora", f"step_{steps // 2:06d}")
        if name == "train_resume":
            if not os.path.isdir(resume_from):
                raise Skipped(f"train_lora left no checkpoint {resume_from}")
            args.append(f"training.resume_from={resume_from}")
        run_python(args, timeout, name, ctx["work"])
        run_dir = os.path.join(runs, name)
        losses = logged_losses(run_dir)
        values = [losses[s] for s in sorted(losses)]
        result = {"steps": sorted(losses), "losses": values,
                  "losses_finite": bool(values) and all(math.isfinite(v) for v in values),
                  "final_written": os.path.isfile(os.path.join(run_dir, "final", "config.json")),
                  "saved_tensors_finite": saved_tensors_finite(run_dir)}
        if name == "train_resume":  # the same losses as the uninterrupted run, at the same steps
            original = logged_losses(os.path.join(runs, "train_lora"))
            diffs = [abs(loss - original[s]) / max(abs(original[s]), 1e-8) for s, loss in losses.items()]
            result.update(max_rel_diff=max(diffs, default=None), tolerance=RESUME_TOLERANCE,
                          resume_equal=bool(diffs) and max(diffs) <= RESUME_TOLERANCE)
        else:  # the mean of the last two logged losses below that of the first two
            result["loss_fell"] = len(values) >= 4 and sum(values[-2:]) < sum(values[:2])
        result["ok"] = all(v for k, v in result.items() if isinstance(v, bool))
        return result
    return part


def targets(result):
    """docs/benchmark.md's targets as ratios of this run's rows; None where a row is missing."""
    def value(row, key):
        return (result.get(row) or {}).get(key)

    def ratio(a, b):
        return round(a / b, 3) if a and b else None
    rows = {"lora_vs_baseline_gc_tok_per_s": (ratio(value("minorpo_lora", "real_tok_per_s"),
                                                    value("hf_peft_trl_style_gc", "real_tok_per_s")), 4.0, ">="),
            "lora_vs_baseline_nogc_tok_per_s": (ratio(value("minorpo_lora", "real_tok_per_s"),
                                                      value("hf_peft_trl_style_nogc", "real_tok_per_s")), 3.0, ">="),
            "lora_peak_vs_baseline_gc_peak": (ratio(value("minorpo_lora", "peak_gb"),
                                                    value("hf_peft_trl_style_gc", "peak_gb")), 1.0, "<="),
            "full_vs_baseline_nogc_tok_per_s": (ratio(value("minorpo_full", "real_tok_per_s"),
                                                      value("hf_peft_trl_style_nogc", "real_tok_per_s")), 1.0, ">")}
    met = {">=": lambda r, t: r >= t, "<=": lambda r, t: r <= t, ">": lambda r, t: r > t}
    return {name: {"ratio": r, "target": f"{op} {t}", "met": None if r is None else met[op](r, t)}
            for name, (r, t, op) in rows.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_check.json"))
    ap.add_argument("--dry-run", action="store_true", help="the same pipeline on the CPU with tiny shapes")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole run (default 450)")
    ap.add_argument("--only", default="", help="comma list of parts to run (default: all): "
                                               + ", ".join(name for name, _ in PARTS))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, model, runs)")
    ap.add_argument("--write-model", help=argparse.SUPPRESS)  # the model_folder part's own process
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write_model:
        return write_random_model(a.write_model, a.shape)
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device; run it on the GPU machine, or with --dry-run to check the pipeline")
    only = set(filter(None, a.only.split(",")))
    unknown = only - {name for name, _ in PARTS}
    if unknown:
        sys.exit(f"gpu_check.py: unknown part(s) in --only: {', '.join(sorted(unknown))}")
    deadline = time.time() + a.budget
    work = tempfile.mkdtemp(prefix="gpu_check_")
    ctx = {"work": work, "dry": a.dry_run, "model": os.path.join(work, "model")}
    functions = {"tests": tests_part, "model_folder": model_folder_part,
                 **{name: speed_part(name, a.dry_run) for name in SPEED_ROWS},
                 **{name: train_part(name) for name in TRAIN_RUNS}}
    previous = {}
    if only and os.path.isfile(a.out):  # a rerun of some parts keeps the others' results
        with open(a.out) as f:
            previous = json.load(f)
    result = {**{name: EMPTY_ROW for name in SPEED_ROWS}, "tests_passed": None, "tests_failed": None,
              "tests_skipped": None, **previous,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__,
              **{package: importlib.util.find_spec(package) and importlib.metadata.version(package)
                 for package in ("transformers", "peft")},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": a.dry_run, "budget_s": a.budget, "work": work if a.keep else None}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    try:
        for name, seconds in PARTS:
            if only and name not in only:
                continue
            left, start = deadline - time.time(), time.time()
            try:
                if left < 10:
                    raise Skipped(f"no time left in --budget {a.budget:.0f} s")
                entry = functions[name](ctx, min(seconds, left))
                entry["status"] = "ok" if entry.pop("ok", True) else "failed"
            except Skipped as e:
                entry = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001  (a broken part is recorded; the next one runs)
                entry = {"status": "failed", "error": str(e) if isinstance(e, Failed) else f"{type(e).__name__}: {e}"}
            entry["seconds"] = round(time.time() - start, 1)
            print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s"
                  + "".join(f"; {entry[k]}" for k in ("error", "reason") if k in entry), flush=True)
            result[name] = {**(EMPTY_ROW if name in SPEED_ROWS else {}), **entry}
            if name == "tests":
                result.update({f"tests_{k}": entry.get(k) for k in ("passed", "failed", "skipped")})
            result["targets"] = targets(result)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] wrote {a.out}; targets: " + ", ".join(
        f"{k} {v['ratio']} ({v['target']}: {'met' if v['met'] else 'not met' if v['met'] is False else 'n/a'})"
        for k, v in targets(result).items()))


if __name__ == "__main__":
    main()
