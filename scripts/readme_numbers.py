"""Regenerate every number in README.md from real runs of today's code (needs only minorpo's dependencies).

    python scripts/readme_numbers.py                # a few minutes on 2 CPU cores; rewrites README.md, the SVGs
    python scripts/readme_numbers.py --only memory  # one block (torchrun runs: needs no quiet CPU)

It runs the embedded default four ways (ORPO and SFT on data.path=tiny; ORPO with mean and with sum log-probs on
data.path=tiny-lengths) into a temporary folder, reads their metrics.jsonl and wall times, and replaces the
text between each pair of `<!-- numbers:NAME -->` and `<!-- /numbers:NAME -->` markers in README.md. Nothing else
is edited. It draws the SFT and ORPO runs into docs/sft-vs-orpo.svg and the two length runs into
docs/sum-vs-mean.svg. It stops, writing nothing, if a run no longer shows what the README says it shows.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minorpo import plot  # noqa: E402


def run(out, preset, *overrides):
    """Run train.py; return (eval rows by step, train rows by step, wall seconds, stdout)."""
    start = time.time()
    p = subprocess.run([sys.executable, "train.py", f"presets/{preset}.yml", f"output_dir={out}", *overrides],
                       cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    if p.returncode:
        sys.exit(f"train.py {preset} {' '.join(overrides)} failed:\n{p.stderr[-2000:]}")
    run_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_name=")), preset)
    with open(os.path.join(out, run_name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in rows if "eval/pref_accuracy" in r}
    trains = {r["step"]: r for r in rows if "train/total_loss" in r}
    return evals, trains, seconds, p.stdout


def table(orpo, sft):
    steps = sorted(step for step in orpo[0] if step % 100 == 0 or step == max(orpo[0]))
    head = "| held-out pairs | " + " | ".join(f"step {s}" if s == 0 else str(s) for s in steps) + " | wall time |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for name, (evals, _, seconds, _) in (("SFT", sft), ("ORPO (λ = 3)", orpo)):
        for i, (key, label) in enumerate((("eval/chosen_logps", "chosen, mean log-prob"),
                                          ("eval/rejected_logps", "rejected, mean log-prob"),
                                          ("eval/pref_accuracy", "preference accuracy"))):
            cells = [f"{evals[s][key]:.3f}" for s in steps]
            lines.append(f"| {name}: {label} | " + " | ".join(cells) + f" | {f'{seconds:.0f} s' if i == 0 else ''} |")
    return "\n".join(lines)


def check_lesson(orpo, sft):
    """The README's claims about the two runs, each checked against their held-out numbers."""
    first, o, s = orpo[0][0], orpo[0][max(orpo[0])], sft[0][max(sft[0])]
    claims = {"the base is near chance": 0.3 <= first["eval/pref_accuracy"] <= 0.7,
              "the base finds both answers likely (> -3 a token)": min(first["eval/chosen_logps"],
                                                                        first["eval/rejected_logps"]) > -3,
              "SFT raises the rejected answers": s["eval/rejected_logps"] > first["eval/rejected_logps"],
              "ORPO lowers the rejected answers": o["eval/rejected_logps"] < first["eval/rejected_logps"],
              "ORPO raises the chosen answers": o["eval/chosen_logps"] > first["eval/chosen_logps"],
              "ORPO reaches 0.9": o["eval/pref_accuracy"] >= 0.9,
              "SFT ends at least 0.1 below ORPO": s["eval/pref_accuracy"] <= o["eval/pref_accuracy"] - 0.1}
    if broken := [claim for claim, holds in claims.items() if not holds]:
        sys.exit(f"the runs no longer show what README.md says: {'; '.join(broken)}. Rework the demo or the text")


