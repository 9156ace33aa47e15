"""Regenerate every number in README.md from real runs of today's code (needs only minorpo's dependencies).

    python scripts/readme_numbers.py                # a few minutes on 2 CPU cores; rewrites README.md, the SVG
    python scripts/readme_numbers.py --only memory  # one block (torchrun runs: needs no quiet CPU)

It runs the embedded default three ways (ORPO, SFT, ORPO with sequence-sum log-probs) into a temporary
folder, reads their metrics.jsonl and wall times, and replaces the text between each pair of
`<!-- numbers:NAME -->` and `<!-- /numbers:NAME -->` markers in README.md. Nothing else is edited. It also
draws the ORPO and SFT runs into docs/sft-vs-orpo.svg, the picture the README shows.
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
STEPS = (0, 100, 200, 300, 400)  # the presets' eval_every and max_steps


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
    head = "| held-out pairs | " + " | ".join(f"step {s}" if s == 0 else str(s) for s in STEPS) + " | wall time |"
    lines = [head, "|---" * (len(STEPS) + 2) + "|"]
    for name, (evals, _, seconds, _) in (("SFT", sft), ("ORPO (λ = 1)", orpo)):
        for i, (key, label) in enumerate((("eval/chosen_logps", "chosen, mean log-prob"),
                                          ("eval/rejected_logps", "rejected, mean log-prob"),
                                          ("eval/pref_accuracy", "preference accuracy"))):
            cells = [f"{evals[s][key]:.3f}" for s in STEPS]
            lines.append(f"| {name}: {label} | " + " | ".join(cells) + f" | {f'{seconds:.0f} s' if i == 0 else ''} |")
    return "\n".join(lines)


def summary(orpo, sft):
    o, s = orpo[0][STEPS[-1]], sft[0][STEPS[-1]]
    peak_step = max(STEPS, key=lambda step: sft[0][step]["eval/rejected_logps"])
    peak = sft[0][peak_step]["eval/rejected_logps"]
    rise = (f"to {peak:.2f} at step {peak_step}, their highest, because most of their tokens are the chosen "
            f"answer's; they end at {s['eval/rejected_logps']:.2f}" if peak_step != STEPS[-1] else
            f"to {peak:.2f} by step {peak_step}, still rising, because most of their tokens are the chosen answer's")
    sample = re.findall(r"\[sample\] after training\n((?:  .*\n)+)", orpo[3])
    example = sample[0].splitlines()[-1].strip() if sample else ""
    return (f"SFT lifts the rejected answers from {sft[0][0]['eval/rejected_logps']:.2f} (a random model) {rise}. "
            f"Under ORPO they end at {o['eval/rejected_logps']:.2f}, with the chosen "
            f"answers at {o['eval/chosen_logps']:.3f} (SFT: {s['eval/chosen_logps']:.3f}) and a held-out preference "
            f"accuracy of {o['eval/pref_accuracy']:.3f}. ORPO's run takes {orpo[2] / sft[2]:.2f} times SFT's: it "
            f"runs the rejected rows too. A sample after ORPO training: `{example}`.")


def sum_mode(orpo, orpo_sum):
    last = max(orpo_sum[1])
    summed, mean = orpo_sum[1][last], orpo[1][last]
    zero = min((step for step, r in orpo_sum[1].items()
                if all(orpo_sum[1][k]["train/orpo_loss"] < 5e-5 for k in orpo_sum[1] if k >= step)), default=None)
    ratio = "train/log_odds_ratio"
    return (f"by step {last} the log odds ratio is {summed[ratio]:+.2f} ({mean[ratio]:+.2f} with the mean)"
            f" and L_OR averages {summed['train/orpo_loss']:.3f} ({mean['train/orpo_loss']:.3f} with the mean)"
            + (f"; L_OR prints as 0.0000 from step {zero} on" if zero is not None else ""))


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
    lora = "training.phases=[{step: 0, trainable: [lora, attn_lora]}]"
    runs = [("full fine-tuning, no FSDP", 1, False, []), ("full fine-tuning, FSDP", 1, True, []),
            ("full fine-tuning, FSDP", 2, True, []), ("LoRA r16, FSDP", 1, True, [lora]),
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
                                               "sum, time (the training runs and the SVG), packing, memory")
    only = set(filter(None, ap.parse_args().only.split(","))) or {"table", "packing", "memory"}
    env_threads, blocks = os.environ.get("OMP_NUM_THREADS"), {}
    if only & {"table", "summary", "sum", "time"}:
        with tempfile.TemporaryDirectory() as out:
            orpo = run(out, "orpo")
            sft = run(out, "sft")
            orpo_sum = run(out, "orpo", "loss.logp_reduction=sum", "run_name=orpo-sum")
            plot.write_svg([os.path.join(out, "sft"), os.path.join(out, "orpo")],  # SFT blue, ORPO orange
                           os.path.join(ROOT, "docs", "sft-vs-orpo.svg"))
        blocks.update({"table": "\n" + table(orpo, sft) + "\n", "summary": summary(orpo, sft),
                       "sum": sum_mode(orpo, orpo_sum), "time": f"{orpo[2]:.0f} s"})
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
