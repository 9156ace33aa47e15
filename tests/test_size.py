"""The code stays readable in one sitting: no file of the package, train.py, bench.py or scripts/ over 300
lines, and no line over 120 characters."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "minorpo", "*.py")) + glob.glob(os.path.join(ROOT, "scripts", "*.py"))
               + [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "bench.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda path: os.path.relpath(path, ROOT))
def test_a_file_is_at_most_300_lines_of_at_most_120_characters(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 300, f"{len(lines)} lines"
    too_long = [number for number, line in enumerate(lines, 1) if len(line) > 120]
    assert not too_long, f"lines over 120 characters: {too_long}"
