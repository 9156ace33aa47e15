"""plot: the SVG parses, shows every panel, and its points are the metrics (one per row, in step order,
on linear axes); cut, partial and bad metrics files are handled as the module docstring says."""
import json
import os
import xml.etree.ElementTree as ET

import pytest

from minorpo import plot

SVG = "{http://www.w3.org/2000/svg}"


def orpo_rows(steps=6):
    """A step-0 row with eval/* only, then train rows, with eval every other row."""
    rows = [{"step": 0, "eval/pref_accuracy": 0.5, "eval/chosen_logps": -30.0, "eval/rejected_logps": -31.0,
             "eval/log_odds_ratio": 0.1}]
    for step in range(5, 5 * steps + 1, 5):
        row = {"step": step, "train/total_loss": 3.0 - 0.1 * step, "train/sft_loss": 2.5 - 0.05 * step,
               "train/orpo_loss": 0.7 - 0.01 * step, "train/log_odds_ratio": 0.02 * step ** 1.5,
               "train/pref_accuracy": 0.5 + 0.01 * step, "train/chosen_logps": -20.0 + step,
               "train/rejected_logps": -21.0 - step}
        if step % 10 == 0:
            row.update({"eval/pref_accuracy": 0.5 + 0.015 * step, "eval/chosen_logps": -30.0 + 0.3 * step,
                        "eval/rejected_logps": -31.0 - 0.2 * step ** 1.2, "eval/log_odds_ratio": 0.05 * step})
        rows.append(row)
    return rows


def write_run(folder, rows, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return folder


def curves(svg_path):
    """{polyline title ("run: key"): [(x, y) pixels]} of an SVG file, which must parse as XML."""
    root = ET.parse(svg_path).getroot()
    assert root.tag == SVG + "svg"
    return {line.find(SVG + "title").text: [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            for line in root.iter(SVG + "polyline")}


def texts(svg_path):
    return [t.text for t in ET.parse(svg_path).getroot().iter(SVG + "text")]


def assert_linear(pixels, values):
    """pixel = a + b * value for one a and b: the points are the values on a linear axis."""
    (p0, v0), (p1, v1) = (pixels[0], values[0]), (pixels[-1], values[-1])
    slope = (p1 - p0) / (v1 - v0)
    for p, v in zip(pixels, values):
        assert p == pytest.approx(p0 + slope * (v - v0), abs=0.02)
    return slope


def test_every_curve_has_one_point_per_row_with_its_key_on_linear_axes(tmp_path):
    rows = orpo_rows()
    run = write_run(tmp_path / "orpo", rows)
    svg = plot.write_svg(str(run / "metrics.jsonl"), str(tmp_path / "out.svg"))
    lines = curves(svg)
    keys = [key for _, panel_curves in plot.PANELS for key, _ in panel_curves]
    assert sorted(lines) == sorted(f"orpo: {key}" for key in keys)
    for key in keys:
        kept = [row for row in rows if key in row]
        points = lines[f"orpo: {key}"]
        assert len(points) == len(kept)
        assert assert_linear([x for x, _ in points], [row["step"] for row in kept]) > 0  # steps to the right
        assert assert_linear([y for _, y in points], [row[key] for row in kept]) < 0     # larger values up
    shown = texts(svg)
    for title, panel_curves in plot.PANELS:
        assert title in shown and all(label in shown for _, label in panel_curves)
    assert "orpo" in shown and "step" in shown


def test_two_runs_share_the_panels_with_a_legend_of_run_names(tmp_path):
    orpo, sft = write_run(tmp_path / "orpo", orpo_rows()), write_run(tmp_path / "sft", orpo_rows(3))
    svg = plot.write_svg([str(orpo), str(sft)], str(tmp_path / "both.svg"))
    lines = curves(svg)
    assert len(lines["orpo: eval/chosen_logps"]) == 4 and len(lines["sft: eval/chosen_logps"]) == 2
    assert {"orpo", "sft"} <= set(texts(svg))


def test_sft_run_without_orpo_or_eval_keys_plots_what_it_has(tmp_path):
    rows = [{"step": s, "train/sft_loss": 2.0 / s, "train/total_loss": 2.0 / s} for s in (1, 2, 3)]
    svg = plot.write_svg(str(write_run(tmp_path / "sft", rows)), str(tmp_path / "sft.svg"))
    assert list(curves(svg)) == ["sft: train/sft_loss"]
    assert texts(svg).count("no data") == 3  # log odds, accuracy, log-probabilities


def test_a_single_row_is_a_visible_point(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 0, "eval/chosen_logps": -3.0, "eval/rejected_logps": -3.0}])
    svg = plot.write_svg(str(run), str(tmp_path / "one.svg"))
    assert [len(points) for points in curves(svg).values()] == [1, 1]
    assert len(list(ET.parse(svg).getroot().iter(SVG + "circle"))) == 2


