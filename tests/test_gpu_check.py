"""scripts/gpu_check.py: its dry run (the whole pipeline, tiny shapes, CPU) writes every field of the JSON;
the targets are judged from the ratios; every script answers --help with what it needs."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

HAS_HF = all(importlib.util.find_spec(name) for name in ("transformers", "peft"))


def test_dry_run_writes_every_field(run_many, tmp_path):
    # the pipeline in two halves at once (--only), one per core: the speed rows and tests, then the
    # model folder and the training runs on it
    halves = {"speed": list(gpu_check.SPEED_ROWS) + ["tests"], "train": ["model_folder", *gpu_check.TRAIN_RUNS]}
    runs = run_many({half: ["scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path / f"{half}.json"), "--budget",
                            "500", "--only", ",".join(parts)] for half, parts in halves.items()}, timeout=560)
    assert all(p.returncode == 0 for p in runs.values()), [p.stderr[-3000:] for p in runs.values()]
    speed, train = (json.loads((tmp_path / f"{half}.json").read_text()) for half in halves)
    assert not set(gpu_check.TRAIN_RUNS) & set(speed)  # --only ran only these parts
    result = {**speed, **{name: train[name] for name in halves["train"]}}
    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["dry_run"] is True
    for name in gpu_check.SPEED_ROWS:
        row = result[name]
        assert {"real_tok_per_s", "peak_gb", "step_ms", "status"} <= set(row), name
        if name.startswith("hf_") and not HAS_HF:
            assert row["status"] == "skipped" and "transformers" in row["reason"]
        else:
            assert row["status"] == "ok" and row["real_tok_per_s"] > 0 and row["step_ms"] > 0, row
    # on the CPU the CUDA variants skip and the CPU variants pass (tests/test_cuda.py); none fails
    assert result["tests_failed"] == 0 and result["tests_passed"] >= 4 and result["tests_skipped"] >= 4
    for name in gpu_check.TRAIN_RUNS:
        run = result[name]
        assert run["status"] == "ok", run
        assert run["losses_finite"] and run["final_written"] and run["saved_tensors_finite"], run
    assert all(result[name]["loss_fell"] for name in ("train_lora", "train_full", "train_compiled"))
    assert result["train_resume"]["resume_equal"] and result["train_resume"]["steps"] == [3, 4]
    assert set(result["targets"]) == {"lora_vs_baseline_gc_tok_per_s", "lora_vs_baseline_nogc_tok_per_s",
                                      "lora_peak_vs_baseline_gc_peak", "full_vs_baseline_nogc_tok_per_s"}
    assert result["work"] is None and not os.path.exists(result["model_folder"]["folder"])  # cleaned up


def test_targets_are_met_or_not_by_the_ratios():
    row = lambda tok, peak: {"real_tok_per_s": tok, "peak_gb": peak}  # noqa: E731
    result = {"minorpo_lora": row(64000, 10.0), "minorpo_full": row(20000, 30.0),
              "hf_peft_trl_style_gc": row(16000, 18.5), "hf_peft_trl_style_nogc": row(21000, 42.8)}
    targets = gpu_check.targets(result)
    assert targets["lora_vs_baseline_gc_tok_per_s"] == {"ratio": 4.0, "target": ">= 4.0", "met": True}
    assert targets["lora_vs_baseline_nogc_tok_per_s"]["met"] is True
    assert targets["lora_peak_vs_baseline_gc_peak"]["met"] is True
    assert targets["full_vs_baseline_nogc_tok_per_s"]["met"] is False  # 20k is slower than 21k
    del result["hf_peft_trl_style_gc"]  # a part that did not run: no ratio, no verdict
    assert gpu_check.targets(result)["lora_vs_baseline_gc_tok_per_s"] == {"ratio": None, "target": ">= 4.0",
                                                                        "met": None}


def test_a_part_past_its_time_limit_is_killed_with_what_it_started(tmp_path):
    started = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    with pytest.raises(gpu_check.Failed, match="timeout after 1 s"):
        gpu_check.run_python(["-c", started], 1, "sleeper", str(tmp_path))


@pytest.mark.parametrize("script", ["bench.py", "scripts/gpu_check.py", "scripts/hf_baseline.py",
                                    "scripts/check_interop.py", "scripts/make_fixtures.py"])
def test_every_script_says_what_it_does_and_needs_in_help(run_limited, script):
    p = run_limited([script, "--help"], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    description = " ".join(p.stdout.split("\n\n")[1].split())  # argparse's paragraph after the usage
    assert "needs" in description, description


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_a_gpu_the_full_check_says_so_and_points_to_dry_run(run_limited, one_line_error):
    p = run_limited(["scripts/gpu_check.py", "--out", "unused.json"], timeout=60)
    one_line_error(p, "no CUDA device", "--dry-run")
