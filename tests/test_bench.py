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
