"""OP, BWT and AP exactly as docs/paper-notes.md §2 defines them."""
import csv

import pytest

from piece_cl.evaluation.metrics import ap, bwt, op
from tests.conftest import ROOT

R = [[50.0], [40.0, 60.0], [30.0, 50.0, 70.0]]


def test_op_is_the_row_mean_over_seen_tasks():
    assert op(R) == [50.0, 50.0, 50.0]


def test_bwt_divides_by_t_not_t_minus_1():
    # stage 3: ((30-50) + (50-60)) / 3 = -10
    assert bwt(R) == [0.0, (40 - 50) / 2, -10.0]


def test_ap_is_the_mean_of_the_diagonal():
    assert ap(R) == [50.0, 55.0, 60.0]


def test_short_rows_are_rejected():
    with pytest.raises(ValueError):
        op([[1.0], [2.0]])


def _paper_rows():
    with open(ROOT / "piece_cl" / "report" / "data" / "table1.csv") as handle:  # the paper's Table 1, packaged
        for row in csv.DictReader(handle):
            if row["method"] != "base":
                yield row


# The three rows whose printed OP is not the mean of their task columns (docs/paper-notes.md §4).
INCONSISTENT = {("Gemma2-2B", "LwF"), ("Qwen3-14B", "MIGU"), ("Qwen3-14B", "PIECE-F")}


@pytest.mark.parametrize("row", list(_paper_rows()), ids=lambda r: f"{r['model']}-{r['method']}")
def test_op_of_a_final_row_matches_the_papers_table1(row):
    tasks = ["C-STANCE", "FOMC", "MeetingBank", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
    final = [float(row[t]) for t in tasks]
    R_final = [[0.0] * (t + 1) for t in range(7)] + [final]
    ours = op(R_final)[-1]
    if (row["model"], row["method"]) in INCONSISTENT:
        assert abs(ours - float(row["OP"])) > 1.0
    else:
        assert ours == pytest.approx(float(row["OP"]), abs=0.011)
