"""Training curves as one self-contained SVG, from the metrics.jsonl of one or more runs.

    python -m minorpo.plot outputs/orpo                     # writes outputs/orpo/metrics.svg
    python -m minorpo.plot outputs/orpo outputs/sft         # writes outputs/orpo/vs-sft.svg
    python -m minorpo.plot outputs/orpo outputs/sft --out docs/sft-vs-orpo.svg
    plot.write_svg("outputs/orpo/metrics.jsonl", "outputs/orpo/metrics.svg")   # from Python

Four panels: the loss terms L_SFT and L_OR, the log odds ratio, the preference accuracy (train and eval),
and the held-out chosen against rejected log-probabilities, the ORPO paper's lesson: SFT raises both
(its Figure 7), ORPO pushes them apart (its Figure 3); a fifth, held-out accuracy on pairs whose chosen
answer is longer against shorter, when the metrics hold it. Colour follows the run, not the argument order:
the first SFT run (no train/orpo_loss) is blue, the first ORPO run orange, every other run the next free
colour; solid against dashed tells the two curves of a panel apart. Accuracy axes end at 1.

Decisions:
- The SVG is written by hand, a few dozen lines of text, so minorpo needs no plotting library.
- A cut last line (a run still writing, or killed mid-line) is skipped with a warning; any other line
  that is not a JSON object stops with file:line. A missing key is a missing point (SFT runs log no
  train/orpo_loss), and values that are not finite or beyond +-1e12 are left out. Only the plotted keys of
  a row are kept, and past MAX_ROWS rows every other one is dropped (a 440-pixel panel shows no more), so
  memory stays bounded for any file.
- Output goes to <run>/metrics.svg (several runs: <first run>/vs-<other runs>.svg), written atomically, or
  only where --out says. It replaces only a regular file that minorpo.plot wrote (an SVG with its title),
  never a link, a device, a folder or another file.
"""
import argparse
import html
import itertools
import json
import math
import os
import re
import sys

from minorpo.files import UserError, atomic_write, file_inside

PANELS = [  # (title, [(metrics key, legend label)]): the first curve solid, the second dashed
    ("Loss terms (train)", [("train/sft_loss", "L_SFT"), ("train/orpo_loss", "L_OR")]),
    ("Log odds ratio", [("train/log_odds_ratio", "train"), ("eval/log_odds_ratio", "eval")]),
    ("Preference accuracy", [("train/pref_accuracy", "train"), ("eval/pref_accuracy", "eval")]),
    ("Log-probability (eval)", [("eval/chosen_logps", "chosen"), ("eval/rejected_logps", "rejected")]),
]
BY_LENGTH = ("Preference accuracy, by the longer answer (eval)",  # drawn when a run's metrics hold it
             [("eval/pref_accuracy_longer", "chosen"), ("eval/pref_accuracy_shorter", "rejected")])
BOUNDS = {"Preference accuracy": (0.0, 1.0), BY_LENGTH[0]: (0.0, 1.0)}  # a share: the axis stays in [0, 1]
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
KIND_COLORS = {"sft": 0, "orpo": 1}  # the README's figure: SFT blue, ORPO orange, whatever the order given
DASHES = ("", ' stroke-dasharray="6 4"')
PANEL_W, PANEL_H, MARGIN, TOP = 440, 270, 55, 60  # one panel's box; left/bottom room for ticks; title band
MAX_LINE = 1 << 20  # a metrics row is a few hundred bytes; a longer line is not a metrics file
MAX_ROWS = 10_000
TITLE = "minorpo training curves"  # in the first 1 KB of every plot: how check_out knows its own files
KEYS = ["step"] + [key for _, curves in PANELS + [BY_LENGTH] for key, _ in curves]
OLD_NAMES = {"train/log_odds": "train/log_odds_ratio", "eval/log_odds": "eval/log_odds_ratio"}  # before the rename


class PlotError(UserError):
    """A metrics file that cannot be plotted; the message names the file and the fix."""


def metrics_file(path):
    """path itself, or the metrics.jsonl inside a run folder."""
    if os.path.isdir(path):
        return file_inside(path, "metrics.jsonl", "metrics file")
    if not os.path.isfile(path):
        kind = "not a regular file" if os.path.exists(path) else "not found"
        raise PlotError(f"{path}: {kind}; pass a run folder (outputs/orpo) or its metrics.jsonl")
    return path


