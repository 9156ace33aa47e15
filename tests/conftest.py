"""Shared by the tests that run minorpo's entry points in subprocesses.

Every entry-point run is a real, separate process, but it is forked from a warm one (the zygote below)
rather than started afresh: a fresh interpreter spends about 5 s importing torch and torch._dynamo (which
AdamW's step imports) before train.py's first line, and the suite runs about a hundred of them. The fork
has already imported them, then runs the script as `python script args` would (runpy, __main__, its own
cwd, environment, stdin, stdout, stderr, memory cap and exit code). MINORPO_TEST_FRESH=1 starts each run
afresh instead.
"""
import atexit
import concurrent.futures
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZYGOTE = r"""
import atexit, json, os, resource, runpy, sys, time, warnings
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch, torch._dynamo, minorpo.checkpoint, minorpo.data  # noqa: E401  what every run would import first


def run(job):  # in the forked child: become `python args...` and exit with its code
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["out"], os.O_WRONLY | os.O_CREAT),
                            (2, job["err"], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(path, flags, 0o644), fd)
    args, code = job["args"], 0
    try:
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()  # as the interpreter does at exit (train.py's run-folder lock goes there)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


buffer, running = b"", {}
os.set_blocking(0, False)
while True:
    try:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            sys.exit(0)  # the test session ended
        buffer += chunk
    except BlockingIOError:
        pass
    while b"\n" in buffer:
        line, buffer = buffer.split(b"\n", 1)
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run(job)
        running[pid] = job["status"]
        print(pid, flush=True)
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if not pid:
            break
        path = running.pop(pid)
        try:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.rename(path + ".tmp", path)  # whole, or not there
        except OSError:  # the caller gave up (its hang guard) and removed the folder
            pass
    time.sleep(0.02)
"""
_zygote, _lock = None, threading.Lock()
_tiny_base, _tiny_lock = None, threading.Lock()


def tiny_base(folder=None):
    """The embedded tiny base (minorpo/tiny.py), pre-trained once per test session (about 20 s) and copied into
    folder if given. Every train.py run with model_name tiny would otherwise pre-train it again in its own
    output_dir; _run and the torchrun tests put a copy there first (tests/test_tiny.py checks the build itself)."""
    global _tiny_base
    with _tiny_lock:
        if _tiny_base is None:
            from minorpo import tiny
            threads = torch_threads(1)
            cache = tempfile.mkdtemp(prefix="minorpo-tiny-")
            atexit.register(shutil.rmtree, cache, True)
            _tiny_base = tiny.ensure_model(os.path.join(cache, "tiny-base"))
            torch_threads(threads)
        if folder and not os.path.exists(folder):  # under the lock: run_many starts runs in threads
            try:
                shutil.copytree(_tiny_base, folder)
            except OSError:  # an output_dir that is a file, or unwritable: the run itself will say so
                shutil.rmtree(folder, ignore_errors=True)
    return folder or _tiny_base


_random_base = None


def random_tiny_base():
    """The tiny model with its random weights (no pre-training), built once per session: the equivalence tests
    (torchrun against one process) compare weights after AdamW steps, which the many near-zero gradients of a
    pre-trained base make sensitive to summation order."""
    global _random_base
    with _tiny_lock:
        if _random_base is None:
            from minorpo import tiny
            cache = tempfile.mkdtemp(prefix="minorpo-random-")
            atexit.register(shutil.rmtree, cache, True)
            _random_base = tiny.ensure_model(os.path.join(cache, "tiny-random"), pretrain_steps=0)
    return _random_base


def torch_threads(n):
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def seed_tiny_base(args, cwd=ROOT):
    """Before a train.py run on the tiny model: its <output_dir>/tiny-base, copied from the session's."""
    if not any(str(a).endswith("train.py") for a in args) or any(
            str(a).startswith("model_name=") and str(a) != "model_name=tiny" for a in args):
        return
    out = next((str(a).split("=", 1)[1] for a in args if str(a).startswith("output_dir=")), "outputs")
    tiny_base(os.path.join(cwd, out, "tiny-base"))


def _fresh(args, cwd, timeout, memory_gb, env):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env, preexec_fn=limit)


def _run(args, cwd=ROOT, timeout=300, memory_gb=6, env=None):
    """Run `python args...` with one thread, a memory cap (address space) and a hang guard of minutes.
    The cap and the timeout turn a regression that eats memory or hangs into a failed test."""
    global _zygote
    seed_tiny_base(args, cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    if os.environ.get("MINORPO_TEST_FRESH"):
        return _fresh(args, cwd, timeout, memory_gb, env)
    with _lock:
        if _zygote is None or _zygote.poll() is not None:
            _zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                 "PYTHONPATH": ROOT})
    with tempfile.TemporaryDirectory() as folder:
        job = {"args": list(map(str, args)), "cwd": str(cwd), "env": env, "memory": memory_gb << 30,
               "out": os.path.join(folder, "out"), "err": os.path.join(folder, "err"),
               "status": os.path.join(folder, "status")}
        with _lock:
            _zygote.stdin.write(json.dumps(job) + "\n")
            _zygote.stdin.flush()
            pid = int(_zygote.stdout.readline())
        deadline = time.time() + timeout
        while not os.path.exists(job["status"]):
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
            time.sleep(0.02)
        read = lambda name: open(job[name], encoding="utf-8", errors="replace").read()  # noqa: E731
        return subprocess.CompletedProcess([sys.executable, *args], int(read("status")), read("out"), read("err"))


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