def summary(orpo, sft):
    first, o, s = orpo[0][0], orpo[0][max(orpo[0])], sft[0][max(sft[0])]
    sample = re.findall(r"\[sample\] after training\n((?:  .*\n)+)", orpo[3])
    example = sample[0].splitlines()[0].strip() if sample else ""
    return (f"From the same base (held-out accuracy {first['eval/pref_accuracy']:.3f}; chosen and rejected answers "
            f"at {first['eval/chosen_logps']:.2f} and {first['eval/rejected_logps']:.2f} a token, where a random "
            f"model is near -6), SFT lifts the rejected answers to {s['eval/rejected_logps']:.2f} along with the "
            f"chosen ones ({s['eval/chosen_logps']:.2f}) and ends at a preference accuracy of "
            f"{s['eval/pref_accuracy']:.3f}. ORPO pushes the rejected answers down to {o['eval/rejected_logps']:.2f} "
            f"while the chosen ones rise to {o['eval/chosen_logps']:.2f}, and ends at {o['eval/pref_accuracy']:.3f}. "
            f"ORPO's run takes {orpo[2] / sft[2]:.2f} times SFT's: it runs the rejected rows too. A sample after ORPO "
            f"training: `{example}`.")


def lengths(mean, summed):
    """The held-out accuracy split by which answer is longer, at step 0, two thirds through and at the end."""
    steps = (0, max(mean[0]) * 2 // 3, max(mean[0]))
    lines = ["| data.path=tiny-lengths | " + " | ".join(f"step {s}: chosen longer | step {s}: chosen shorter"
                                                    for s in steps) + " |", "|---" * 7 + "|"]
    for label, (evals, *_) in (("mean (the paper)", mean), ("sum", summed)):
        cells = [f"{evals[s][f'eval/pref_accuracy_{kind}']:.3f}" for s in steps for kind in ("longer", "shorter")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n"


def lengths_summary(mean, summed):
    mid, last = max(mean[0]) * 2 // 3, max(mean[0])
    m, s = mean[0], summed[0]
    return (f"At step 0 both rank by length (accuracy {s[0]['eval/pref_accuracy_longer']:.3f} where the chosen "
            f"answer is the longer one, {s[0]['eval/pref_accuracy_shorter']:.3f} where it is the shorter): the base "
            f"has never seen the longer sign-off, and its item is a guess among 3 to 6. On the pairs whose chosen "
            f"answer is longer, the mean reaches {m[mid]['eval/pref_accuracy_longer']:.3f} at step {mid} and "
            f"{m[last]['eval/pref_accuracy_longer']:.3f} at step {last}; the sum "
            f"{s[mid]['eval/pref_accuracy_longer']:.3f} and {s[last]['eval/pref_accuracy_longer']:.3f}. A per-token "
            f"mean spreads the cost of the extra tokens over the answer; the sum charges each in full, so its log "
            f"odds ratio is {s[last]['eval/log_odds_ratio']:+.1f} at step {last} (mean: "
            f"{m[last]['eval/log_odds_ratio']:+.2f}) and its first L_OR {first_or(summed):.1f} (mean: "
            f"{first_or(mean):.2f}).")


def first_or(run):
    return run[1][min(run[1])]["train/orpo_loss"]


def bench(*args):
    """The JSON line bench.py prints for args, run with one CPU thread (steadier timings on a shared machine)."""
    p = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode:
        sys.exit(f"bench.py {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def packing():
    """Tokens processed and CPU step time, packed against padded, on two batches (bench.py)."""
    lines = ["| batch (bench.py arguments) | layout | tokens processed a step | real tokens | CPU step |",
             "|---|---|---|---|---|"]
    for label, args in (("the embedded default's (`--data tiny --configs full`)", ["--data", "tiny", "--configs",
                                                                                  "full", "--steps", "40"]),
                        ("8 protocol pairs, tiny shapes (`--tiny --configs lora`)", ["--tiny", "--configs", "lora",
                                                                                    "--steps", "20"])):
        rows = {layout: bench(*args, "--layout", layout) for layout in ("padded", "packed")}
        for layout, row in rows.items():
            lines.append(f"| {label} | {layout} | {row['tokens_processed']:,} | {row['real_tokens']:,} | "
                         f"{row['step_ms']:.0f} ms |")
        packed, padded = rows["packed"], rows["padded"]
        lines.append(f"| | packed / padded | {packed['tokens_processed'] / padded['tokens_processed']:.2f} | | "
                     f"{packed['step_ms'] / padded['step_ms']:.2f} |")
    return "\n" + "\n".join(lines) + "\n"


def memory():
    """Bytes each rank holds after one step ([memory] lines): one process, then FSDP on 1 and 2 ranks."""
    lora, full = ("training.phases=[{step: 0, trainable: [%s]}]" % groups for groups in ("lora, attn_lora", "all"))
    runs = [("full fine-tuning, no FSDP", 1, False, [full]), ("full fine-tuning, FSDP", 1, True, [full]),
            ("full fine-tuning, FSDP", 2, True, [full]), ("LoRA r16, FSDP", 1, True, [lora]),
            ("LoRA r16, FSDP", 2, True, [lora])]
    lines = ["| run (the tiny default model) | ranks | parameters | gradients | AdamW | total per rank |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as out:
        for i, (label, ranks, fsdp, extra) in enumerate(runs):
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if fsdp else []
            args = [sys.executable, *launcher, "train.py", "presets/orpo.yml", f"output_dir={out}", f"run_name=m{i}",
                    "training.max_steps=1", "training.batch_size=4", "training.eval_every=0", "sample.max_new_tokens=1",
                    *(["training.fsdp=true"] if fsdp else []), *extra]
            p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            found = re.search(r"\[memory\] rank 0 of \d+ holds parameters ([\d.]+) MiB \+ gradients ([\d.]+) MiB \+ "
                              r"AdamW ([\d.]+) MiB = ([\d.]+) MiB", p.stdout)
            if p.returncode or not found:
                sys.exit(f"{' '.join(args[1:])} failed:\n{p.stderr[-2000:]}")
            lines.append(f"| {label} | {ranks} | " + " | ".join(f"{x} MiB" for x in found.groups()) + " |")
    return "\n" + "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of the blocks to rewrite (default: all): table, summary, "
                                               "lengths, time (the training runs and the SVGs), packing, memory")
    only = set(filter(None, ap.parse_args().only.split(","))) or {"table", "packing", "memory"}
    env_threads, blocks = os.environ.get("OMP_NUM_THREADS"), {}
    if only & {"table", "summary", "lengths", "lengths-summary", "time", "base-time"}:
        with tempfile.TemporaryDirectory() as out:
            start = time.time()  # the tiny base is built once, before the timed runs
            build = f"from minorpo import tiny; tiny.ensure_model({os.path.join(out, 'tiny-base')!r})"
            subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            base_seconds = time.time() - start
            orpo, sft = run(out, "orpo"), run(out, "sft")
            check_lesson(orpo, sft)
            mean = run(out, "orpo", "data.path=tiny-lengths", "run_name=lengths-mean")
            summed = run(out, "orpo", "data.path=tiny-lengths", "loss.logp_reduction=sum", "run_name=lengths-sum")
            plot.write_svg([os.path.join(out, "sft"), os.path.join(out, "orpo")],  # SFT blue, ORPO orange
                           os.path.join(ROOT, "docs", "sft-vs-orpo.svg"))
            plot.write_svg([os.path.join(out, "lengths-mean"), os.path.join(out, "lengths-sum")],
                           os.path.join(ROOT, "docs", "sum-vs-mean.svg"))
        blocks.update({"table": "\n" + table(orpo, sft) + "\n", "summary": summary(orpo, sft),
                       "lengths": lengths(mean, summed), "time": f"{orpo[2]:.0f} s",
                       "base-time": f"{base_seconds:.0f} s",
                       "lengths-summary": lengths_summary(mean, summed)})
    if "packing" in only:
        blocks["packing"] = packing()
    if "memory" in only:
        blocks["memory"] = memory()
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- numbers:{name} -->).*?(<!-- /numbers:{name} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"README.md: no <!-- numbers:{name} --> ... <!-- /numbers:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    with open(path, "w") as f:
        f.write(text)
    for name, body in blocks.items():
        print(f"[{name}] {body.strip()}")
    print(f"README.md updated: {', '.join(blocks)} (OMP_NUM_THREADS={env_threads or 'unset'})")


if __name__ == "__main__":
    main()
