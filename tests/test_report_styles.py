"""piece-report's figures: every one of the twelve methods has its own colour and its own marker, the same
in every figure, and series of one method (a k sweep) stay apart by line style."""
from matplotlib.colors import to_rgba

from piece_cl.report import figures
from piece_cl.report.figures import METHOD_STYLES, Curve, series_styles
from piece_cl.report.paper import METHOD_NAMES

TWELVE = [name for key, name in METHOD_NAMES.items() if key != "base"]


def test_the_twelve_methods_differ_by_colour_and_by_marker():
    assert len(TWELVE) == 12 and set(TWELVE) == set(METHOD_STYLES)
    styles = series_styles(TWELVE)
    assert len({to_rgba(s["color"]) for s in styles}) == 12
    assert len({s["marker"] for s in styles}) == 12
    seqft, piece_f = (styles[TWELVE.index(n)] for n in ("SeqFT", "PIECE-F"))
    assert to_rgba(seqft["color"]) != to_rgba(piece_f["color"])


def test_a_method_keeps_its_style_whatever_else_is_plotted():
    alone = series_styles(["PIECE-F"])[0]
    assert series_styles(list(reversed(TWELVE)))[TWELVE[::-1].index("PIECE-F")] == alone
    assert series_styles(["replay-online", "replay"]) == [METHOD_STYLES["replay-online"], METHOD_STYLES["replay"]]


def test_series_of_one_method_stay_apart():
    labels = [f"PIECE-S (k={k:g})" for k in (0.001, 0.005, 0.01, 0.02, 0.05)]
    styles = series_styles(labels)
    assert {s["color"] for s in styles} == {METHOD_STYLES["PIECE-S"]["color"]}
    keys = {(s["linestyle"], s.get("fillstyle", "full")) for s in styles}
    assert len(keys) == 5


def test_figure_1_draws_twelve_distinguishable_lines(tmp_path, monkeypatch):
    kept = []
    monkeypatch.setattr(figures, "save", lambda fig, out_dir, stem: kept.append(fig))
    curves = [Curve(name, [1, 2, 3], [i, i + 1, i + 2]) for i, name in enumerate(TWELVE)]
    figures.op_and_probe(curves, curves, "mini-HumanEval", "all methods", tmp_path, "fig1")
    for ax in kept[0].axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == TWELVE
        assert len({to_rgba(line.get_color()) for line in lines}) == 12
        assert len({line.get_marker() for line in lines}) == 12
