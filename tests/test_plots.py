"""``fmtl-edge report --plot``: the figure's panels from a hand-built results.json (loss vs device
time and sample-passes with energy-sized markers and seed error bars, the affinity heatmap with the
groups outlined and the values written, the --eval-every curves), and the report's merge-phase
table and mas-auto decision lines."""

from __future__ import annotations

import io

import numpy as np
import pytest

from fmtl_edge.report import decisions_text, merge_phase_table, method_curve, summary_tables
from fmtl_edge.results import compare_merge_phase

TASKS = ["a", "b", "c"]
S = [[0.010, 0.004, -0.002], [0.006, 0.012, -0.001], [-0.003, 0.001, 0.0]]


def _entry(loss, device, energy, passes, splits, affinity=None, **extra):
    per_task = {t: {"test_loss": loss / 3, "metric_name": "accuracy", "metric": 0.5, "test_samples": 10} for t in TASKS}
    return {"total_test_loss": loss, "personalised_total_test_loss": None, "per_task": per_task, "device_s": device,
            "critical_path_s": device / 2, "energy_j": energy, "energy_source": "estimate:cpu_time*15W",
            "energy_scope": "process", "energy_estimated": True, "client_executions": 4, "sample_passes": passes,
            "lookahead_passes": 0, "flops_estimate": None, "rounds": 4, "rounds_per_task": 4, "splits": splits,
            "affinity": affinity, "history": [], "jobs": [], **extra}


def _results(seeds=None):
    mas = _entry(1.0, 20.0, 300.0, 5000, [["a", "c"], ["b"]], S,
                 merge_phase={"jobs": ["merge"], "rounds": 2, "device_s": 12.0, "energy_j": 180.0,
                              "sample_passes": 3000, "lookahead_passes": 2000, "lookahead_share": 2 / 3})
    aio = _entry(1.2, 10.0, 150.0, 2000, [TASKS])
    aio["history"] = [{"round": r, "device_s": 2.5, "sample_passes": 500} for r in range(4)]
    res = {"dataset": "toy", "tasks": TASKS, "clients": 4, "methods": {"mas-2": mas, "all-in-one": aio}}
    if seeds:
        res["seeds"] = seeds
        for m in res["methods"].values():
            m["seeds"] = {str(s): dict(m) for s in seeds}
            m["std"] = {"total_test_loss": 0.05, "device_s": 1.5, "sample_passes": 10.0, "energy_j": 3.0}
            m["mean"] = {}
    return res


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label() and not ax.get_label().startswith("<")}


@pytest.fixture(autouse=True)
def _mpl():
    pytest.importorskip("matplotlib")


def test_scatter_marker_area_follows_energy_and_seeds_add_error_bars():
    import matplotlib.pyplot as plt

    from fmtl_edge.plots import MAX_MARKER_AREA, build_figure, marker_areas

    assert marker_areas([300.0, 150.0, None]) == [MAX_MARKER_AREA, MAX_MARKER_AREA / 2, pytest.approx(20.0)]
    fig = build_figure(_results())
    axes = _axes(fig)
    assert {"scatter-device", "scatter-passes", "energy", "affinity:mas-2"} <= set(axes)
    assert "curves" not in axes  # no --eval-every points
    ax = axes["scatter-device"]
    pts = {tuple(c.get_offsets()[0]): c.get_sizes()[0] for c in ax.collections}
    assert pts == {(20.0, 1.0): MAX_MARKER_AREA, (10.0, 1.2): MAX_MARKER_AREA / 2}
    assert not ax.containers  # one seed: no error bars
    assert {tuple(c.get_offsets()[0]) for c in axes["scatter-passes"].collections} == {(5000.0, 1.0), (2000.0, 1.2)}
    plt.close(fig)
    fig = build_figure(_results(seeds=[0, 1]))
    bars = [c for c in _axes(fig)["scatter-device"].containers if c.has_xerr and c.has_yerr]
    assert len(bars) == 2
    segs = bars[0].lines[2][0].get_segments()  # x error bar: 20 ± 1.5
    np.testing.assert_allclose(sorted(segs[0][:, 0]), [18.5, 21.5])
    plt.close(fig)


