"""bench.py runs (tiny shapes, CPU) and prints its JSON lines; without a GPU it says so in one line.
No timing is asserted."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402


def test_protocol_batch_has_8450_real_tokens_and_shared_prompts():
    [batch], [real] = bench.batches_for("qwen3-0.6b", 8, "padded", None)
    assert real == 8450  # the batch docs/benchmark.md describes
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 16 and ids.shape[1] <= 1024
    start = int((labels[0] != -100).nonzero()[0])  # pair 0's prompt length
    assert start == int((labels[8] != -100).nonzero()[0]) and torch.equal(ids[0, :start], ids[8, :start])
    assert torch.equal(ids[0][labels[0] != -100], labels[0][labels[0] != -100])


def test_tiny_benchmark_prints_json_lines_for_both_layouts(run_many):
    runs = run_many({layout: ["bench.py", "--tiny", "--steps", "2", "--warmup", "1", "--layout", layout]
                     for layout in ("padded", "packed")})
    lines = {}
    for layout, p in runs.items():
        assert p.returncode == 0, p.stderr[-2000:]
        lines[layout] = [json.loads(line) for line in p.stdout.splitlines()]
        assert [r["name"] for r in lines[layout]] == ["minorpo_lora", "minorpo_full"]
        for r in lines[layout]:
            assert {"step_ms", "step_s", "real_tokens", "tokens_processed", "real_tok_per_s", "pairs_per_s",
                    "peak_gb", "layout", "device", "torch"} <= set(r)
            assert r["step_ms"] > 0 and r["layout"] == layout and r["loss"] == r["loss"]  # not NaN
        assert lines[layout][0]["trainable_params"] < lines[layout][1]["trainable_params"]
    for padded, packed in zip(lines["padded"], lines["packed"]):
        assert 0 < padded["real_tokens"] < padded["tokens_processed"]  # padding is counted apart from real tokens
        assert packed["real_tokens"] == padded["real_tokens"]  # both rows of a pair, whatever the layout
        assert packed["tokens_processed"] < 0.75 * padded["tokens_processed"]  # the prompt once, little padding
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-3)  # the same steps: the same loss


def test_embedded_default_batches_pack_into_fewer_tokens():
    padded, real = bench.batches_for("tiny-default", 16, "padded", "tiny")
    packed, packed_real = bench.batches_for("tiny-default", 16, "packed", "tiny")
    assert real == packed_real and len(padded) == len(packed) > 100  # one epoch of micro-batches of 16 pairs
    assert all(len(b["labels"]) == 32 for b in padded[:-1])
    assert sum(b["input_ids"].numel() for b in packed) < 0.75 * sum(b["input_ids"].numel() for b in padded)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_a_gpu_bench_says_so_in_one_line_and_points_to_tiny(run_limited, one_line_error):
    p = run_limited(["bench.py"], timeout=60, memory_gb=3)  # the 0.6B model would not fit: it must not be built
    one_line_error(p, "no CUDA device", "--tiny")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_threads_follow_train_py_and_every_argument_is_checked(run_many, run_limited, one_line_error):
    runs = run_many({"omp": ["bench.py", "--tiny", "--configs", "lora", "--steps", "1", "--warmup", "0"],
                     "misspelt": ["bench.py", "--tiny", "--configs", "lora,ful"],
                     "no steps": ["bench.py", "--tiny", "--steps", "0"],
                     "bad shape": ["bench.py", "--shape", "qwen9"]}, timeout=120)
    assert runs["omp"].returncode == 0, runs["omp"].stderr[-2000:]
    assert "[device] 1 CPU threads (OMP_NUM_THREADS" in runs["omp"].stderr  # the tests set OMP_NUM_THREADS=1
    assert [json.loads(line)["cpu_threads"] for line in runs["omp"].stdout.splitlines()] == [1]
    unset = run_limited(["bench.py", "--tiny", "--configs", "lora", "--steps", "1", "--warmup", "0"],
                        env={"OMP_NUM_THREADS": ""}, timeout=120)
    half = max(1, (os.cpu_count() or 2) // 2)
    assert f"[device] {half} CPU threads (half the cores" in unset.stderr and f'"cpu_threads": {half}' in unset.stdout
    one_line_error(runs["misspelt"], "--configs lora,ful", "'ful'", "lora, full")
    one_line_error(runs["no steps"], "--steps 0")
    one_line_error(runs["bad shape"], "--shape", "qwen9")
    assert not any(p.stdout for name, p in runs.items() if name != "omp")  # nothing ran under a wrong name