def read_metrics(path):
    """The rows of a metrics.jsonl, sorted by step; a cut last line is skipped with a warning."""
    rows, bad, stride, seen = [], None, 1, 0
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if not line.strip():
                continue
            if bad:  # a bad line before the last one: not a cut line
                raise PlotError(f"{bad}: not a metrics row; metrics.jsonl holds one JSON object per line")
            try:
                row = json.loads(line) if len(line) <= MAX_LINE else None
            except (ValueError, RecursionError):  # not JSON, or nested deeper than Python recurses
                row = None
            if isinstance(row, dict) and _number(row.get("step")) is not None:
                row.update({new: row[old] for old, new in OLD_NAMES.items() if old in row and new not in row})
                seen += 1
                if seen % stride == 0:
                    rows.append({key: _number(row.get(key)) for key in KEYS})
                if len(rows) >= 2 * MAX_ROWS:
                    rows, stride = rows[1::2], 2 * stride
            else:
                bad = f'{path}:{n}'
    if bad and not rows:
        raise PlotError(f"{bad}: not a metrics row; metrics.jsonl holds one JSON object per line")
    if bad:
        print(f"warning: {bad}: cut last line skipped (the run may still be writing)", file=sys.stderr)
    if not rows:
        raise PlotError(f"{path}: no metrics rows; a run writes them every training.log_every steps")
    return sorted(rows, key=lambda row: row["step"])


def _number(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e12  # nan fails too
    return float(value) if ok else None


def ticks(lo, hi, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(f for f in (1, 2, 5, 10) if f * step >= raw)
    first = math.floor(lo / step + 1e-9)  # 1.0 / 0.2 may be 5.000000001: no tick past a bound of 1
    return [i * step for i in range(first, max(math.ceil(hi / step - 1e-9), first + 1) + 1)]  # two at least


def kind(rows):
    """sft or orpo, as the metrics tell (an ORPO run logs train/orpo_loss), or None."""
    logged = {key for row in rows for key in ("train/orpo_loss", "train/sft_loss") if row[key] is not None}
    return "orpo" if "train/orpo_loss" in logged else "sft" if logged else None


def colors(runs):
    """A colour for each run [(name, rows)]: the first SFT run blue, the first ORPO run orange, the others the
    next free colours in order, so a run keeps its colour whatever order the runs are given in."""
    chosen = [None] * len(runs)
    for i, (_, rows) in enumerate(runs):
        if KIND_COLORS.get(kind(rows)) is not None and KIND_COLORS[kind(rows)] not in chosen:
            chosen[i] = KIND_COLORS[kind(rows)]
    free = itertools.cycle(c for c in range(len(COLORS)) if c not in chosen)
    return [COLORS[c if c is not None else next(free)] for c in chosen]


def panel(x0, y0, title, curves, runs):
    """SVG elements of one panel with its top-left corner at (x0, y0); curves as in PANELS."""
    lines = [(color, dash, f"{name}: {key}", points) for color, (name, rows) in zip(colors(runs), runs)
             for dash, (key, _) in zip(DASHES, curves)
             if (points := [(row["step"], row[key]) for row in rows if row[key] is not None])]
    out = [f'<text x="{x0 + PANEL_W / 2}" y="{y0 + 14}" text-anchor="middle" font-weight="bold">'
           f'{html.escape(title)}</text>']
    for i, (dash, (_, label)) in enumerate(zip(DASHES, curves)):  # the line-style legend, top right
        lx = x0 + PANEL_W - 150 + 80 * i
        out.append(f'<line x1="{lx}" y1="{y0 + 30}" x2="{lx + 24}" y2="{y0 + 30}" stroke="#444"{dash}/>'
                   f'<text x="{lx + 28}" y="{y0 + 34}">{html.escape(label)}</text>')
    left, right, top, bottom = x0 + MARGIN, x0 + PANEL_W - 10, y0 + 42, y0 + PANEL_H - 30
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>')
    if not lines:
        return out + [f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle" '
                      'fill="#999">no data</text>']
    xs = [x for *_, points in lines for x, _ in points]
    ys = [y for *_, points in lines for _, y in points]
    x_ticks = ticks(min(xs), max(max(xs), min(xs) + 1))  # at least one step wide
    scale = max(abs(min(ys)), abs(max(ys)))  # a flat curve gets a band around it; a tiny one, [-1, 1]
    y_span = max(max(ys) - min(ys), 0.01 * scale) if scale > 1e-9 else 1.0
    low, high = BOUNDS.get(title, (-math.inf, math.inf))
    y_ticks = ticks(max(low, min(ys) - 0.05 * y_span), min(high, max(ys) + 0.05 * y_span))

    def to_x(x):  # data -> pixels, mapping the outer ticks onto the plot box
        return left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)

    def to_y(y):
        return bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
    for x in x_ticks:
        out.append(f'<line x1="{to_x(x):.1f}" y1="{bottom}" x2="{to_x(x):.1f}" y2="{bottom + 4}" stroke="#999"/>'
                   f'<text x="{to_x(x):.1f}" y="{bottom + 16}" text-anchor="middle">{x:g}</text>')
    for y in y_ticks:
        out.append(f'<line x1="{left}" y1="{to_y(y):.1f}" x2="{right}" y2="{to_y(y):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{to_y(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 28}" text-anchor="middle">step</text>')
    for color, dash, name, points in lines:  # the <title> names the curve when hovered
        xy = " ".join(f"{to_x(x):.2f},{to_y(y):.2f}" for x, y in points)
        out.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.8"{dash}>'
                   f'<title>{html.escape(name)}</title></polyline>')
        if len(points) == 1:  # one row: a line of one point is invisible, so mark it
            out.append(f'<circle cx="{to_x(points[0][0]):.2f}" cy="{to_y(points[0][1]):.2f}" r="3" fill="{color}"/>')
    return out