def test_heatmap_outlines_the_groups_and_writes_the_values():
    import matplotlib.pyplot as plt

    from fmtl_edge.plots import build_figure, cell_scale, group_order

    assert group_order(TASKS, [["a", "c"], ["b"]]) == ([0, 2, 1], [(0, 2), (2, 1)])
    assert cell_scale(0.012) == 2 and cell_scale(0.5) == 0
    fig = build_figure(_results())
    ax = _axes(fig)["affinity:mas-2"]
    texts = [t.get_text() for t in ax.texts if t.get_gid() == "value"]
    order = [0, 2, 1]
    want = [f"{S[i][j] * 100:.2f}" for i in order for j in order]  # rows/columns group by group, ×1e2
    assert texts == want
    assert "×1e2" in ax.get_title()
    rects = [p for p in ax.patches if p.get_gid() == "group"]
    assert sorted((r.get_xy(), r.get_width()) for r in rects) == [((-0.5, -0.5), 2), ((1.5, 1.5), 1)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "c", "b"]
    plt.close(fig)


def test_curves_panel_and_the_method_curve_lineage(tmp_path):
    import matplotlib.pyplot as plt

    from fmtl_edge.plots import build_figure, plot_results

    # mas-2: merge (2 rounds, all tasks) then split-0 {a, c} and split-1 {b} from it
    curve = [
        {"job": "merge", "round": 1, "position": 2, "total_test_loss": 3.0, "per_task": {"a": 1.0, "b": 1.0, "c": 1.0}},
        {"job": "split-0", "round": 1, "position": 4, "total_test_loss": 1.5, "per_task": {"a": 0.7, "c": 0.8}},
        {"job": "split-1", "round": 1, "position": 4, "total_test_loss": 0.6, "per_task": {"b": 0.6}},
        {"job": "split-1", "round": 0, "position": 3, "total_test_loss": 0.9, "per_task": {"b": 0.9}},
    ]
    entry = {"curve": curve, "final_jobs": {"a": "split-0", "b": "split-1", "c": "split-0"},
             "jobs": [{"name": "merge", "init_from": None}, {"name": "split-0", "init_from": "merge"},
                      {"name": "split-1", "init_from": "merge"}]}
    # position 3: split-0 has no point there, so the method has none
    assert method_curve(entry) == [{"position": 2, "total_test_loss": 3.0},
                                   {"position": 4, "total_test_loss": pytest.approx(2.1)}]
    res = _results()
    res["methods"]["mas-2"].update(entry, curve_total=method_curve(entry))
    fig = build_figure(res)
    ax = _axes(fig)["curves"]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xydata(), [[2, 3.0], [4, 2.1]])
    plt.close(fig)
    png = plot_results(res, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_merge_phase_table_and_decision_lines():
    from rich.console import Console

    res = _results()
    compare_merge_phase(res)
    vs = res["methods"]["mas-2"]["merge_phase"]["vs_all_in_one"]
    # all-in-one's first R0 = 2 rounds: 2 x 2.5 s and 2 x 500 passes
    assert vs["device_s"] == 5.0 and vs["sample_passes"] == 1000
    assert vs["device_ratio"] == pytest.approx(12.0 / 5.0) and vs["passes_ratio"] == pytest.approx(3.0)
    assert "merge_phase" not in res["methods"]["all-in-one"]
    assert decisions_text(res) is None
    res["methods"]["mas-2"]["decision"] = {"r0": 2, "r0_max": 5, "capped": False, "stable_rounds": 2,
                                           "epsilon": 0.05, "x": 2, "scores": {"1": 0.1, "2": 0.3, "3": 0.29}}
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=False, color_system=None)
    parts = summary_tables(res)
    assert merge_phase_table(res) is not None
    for part in parts:
        con.print(part)
    text = buf.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= 80
    row = next(ln for ln in text.splitlines() if ln.startswith("│ mas-2") and "%" in ln)
    assert "66.7%" in row and "12.0" in row and "5.0" in row and "2.40" in row and "3.00" in row
    assert "mas-2: R0 = 2 (partition stable 2 rounds, cap 5); x = 2 (eps = 0.05)" in text
    assert "1:0.100, 2:0.300, 3:0.290" in text


