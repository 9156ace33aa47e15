"""Shared by the tests that run minorpo's entry points in subprocesses."""
import concurrent.futures
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


def run_all(jobs, **kwargs):
    """{name: args} -> {name: CompletedProcess}, run as _run runs them, as many at once as there are cores:
    each uses one thread, so a file of short subprocess tests would otherwise leave the other cores idle."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, args, **kwargs) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


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


@pytest.fixture(scope="session")
def run_many():
    """run_many({name: args}) -> {name: CompletedProcess}: several entry-point runs at once (see run_all)."""
    return run_all