def render_svg(runs):
    """The SVG text for runs [(name, rows)]: a title band with the run legend, then the panels, two a row."""
    by_length = any(row[key] is not None for _, rows in runs for row in rows for key, _ in BY_LENGTH[1])
    panels = PANELS + [BY_LENGTH] * by_length
    width, height = 2 * PANEL_W + 20, TOP + (len(panels) + 1) // 2 * PANEL_H + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{TITLE}</text>']
    for i, ((name, rows), color) in enumerate(zip(runs, colors(runs))):  # the run legend, with each run's kind
        what = f'<tspan fill="#777"> ({kind(rows)})</tspan>' if kind(rows) else ""
        out.append(f'<rect x="{10 + 150 * i}" y="36" width="14" height="4" fill="{color}"/>'
                   f'<text x="{28 + 150 * i}" y="42">{html.escape(name)}{what}</text>')
    for i, (title, curves) in enumerate(panels):
        out += panel(10 + (i % 2) * PANEL_W, TOP + (i // 2) * PANEL_H, title, curves, runs)
    return "\n".join(out + ["</svg>"]) + "\n"


def run_name(path):
    """The run's folder name: outputs/orpo/metrics.jsonl and outputs/orpo are both "orpo"."""
    path = os.path.normpath(os.path.abspath(path))
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def check_out(path):
    """Refuse an output path that is not an .svg name, or that holds anything but an SVG minorpo.plot wrote."""
    if os.path.islink(path) or os.path.lexists(path) and not os.path.isfile(path):
        raise PlotError(f"{path}: not a regular file (a link, a folder or a device); refused: give a new file name")
    if not str(path).endswith(".svg"):
        raise PlotError(f"{path}: the plot is an SVG file; give a name ending in .svg")
    if os.path.exists(path):
        with open(path, "rb") as f:
            head = f.read(1024)
        if not (head.startswith(b'<svg xmlns="http://www.w3.org/2000/svg"') and TITLE.encode() in head):
            raise PlotError(f"{path}: exists and is not a plot minorpo.plot wrote; refused: move it or give "
                            "another --out")


def write_svg(metrics_path, svg_path):
    """Plot one run (a metrics.jsonl or run folder), or a list of runs, into svg_path (atomically), replacing
    only a plot this module wrote."""
    paths = [metrics_path] if isinstance(metrics_path, (str, os.PathLike)) else list(metrics_path)
    runs = [(run_name(p), read_metrics(metrics_file(p))) for p in paths]
    check_out(svg_path)
    atomic_write(svg_path, render_svg(runs))
    return svg_path


def default_out(runs):
    """<run>/metrics.svg for one run; <first run>/vs-<the others' names>.svg for several: beside the runs,
    never in the directory the command happens to run from."""
    folder = os.path.dirname(metrics_file(runs[0]))
    if len(runs) == 1:
        return os.path.join(folder, "metrics.svg")
    others = "-".join(re.sub(r"[^\w.+-]", "_", run_name(path)) for path in runs[1:])
    return os.path.join(folder, f"vs-{others[:100]}.svg")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minorpo.plot", description=__doc__.split("\n")[0])
    parser.error = lambda message: sys.exit(f"error: {message} (python -m minorpo.plot --help lists the arguments)")
    parser.add_argument("runs", nargs="+", help="run folders (outputs/orpo) or their metrics.jsonl files")
    parser.add_argument("--out", help="the SVG to write; default <run>/metrics.svg, for several runs "
                        "<first run>/vs-<other runs>.svg; only a plot minorpo.plot wrote is ever replaced")
    args = parser.parse_args(argv)
    try:
        print(write_svg(args.runs, args.out or default_out(args.runs)))
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
