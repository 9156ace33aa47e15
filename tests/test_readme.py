"""README: the reading order's line ranges still hold the functions it names, and its equations block is the one
loss.py opens with, so neither drifts from the code as the code moves."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_range_of_the_reading_order_holds_the_functions_it_names():
    block = re.search(r"<!-- reading-order -->(.*?)<!-- /reading-order -->", readme(), re.S).group(1)
    steps = re.findall(r"`([\w/]+\.py)` lines (\d+)-(\d+)(.*)", block)
    assert len(steps) >= 7
    for path, first, last, rest in steps:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert int(last) <= len(lines), (path, last, len(lines))
        defined = {m.group(2): n for n, line in enumerate(lines, 1)
                   if (m := re.match(r"\s*(def|class) (\w+)", line))}
        named = [name for name in re.findall(r"`(\w+)`", rest) if name in defined]
        assert named, f"{path}: the step names no function or class of the file"
        for name in named:
            assert int(first) <= defined[name] <= int(last), f"{path}: {name} is at line {defined[name]}, " \
                                                               f"outside {first}-{last}"


def test_the_equations_are_the_same_in_the_readme_and_in_loss_py():
    from minorpo import loss
    for name in ("label_logps", "sequence_logps", "log_odds", "odds_ratio_loss", "orpo_objective"):
        assert name in loss.__doc__
    for equation in ("Eq. 3", "Eq. 4", "Eq. 5", "Eq. 7", "Eq. 2", "Eq. 6"):
        assert equation in loss.__doc__ and equation in readme().split("## Read the code")[1].split("## ")[0]
