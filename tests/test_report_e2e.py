"""piece-report on real embedded runs: a 3-point k sweep of PIECE-S plus SeqFT -> tables and every figure."""
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SHORT = ["experiment=smoke", "benchmark.tasks=[tiny_choice,tiny_number]", "benchmark.probe.n_problems=4",
         "trainer.loss_curve_every=2"]


def test_report_from_a_k_sweep_and_seqft(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    cli = [sys.executable, "-m", "piece_cl.cli"]
    subprocess.run([*cli, "-m", "method=piece_s", "method.ratio=0.001,0.01,0.05", *SHORT, f"hydra.sweep.dir={sweep}"],
                   env=env, check=True, capture_output=True, timeout=900)
    subprocess.run([*cli, *SHORT, f"hydra.run.dir={sweep / 'seqft'}"], env=env, check=True, capture_output=True,
                   timeout=900)
    assert len(list(sweep.glob("*/results.json"))) == 4
    assert len(list(sweep.glob("*/stage_*/mask.safetensors"))) == 6
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "piece_cl.report.cli", str(sweep), "--out", str(out)], env=env, check=True,
                   capture_output=True, timeout=600)
    table = (out / "tables" / "table1_tiny.md").read_text()
    assert "SeqFT" in table and "PIECE-S (k=0.05)" in table
    assert (out / "tables" / "table1_tiny.tex").read_text().count("\\midrule") >= 1
    figures = out / "figures"
    expected = {"fig7_tiny.png": (900, 700), "fig1_Tiny-Llama_tiny.png": (1000, 400), "R_seqft.png": (600, 500)}
    for name, size in expected.items():
        with Image.open(figures / name) as image:
            assert image.size == size and image.convert("L").getextrema()[0] < 128  # not blank
    for prefix in ("fig3_", "fig5_", "fig6_", "loss_"):
        assert list(figures.glob(f"{prefix}*.png")), prefix
        assert all(p.stat().st_size > 5000 for p in figures.glob(f"{prefix}*.png"))
    report = (out / "report.md").read_text()
    assert "fig7_tiny.png" in report and "SeqFT" in report
