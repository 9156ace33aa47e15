"""Shared by the tests that run minorpo's entry points in subprocesses."""
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd=ROOT, timeout=300, memory_gb=6, env=None):
    """Run `python args...` with one thread, a memory cap (address space) and a hang guard of minutes.
    The cap and the timeout turn a regression that eats memory or hangs into a failed test."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env, preexec_fn=limit)


@pytest.fixture(scope="session")
def run_limited():
    """run_limited(["train.py", preset, "key=value", ...]) -> CompletedProcess, run from the repository root."""
    return _run


def assert_one_line_error(p, *needles):
    """The process failed with a clean message: nonzero exit, no traceback, the last stderr line names
    every needle (a file, a line, a key)."""
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    for needle in needles:
        assert needle in last, f"{needle!r} not in the last line: {last!r}"
    return last


@pytest.fixture(scope="session")
def one_line_error():
    return assert_one_line_error
