"""bench.py runs (tiny shapes, CPU) and prints the protocol's JSON lines; no timing is asserted."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402


def test_protocol_batch_matches_the_protocol():
    batch, real = bench.protocol_batch(pairs=8, vocab_size=151936)
    assert real == 8450  # PROTOCOL.md: "This batch has 8,450 real tokens"
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == 16 and ids.shape[1] <= 1024
    start = int((labels[0] != -100).nonzero()[0])  # pair 0's prompt length
    assert start == int((labels[8] != -100).nonzero()[0]) and torch.equal(ids[0, :start], ids[8, :start])
    assert torch.equal(ids[0][labels[0] != -100], labels[0][labels[0] != -100])


def test_tiny_benchmark_prints_json_lines():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--tiny", "--steps", "2", "--warmup", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["name"] for r in lines] == ["minorpo_lora", "minorpo_full"]
    for r in lines:
        assert {"name", "ms", "real_tokens", "real_tok_per_s", "pairs_per_s", "peak_gb", "device", "torch"} <= set(r)
        assert r["ms"] > 0 and r["real_tokens"] > 0 and r["loss"] == r["loss"]  # not NaN
    assert lines[0]["trainable_params"] < lines[1]["trainable_params"]