def test_ticks_are_round_and_cover_the_range():
    values = plot.ticks(-0.37, 2.9)
    assert values[0] <= -0.37 and values[-1] >= 2.9
    gaps = {round(b - a, 9) for a, b in zip(values, values[1:])}
    assert gaps == {1.0} and values[0] == -1 and values[-1] == 3  # (2.9 + 0.37) / 5 rounds up to 1


@pytest.mark.parametrize("values", [[1e300, -1e300, 1.0, 2.0], [1.0, 1.0 + 1e-15, 1.0], [5e-324, 0.0, 5e-324],
                                    [float("nan"), 3.0, float("inf"), 3.5]])
def test_extreme_values_plot_on_finite_axes(tmp_path, values):
    rows = [{"step": i, "train/sft_loss": v} for i, v in enumerate(values)]
    svg = plot.write_svg(write_run(tmp_path / "run", rows), str(tmp_path / "m.svg"))
    points = curves(svg)["run: train/sft_loss"]
    assert 0 < len(points) <= len(values) and all(abs(c) < 1e4 for xy in points for c in xy)


def test_a_deeply_nested_line_is_a_bad_line_not_a_traceback(tmp_path):
    write_run(tmp_path / "run", orpo_rows(2), tail="[" * 200000 + "\n" + json.dumps({"step": 99}) + "\n")
    with pytest.raises(plot.PlotError, match="metrics.jsonl:4: not a metrics row"):
        plot.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))


def test_a_long_run_is_thinned_to_a_bounded_number_of_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "MAX_ROWS", 10)
    write_run(tmp_path / "run", [{"step": i, "train/sft_loss": 1.0, "junk": "x"} for i in range(1, 101)])
    rows = plot.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    steps = [row["step"] for row in rows]
    assert 10 <= len(steps) < 20 and steps == sorted(steps) and len({b - a for a, b in zip(steps, steps[1:])}) == 1
    assert all("junk" not in row for row in rows)


def test_cli_skips_a_cut_last_line_and_writes_only_the_run_folder_svg(tmp_path, run_limited):
    rows = orpo_rows()
    run = write_run(tmp_path / "orpo", rows, tail='{"step": 35, "train/sft_lo')
    p = run_limited(["-m", "minorpo.plot", str(run)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "metrics.jsonl:8: cut last line skipped" in p.stderr
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "metrics.svg"] and sorted(os.listdir(tmp_path)) == ["orpo"]
    assert len(curves(run / "metrics.svg")["orpo: train/sft_loss"]) == len(rows) - 1


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    ("", "no metrics rows"),
    ("not json\n" + json.dumps({"step": 1}) + "\n", "metrics.jsonl:1: not a metrics row"),
    ("[1, 2]\n", "metrics.jsonl:1: not a metrics row"),
])
def test_cli_bad_input_is_one_line_naming_the_file(tmp_path, run_limited, one_line_error, content, needle):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    p = run_limited(["-m", "minorpo.plot", str(path)], cwd=tmp_path)
    one_line_error(p, str(path), needle)
    assert not (tmp_path / "metrics.svg").exists()


