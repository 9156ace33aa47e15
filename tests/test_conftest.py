"""The test harness: a run forked from the warm interpreter behaves as `python args...` started afresh."""
import pytest
from conftest import _fresh, _run

CASES = {
    "exit code, cwd, environment": ["-c", "import os, sys; print(os.getcwd()); print(os.environ['X'], sys.argv[1:], "
                                          "file=sys.stderr); sys.exit(3)", "a", "b"],
    "sys.exit with a message": ["-c", "import sys; sys.exit('error: one line')"],
    "an uncaught exception": ["-c", "raise ValueError('deep')"],
    "a module": ["-m", "json.tool", "--no-such-flag"],
}


@pytest.mark.parametrize("name", CASES)
def test_a_forked_run_matches_a_fresh_one(tmp_path, name):
    args, env = CASES[name], {"X": "y"}
    forked, fresh = _run(args, cwd=tmp_path, env=env), _fresh(args, tmp_path, 120, 6, {"X": "y", "PATH": ""})
    assert forked.returncode == fresh.returncode != 0
    assert forked.stdout == fresh.stdout
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
