"""piece-report: tables beside the paper, Figure-3 module mapping, mask overlap/correlation, figure files."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file
from scipy import stats

from piece_cl.report import masks
from piece_cl.report.cli import main
from piece_cl.report.document import generate_report, read_loss_curves
from piece_cl.report.paper import inconsistent_op_rows, load_paper_table
from piece_cl.report.runs import find_runs
from piece_cl.report.tables import build_tables, final_bwt, to_csv, to_latex, to_markdown

TRACE = ["C-STANCE", "FOMC", "MeetingBank", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
TINY = ["tiny_choice", "tiny_number", "tiny_rewrite", "tiny_codeline"]


def lower_triangle(n: int, diag: float, drop: float) -> list[list[float]]:
    """R with R_{i,i} = diag + i and every earlier score falling by `drop` per later task."""
    return [[diag + i - drop * (t - i) for i in range(t + 1)] for t in range(n)]


def write_run(root: Path, name: str, *, model: str, method: str, benchmark: str, tasks: list[str],
              R: list[list[float]], probe: tuple[float, list[float]], ratio: float | None = None,
              stage_masks: list[dict[str, list[int]]] | None = None, losses: bool = False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    results = {"run": name, "model": model, "method": method, "benchmark": benchmark, "tasks": tasks, "R": R,
               "probe": {"name": "humaneval_pass@1", "base": probe[0], "after_task": probe[1]},
               "stages_done": len(R) - 1}
    (run / "results.json").write_text(json.dumps(results))
    method_cfg = {"name": method} | ({"ratio": ratio} if ratio is not None else {})
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method_cfg, "seed": 42}))
    for t in range(len(R)):
        stage = run / f"stage_{t}_{tasks[t]}"
        stage.mkdir()
        if stage_masks:
            save_file({k: np.array(v, dtype=np.int64) for k, v in stage_masks[t].items()},
                      str(stage / "mask.safetensors"))
        if losses:
            rows = ["global_step,stage,task,loss"] + [
                f"{step},{t},{task},{2.0 - 0.1 * step + 0.3 * (task != tasks[t]):.3f}"
                for step in range(0, 5) for task in tasks]   # steps restart at 0 each stage
            (stage / "loss_curves.csv").write_text("\n".join(rows) + "\n")
    return run


# ------------------------------------------------------------------------------------------- tables

def test_paper_rows_whose_op_is_not_their_mean_are_found():
    flagged = {(f.model, f.method): (f.printed, round(f.row_mean, 2)) for f in inconsistent_op_rows(load_paper_table("trace"))}
    assert flagged == {("Gemma2-2B", "LwF"): (16.86, 15.61), ("Qwen3-14B", "MIGU"): (31.38, 27.46),
                       ("Qwen3-14B", "PIECE-F"): (49.80, 43.58)}
    assert inconsistent_op_rows(load_paper_table("vqa")) == []


def test_bwt_conventions_by_hand():
    R = [[50.0], [40.0, 60.0], [30.0, 55.0, 70.0]]
    # all: (1/3)[(30-50) + (55-60)] ; authors (after task 2 of 3): (1/2)(40-50)
    assert final_bwt(R, 3, "all") == pytest.approx(-25.0 / 3)
    assert final_bwt(R, 3, "authors") == pytest.approx(-5.0)
    assert final_bwt(R[:1], 3, "authors") is None


@pytest.fixture()
def trace_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "seqft", model="llama3_8b", method="seqft", benchmark="trace", tasks=TRACE,
              R=lower_triangle(8, 40.0, 5.0), probe=(34.0, [20.0] * 7 + [3.0]))
    write_run(root, "piece_s", model="llama3_8b", method="piece_s", benchmark="trace", tasks=TRACE,
              R=lower_triangle(8, 45.0, 1.0), probe=(34.0, [33.0] * 7 + [31.0]))
    for model, method in (("gemma2_2b", "lwf"), ("qwen3_14b", "migu"), ("qwen3_14b", "piece_f"),
                          ("qwen3_14b", "seqft")):
        write_run(root, f"{model}_{method}", model=model, method=method, benchmark="trace", tasks=TRACE,
                  R=lower_triangle(8, 30.0, 2.0), probe=(50.0, [40.0] * 8))
    return root


def test_table_values_paper_columns_and_bold(trace_runs: Path):
    (table,) = build_tables(find_runs([trace_runs]), "all")
    assert table.number == 1 and table.columns == ["HumanEval", *TRACE, "OP", "BWT"]
    llama = [row for row in table.rows if row.model == "Llama3-8B"]
    assert [row.method for row in llama] == ["base", "SeqFT", "PIECE-S"]
    base, seqft, piece = llama
    assert base.values["HumanEval"] == 34.0 and base.paper["HumanEval"] == 34.15
    final = lower_triangle(8, 45.0, 1.0)[-1]
    assert [piece.values[t] for t in TRACE] == final
    assert piece.values["OP"] == pytest.approx(sum(final) / 8)
    # BWT_8 = (1/8) Σ_{i<8} (R_{8,i} − R_{i,i}) = (1/8) Σ_{i<7} −(7−i) = −28/8
    assert piece.values["BWT"] == pytest.approx(-3.5)
    assert piece.paper["OP"] == 49.05 and piece.paper["HumanEval"] == 32.32

    markdown = to_markdown(table)
    piece_line = next(line for line in markdown.splitlines() if line.startswith("| Llama3-8B | PIECE-S"))
    ours_op = sum(final) / 8
    assert f"**{ours_op:.2f}** (49.05; {ours_op - 49.05:+.2f})" in piece_line  # best OP of the Llama rows
    seqft_line = next(line for line in markdown.splitlines() if line.startswith("| Llama3-8B | SeqFT"))
    assert "**" not in seqft_line.split("|")[3]                                # SeqFT's HumanEval is not best
    assert "BWT after the last task" in markdown and "--bwt authors" in markdown

    latex = to_latex(table)
    assert r"\toprule" in latex and r"\bottomrule" in latex and r"\textbf{" + f"{ours_op:.2f}" + "}" in latex
    assert "\\#" not in latex and "PIECE-S" in latex

    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    piece_csv = next(r for r in rows if r["model"] == "Llama3-8B" and r["method"] == "PIECE-S")
    assert float(piece_csv["OP_paper"]) == 49.05
    assert float(piece_csv["OP_diff"]) == pytest.approx(ours_op - 49.05, abs=1e-3)


def test_flagged_paper_rows_are_marked(trace_runs: Path):
    (table,) = build_tables(find_runs([trace_runs]), "authors")
    markdown = to_markdown(table)
    marked = {(line.split("|")[1].strip(), line.split("|")[2].strip())
              for line in markdown.splitlines() if line.startswith("|") and "†" in line}
    assert marked == {("Gemma2-2B", "LwF"), ("Qwen3-14B", "MIGU"), ("Qwen3-14B", "PIECE-F")}
    assert "printed OP 49.80, but the mean of its task columns is 43.58" in markdown
    assert "BWT after task T−1" in markdown
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert {(r["model"], r["method"]) for r in rows if r["paper_op_inconsistent"] == "True"} == marked
    assert "\\dagger" in to_latex(table) and "†" not in to_markdown(table, with_paper=False)


# ------------------------------------------------------------------------------- Figure-3 mapping

def _tiny_models():
    import transformers as tr

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64, head_dim=8)
    vision = tr.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=28, patch_size=14)
    qwen_vl = tr.Qwen3VLConfig(
        text_config=dict(small, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           deepstack_visual_indexes=[0]))
    return {
        "llama": tr.LlamaForCausalLM(tr.LlamaConfig(**small)),
        "gemma2": tr.Gemma2ForCausalLM(tr.Gemma2Config(**small)),
        "qwen3": tr.Qwen3ForCausalLM(tr.Qwen3Config(**small)),
        "llava": tr.LlavaForConditionalGeneration(tr.LlavaConfig(vision_config=vision,
                                                                 text_config=tr.LlamaConfig(**small).to_dict())),
        "qwen3_vl": tr.Qwen3VLForConditionalGeneration(qwen_vl),
    }


def test_module_mapping_for_the_five_architectures():
    llama_layer = {"Q", "K", "V", "O", "G", "U", "D", "IN", "PN"}
    expected_layer = {"llama": llama_layer, "gemma2": llama_layer | {"preFF", "postFF"},
                      "qwen3": llama_layer | {"QN", "KN"}, "llava": llama_layer, "qwen3_vl": llama_layer | {"QN", "KN"}}
    expected_top = {"llama": {"E", "N", "lm"}, "gemma2": {"E", "N"}, "qwen3": {"E", "N", "lm"},
                    "llava": {"E", "N", "lm"}, "qwen3_vl": {"E", "N", "lm"}}
    for arch, model in _tiny_models().items():
        names = [name for name, _ in model.named_parameters()]
        mapped = {name: masks.module_of(name) for name in names}
        excluded = {name for name, where in mapped.items() if where is None}
        assert excluded == {n for n in names if "vision_tower" in n or "visual" in n or "projector" in n}, arch
        places = [where for where in mapped.values() if where is not None]
        for layer in (0, 1):
            assert {m for m, l in places if l == layer} == expected_layer[arch], arch
            assert len([1 for m, l in places if l == layer]) == len(expected_layer[arch]), arch  # one name each
        assert {m for m, l in places if l is None} == expected_top[arch], arch
    assert masks.module_of("model.language_model.layers.3.mlp.down_proj.weight") == ("D", 3)


# --------------------------------------------------------------------- overlap and correlation

# Four tasks, k = 4 entries each, over two tensors.
HAND_MASKS = [
    {"a": [0, 1, 2, 3]},
    {"a": [0, 1], "b": [5, 6]},           # ∩ M0 = 2
    {"a": [3], "b": [5, 6, 7]},           # ∩ M0 = 1, ∩ M1 = 2
    {"b": [0, 1, 2, 3]},                  # ∩ M0 = 0, ∩ M1 = 0, ∩ M2 = 0
]
HAND_R = [[80.0], [70.0, 60.0], [65.0, 50.0, 90.0], [64.0, 52.0, 60.0, 40.0]]


def _hand_masks():
    return [{k: np.array(v, dtype=np.int64) for k, v in m.items()} for m in HAND_MASKS]


def test_overlap_matrix_by_hand():
    matrix = masks.overlap_matrix(_hand_masks())
    expected = np.array([[1, .5, .25, 0], [.5, 1, .5, 0], [.25, .5, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(matrix, expected)
    counts = masks.module_counts([{"model.layers.1.self_attn.v_proj.weight": np.arange(3)},
                                  {"model.layers.1.self_attn.v_proj.weight": np.arange(2), "lm_head.weight": np.arange(5)}])
    assert counts == {("V", 1): 5, ("lm", None): 5}


def test_overlap_forgetting_correlation_by_hand():
    # forgetting (i, j) = R[j-1][i] − R[j][i]
    expected_drop = {(0, 1): 10.0, (0, 2): 5.0, (1, 2): 10.0, (0, 3): 1.0, (1, 3): -2.0, (2, 3): 30.0}
    assert masks.pair_forgetting(HAND_R) == expected_drop
    corr = masks.overlap_forgetting(_hand_masks(), HAND_R)
    overlaps = {(0, 1): .5, (0, 2): .25, (1, 2): .5, (0, 3): 0.0, (1, 3): 0.0, (2, 3): 0.0}
    assert dict(zip(corr.pairs, corr.overlaps)) == overlaps
    x = np.array([overlaps[p] for p in corr.pairs])
    y = np.array([expected_drop[p] for p in corr.pairs])
    r = float(np.sum((x - x.mean()) * (y - y.mean())) / math.sqrt(np.sum((x - x.mean()) ** 2) * np.sum((y - y.mean()) ** 2)))
    assert corr.pearson_r == pytest.approx(r)
    t = r * math.sqrt((len(x) - 2) / (1 - r * r))
    assert corr.pearson_p == pytest.approx(2 * stats.t.sf(abs(t), len(x) - 2))
    ranks_x, ranks_y = stats.rankdata(x), stats.rankdata(y)      # Spearman = Pearson of (average) ranks
    assert corr.spearman_rho == pytest.approx(np.corrcoef(ranks_x, ranks_y)[0, 1])
    assert 0 < corr.spearman_p <= 1
    missing = masks.overlap_forgetting([_hand_masks()[0], None, None, None], HAND_R)
    assert missing.n == 0 and math.isnan(missing.pearson_r)


# -------------------------------------------------------------------------------- figure files

LLAMA_NAMES = ["model.layers.0.self_attn.v_proj.weight", "model.layers.2.mlp.up_proj.weight", "lm_head.weight"]


def _stage_masks(seed: int, n: int = 4) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    return [{name: sorted(rng.choice(50, size=5, replace=False).tolist()) for name in LLAMA_NAMES} for _ in range(n)]


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun"
    for number, ratio in enumerate((0.001, 0.01, 0.05)):
        write_run(sweep, f"{number}_piece_s", model="tiny", method="piece_s", benchmark="tiny", tasks=TINY,
                  R=lower_triangle(4, 40.0 + 10 * number, 1.0 + number), probe=(80.0, [70.0 - 10 * number] * 4),
                  ratio=ratio, stage_masks=_stage_masks(number), losses=number == 0)
    write_run(sweep, "3_seqft", model="tiny", method="seqft", benchmark="tiny", tasks=TINY,
              R=lower_triangle(4, 50.0, 8.0), probe=(80.0, [20.0, 10.0, 5.0, 0.0]))
    return sweep


EXPECTED_SIZES = {"R_": (600, 500), "fig1_": (1000, 400), "fig3_": (1000, 450), "fig5_": (600, 500),
                  "fig6_": (600, 450), "fig7_": (900, 700), "loss_": (1000, 450)}


def test_report_writes_every_figure_and_table(sweep_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    report = generate_report([sweep_dir], out)
    pngs = sorted((out / "figures").glob("*.png"))
    kinds = {prefix: [p for p in pngs if p.name.startswith(prefix)] for prefix in EXPECTED_SIZES}
    assert {k: len(v) for k, v in kinds.items()} == {"R_": 4, "fig1_": 1, "fig3_": 3, "fig5_": 3, "fig6_": 1,
                                                     "fig7_": 1, "loss_": 1}
    for prefix, paths in kinds.items():
        for png in paths:
            image = np.asarray(Image.open(png).convert("L"))
            assert image.shape[::-1] == EXPECTED_SIZES[prefix], png.name
            assert image.std() > 5, png.name                                  # not a blank canvas
            assert png.with_suffix(".pdf").stat().st_size > 1000
    text = report.read_text()
    for png in pngs:
        assert f"](figures/{png.name})" in text
    assert "No masks (method saves none, or not yet run) for: 3_seqft." in text
    assert "No loss_curves.csv for: 1_piece_s, 2_piece_s, 3_seqft." in text
    assert "PIECE-S (k=0.01)" in (out / "tables" / "table1_tiny.md").read_text()
    assert (out / "tables" / "table1_tiny.tex").read_text().count(r"\midrule") == 1
    table4 = list(csv.DictReader(io.StringIO((out / "tables" / "table4.csv").read_text())))
    assert [row["pairs"] for row in table4] == ["6", "6", "6"]


def test_loss_curves_restarting_steps_are_laid_end_to_end(sweep_dir: Path):
    run = next(r for r in find_runs([sweep_dir]) if r.name == "0_piece_s")
    points = read_loss_curves(run)
    assert len(points) == 4 * 5 * 4
    stage_ranges = [(min(p.step for p in points if p.stage == s), max(p.step for p in points if p.stage == s))
                    for s in range(4)]
    assert stage_ranges == [(0, 4), (4, 8), (8, 12), (12, 16)]


def test_cli_writes_report_and_reports_bad_input(sweep_dir: Path, tmp_path: Path, capsys):
    assert main([str(sweep_dir / "3_seqft"), "--out", str(tmp_path / "one"), "--bwt", "authors"]) == 0
    assert "BWT after task T−1" in (tmp_path / "one" / "report.md").read_text()
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


def test_incomplete_run_without_probe_is_reported_not_crashed(tmp_path: Path):
    run = write_run(tmp_path / "runs", "partial", model="tiny", method="piece_f", benchmark="tiny", tasks=TINY,
                    R=[[50.0], [40.0, 70.0]], probe=(80.0, []))
    results = json.loads((run / "results.json").read_text())
    results["probe"] = {"name": None, "base": None, "after_task": []}
    (run / "results.json").write_text(json.dumps(results))
    (table,) = build_tables(find_runs([run]), "authors")
    row = table.rows[1]
    assert [row.values[t] for t in TINY] == [40.0, 70.0, None, None] and row.values["OP"] == 55.0
    assert row.values["BWT"] is None and not row.complete          # after task T-1 = 3 not reached
    assert "Incomplete runs (scores after the last finished stage): partial." in to_markdown(table)
    report = generate_report([run], tmp_path / "out").read_text()
    assert "No masks" in report and "No sweep" in report