# -- issue 22.4: personalised methods plotted, no empty panels, labels inside, colour bar in cell units --


def _personalised_results():
    res = _results()
    lay = _entry(1.0, 5.0, 80.0, 1500, [TASKS])
    lay.update(total_test_loss=None, personalised_total_test_loss=0.7)
    dit = _entry(1.1, 8.0, 120.0, 2500, [TASKS])
    dit["personalised_total_test_loss"] = 0.8
    loc = _entry(1.0, 9.0, None, 3000, [TASKS], reference=True)
    loc.update(total_test_loss=None, personalised_total_test_loss=0.6, energy_j=None)
    res["methods"].update({"layered": lay, "ditto": dit, "local": loc})
    return res


def test_personalised_losses_are_plotted_with_a_legend_inside_the_axes():
    import matplotlib.pyplot as plt

    from fmtl_edge.plots import build_figure, scatter_points

    res = _personalised_results()
    pts = {(p["label"], p["key"]): (p["x"], p["y"]) for p in scatter_points(res, "device_s")}
    assert pts[("layered (pers.)", "personalised_total_test_loss")] == (5.0, 0.7)
    assert pts[("ditto", "total_test_loss")] == (8.0, 1.1) and pts[("ditto (pers.)", "personalised_total_test_loss")] == (8.0, 0.8)
    assert pts[("local (pers.)", "personalised_total_test_loss")] == (9.0, 0.6)
    assert ("layered", "total_test_loss") not in pts
    fig = build_figure(res)
    fig.canvas.draw()
    for name in ("scatter-device", "scatter-passes"):
        ax = _axes(fig)[name]
        offsets = {tuple(c.get_offsets()[0]) for c in ax.collections if c.get_gid()}
        assert (5.0 if name == "scatter-device" else 1500.0, 0.7) in offsets  # layered is not left out
        assert len(offsets) == 6  # mas-2, all-in-one, layered, ditto x2, local (unknown energy: x)
        assert not ax.texts  # no labels beside the points: the legend names them
        leg = ax.get_legend()
        labels = [t.get_text() for t in leg.get_texts()]
        assert len(labels) == len(set(labels)) == 6 and "layered (pers.)" in labels
        lb, ab = leg.get_window_extent(), ax.get_window_extent()
        assert ab.x0 <= lb.x0 and lb.x1 <= ab.x1 and ab.y0 <= lb.y0 and lb.y1 <= ab.y1
        for c in ax.collections:  # every marker inside the axes (margins)
            x, y = ax.transData.transform(c.get_offsets()[0])
            assert ab.x0 < x < ab.x1 and ab.y0 < y < ab.y1
    plt.close(fig)


def test_no_empty_panels_and_the_colour_bar_is_in_the_cells_units():
    import matplotlib.pyplot as plt

    from fmtl_edge.plots import build_figure

    res = _results()
    for m in res["methods"].values():
        m["energy_j"] = None
    fig = build_figure(res)
    axes = _axes(fig)
    assert "energy" not in axes  # nothing to draw: no panel
    assert all(ax.get_visible() for ax in fig.axes)
    assert set(axes) == {"scatter-device", "scatter-passes", "affinity:mas-2", "colourbar"}
    assert len(fig.axes) == 4  # the unused grid cells are removed, not left blank
    ax = axes["affinity:mas-2"]
    img = ax.images[0]
    values = [float(t.get_text()) for t in ax.texts if t.get_gid() == "value"]
    lo, hi = img.norm.vmin, img.norm.vmax
    assert hi == pytest.approx(1.2) and lo == pytest.approx(-1.2)  # max |S| = 0.012, shown x1e2
    assert max(abs(v) for v in values) == pytest.approx(1.2)
    np.testing.assert_allclose(np.asarray(img.get_array()).max(), max(values), atol=5e-3)
    bar = next(a for a in fig.axes if a.get_label() == "colourbar")
    assert "×1e2" in bar.get_ylabel()
    plt.close(fig)