def test_cli_several_runs_without_out_write_beside_the_first_run_not_in_the_current_directory(tmp_path,
                                                                                                run_limited):
    a, b = write_run(tmp_path / "a", orpo_rows(2)), write_run(tmp_path / "b", orpo_rows(2))
    p = run_limited(["-m", "minorpo.plot", str(a), str(b)], cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == str(a / "vs-b.svg"), p.stderr
    assert sorted(os.listdir(tmp_path)) == ["a", "b"] and sorted(os.listdir(b)) == ["metrics.jsonl"]
    assert {"a: eval/chosen_logps", "b: eval/chosen_logps"} <= set(curves(a / "vs-b.svg"))


def test_cli_out_replaces_only_a_plot_it_wrote(tmp_path, run_limited, run_many, one_line_error):
    run = write_run(tmp_path / "orpo", orpo_rows(2))
    (tmp_path / "notes.svg").write_text("<svg>the user's own drawing, minorpo training curves</svg>")
    (tmp_path / "elsewhere.svg").write_text("kept")
    os.symlink(tmp_path / "elsewhere.svg", tmp_path / "link.svg")
    os.mkdir(tmp_path / "folder.svg")
    cases = {"device": ("/dev/null", "not a regular file"), "link": (tmp_path / "link.svg", "not a regular file"),
             "folder": (tmp_path / "folder.svg", "not a regular file"),
             "foreign": (tmp_path / "notes.svg", "not a plot minorpo.plot wrote"),
             "not svg": (tmp_path / "plot.png", "ending in .svg")}
    done = run_many({name: ["-m", "minorpo.plot", run, "--out", out] for name, (out, _) in cases.items()})
    for name, (out, needle) in cases.items():
        one_line_error(done[name], str(out), needle)
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert (tmp_path / "notes.svg").read_text().startswith("<svg>the user's") and not (tmp_path / "plot.png").exists()
    assert (tmp_path / "elsewhere.svg").read_text() == "kept" and os.listdir(tmp_path / "folder.svg") == []
    for _ in range(2):  # its own plot is replaced
        p = run_limited(["-m", "minorpo.plot", run, "--out", tmp_path / "mine.svg"])
        assert p.returncode == 0, p.stderr


def strokes(svg_path):
    """{polyline title: (stroke colour, dashed)}."""
    return {line.find(SVG + "title").text: (line.get("stroke"), line.get("stroke-dasharray") is not None)
            for line in ET.parse(svg_path).getroot().iter(SVG + "polyline")}


def test_colours_follow_the_run_not_the_argument_order(tmp_path):
    orpo = write_run(tmp_path / "orpo", orpo_rows(2))
    sft = write_run(tmp_path / "sft", [{"step": s, "train/sft_loss": 1.0 / s} for s in (1, 2)])
    other = write_run(tmp_path / "orpo2", orpo_rows(2))
    for order in ([orpo, sft, other], [other, sft, orpo], [sft, orpo, other]):
        found = strokes(plot.write_svg([str(p) for p in order], str(tmp_path / "x.svg")))
        assert found["sft: train/sft_loss"][0] == "#1f77b4"  # SFT blue
        first_orpo = "orpo" if order.index(orpo) < order.index(other) else "orpo2"
        second = "orpo2" if first_orpo == "orpo" else "orpo"
        assert found[f"{first_orpo}: train/sft_loss"][0] == "#ff7f0e"  # the first ORPO run orange
        assert found[f"{second}: train/sft_loss"][0] == "#2ca02c"  # the next free colour
    assert "(sft)" in open(tmp_path / "x.svg").read() and "(orpo)" in open(tmp_path / "x.svg").read()


def test_accuracy_axes_stop_at_one_and_a_by_length_panel_appears_when_logged(tmp_path):
    rows = orpo_rows()
    for row in rows:
        row.update({"train/pref_accuracy": 1.0, "eval/pref_accuracy_longer": 1.0, "eval/pref_accuracy_shorter": 0.4})
    svg = plot.write_svg(str(write_run(tmp_path / "orpo", rows)), str(tmp_path / "m.svg"))
    found = strokes(svg)
    assert found["orpo: eval/pref_accuracy_longer"] == ("#ff7f0e", False)
    assert found["orpo: eval/pref_accuracy_shorter"] == ("#ff7f0e", True)
    assert plot.BY_LENGTH[0] in texts(svg)
    for title, curves_of in (plot.PANELS[2], plot.BY_LENGTH):
        elements = "".join(plot.panel(0, 0, title, curves_of, [("orpo", plot.read_metrics(
            str(tmp_path / "orpo" / "metrics.jsonl")))]))
        labels = [float(t.split(">")[-1]) for t in elements.split("</text>") if 'text-anchor="end"' in t]
        assert max(labels) == 1.0, (title, labels)  # not 1.2
    assert plot.BY_LENGTH[0] not in texts(plot.write_svg(str(write_run(tmp_path / "old", orpo_rows())),
                                                           str(tmp_path / "old.svg")))


def test_a_wrong_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        plot.main(["--nonsense"])
    assert "--help" in str(e.value.code) and "\n" not in str(e.value.code) and capsys.readouterr().err == ""


def test_a_metrics_file_from_before_the_rename_plots_its_log_odds_ratio(tmp_path):
    """Older runs logged the log odds ratio as train/log_odds and eval/log_odds: read as the new names."""
    old = [{("train/log_odds" if k == "train/log_odds_ratio" else "eval/log_odds" if k == "eval/log_odds_ratio"
             else k): v for k, v in row.items()} for row in orpo_rows()]
    assert plot.read_metrics(plot.metrics_file(write_run(str(tmp_path / "old"), old))) == \
        plot.read_metrics(plot.metrics_file(write_run(str(tmp_path / "new"), orpo_rows())))
