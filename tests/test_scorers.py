"""The authors' scoring rules (docs/paper-notes.md §3), on hand cases and on real Llama-2-7B outputs shipped with the data."""
import json
import random

import pytest
from rouge import Rouge

from piece_cl.errors import PieceError
from piece_cl.evaluation import scorers
from piece_cl.evaluation.scorers import all_metrics, extract, score


def shipped(shared_data, task):
    gold = [r["answer"] for r in json.loads((shared_data / "trace" / task / "test.json").read_text())]
    lines = (shared_data / "trace" / task / "test_llama2_7b_base.jsonl").read_text().splitlines()
    outputs = [json.loads(line)["answer"] for line in lines if line.strip()]
    assert len(outputs) == len(gold)
    return outputs, gold


# ---------------------------------------------------------------- acceptance: the authors' own numbers
@pytest.mark.parametrize("task, authors", [("C-STANCE", 35.60), ("NumGLUE-cm", 9.88)])
def test_matches_authors_scorer_on_llama2_outputs(shared_data, task, authors):
    outputs, gold = shipped(shared_data, task)
    assert round(score(task, outputs, gold), 2) == pytest.approx(authors, abs=1e-9)


# Our scorer's numbers on the other shipped outputs, recorded in docs/reproduction.md.
@pytest.mark.parametrize("task, recorded", [("FOMC", 5.24), ("ScienceQA", 58.00), ("NumGLUE-ds", 12.92)])
def test_recorded_numbers_on_llama2_outputs(shared_data, task, recorded):
    outputs, gold = shipped(shared_data, task)
    assert round(score(task, outputs, gold), 2) == pytest.approx(recorded, abs=1e-9)


def test_choice_tasks_agree_with_a_plain_loop(shared_data):
    """Independent re-reading of the rules on real outputs: first A-D anywhere (FOMC, ScienceQA)."""
    def first_capital(text):
        return next((c for c in text if c in "ABCD"), None)

    for task in ("FOMC", "ScienceQA"):
        outputs, gold = shipped(shared_data, task)
        hits = sum(first_capital(o) is not None and first_capital(o) == first_capital(g) for o, g in zip(outputs, gold))
        assert score(task, outputs, gold) == pytest.approx(100 * hits / len(gold))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_20minuten_is_mean_of_bleu4_and_rouge_l_per_item(shared_data):
    from nltk.translate.bleu_score import sentence_bleu

    outputs, gold = shipped(shared_data, "20Minuten")
    outputs, gold = outputs[:40], gold[:40]
    expected = []
    for o, g in zip(outputs, gold):
        tokens = lambda s: [t for t in s.replace(".", " ").split()]  # noqa: E731
        bleu = sentence_bleu([tokens(g)], tokens(o), (0.25,) * 4) if tokens(o) else 0.0
        rouge = Rouge(metrics=["rouge-l"]).get_scores(g, o)[0]["rouge-l"]["f"]
        expected.append((bleu + rouge) / 2)
    metrics = all_metrics("20Minuten", outputs, gold)
    assert metrics["score"] == pytest.approx(100 * sum(expected) / len(expected))
    assert metrics["score"] == pytest.approx((metrics["bleu4"] + metrics["rougeL"]) / 2)
    assert 0 < metrics["score"] < 100 and {"rougeL_rouge_score", "sacrebleu"} <= set(metrics)


# ---------------------------------------------------------------- hand cases, rule by rule
@pytest.mark.parametrize("output, expected", [
    ("\nA.支持", "A"), ("B. 反对", "B"), ("xx C", "C"), ("xxxxA", None),  # letter only within 4 characters
    ("支持。", "A"), ("反对", "B"), ("中立", "C"), (" 支持", None),      # fallback on the first 2 characters, unstripped
    ("", None), ("<think>A? B?</think>中立", "C"),
])
def test_cstance_extraction(output, expected):
    assert extract("C-STANCE", output) == expected


def test_first_capital_a_to_d_anywhere():
    assert extract("FOMC", "\nThe stance is B") == "B"
    assert extract("FOMC", "Dovish") == "D"  # the authors' rule takes any capital A-D, words included
    assert extract("choice", "the federal open market") is None
    assert score("FOMC", ["hawkish: C", "", "A"], ["C", "A", "B"]) == pytest.approx(100 / 3)


def test_scienceqa_compares_with_first_capital_of_gold():
    gold = "B\nFigures of speech are words or phrases..."
    assert score("ScienceQA", ["\nB. metaphor", "A", ""], [gold, gold, gold]) == pytest.approx(100 / 3)


@pytest.mark.parametrize("output, expected", [
    ("so 21 apples", "21"), ("-3.5e2 moles", "-3.5e2"), ("x = .5", ".5"), ("It is 21.", "21."),
    ("no digits", None), ("+7", "+7"),
])
def test_number_extraction(output, expected):
    assert extract("NumGLUE-ds", output) == expected


def test_number_is_exact_string_match():
    assert score("number", ["11.0", "11", "It is 11.", "", "eleven"], ["11"] * 5) == pytest.approx(20.0)


def test_extract_refuses_text_tasks():
    with pytest.raises(PieceError):
        extract("MeetingBank", "some summary")


def test_bleu_rouge_rules():
    gold = "the council approved the budget for next year"
    assert score("MeetingBank", [gold], [gold]) == pytest.approx(100.0)
    assert score("bleu_rouge", ["", "   ", ".", "</think>"], [gold] * 4) == 0.0
    short = "approved budget"  # < 4 tokens: BLEU-4 is 0 without smoothing, ROUGE-L is not
    parts = all_metrics("bleu_rouge", [short], [gold])
    assert parts["bleu4"] == pytest.approx(0.0, abs=1e-12) and parts["rougeL"] > 0  # nltk gives ~1e-229
    assert parts["score"] == pytest.approx(parts["rougeL"] / 2)


def test_rouge_l_passes_gold_as_hypothesis():
    gold, prediction = "d d. b d", "c d a c b b"
    gold_first = Rouge(metrics=["rouge-l"]).get_scores(gold, prediction)[0]["rouge-l"]["f"]
    prediction_first = Rouge(metrics=["rouge-l"]).get_scores(prediction, gold)[0]["rouge-l"]["f"]
    assert gold_first != pytest.approx(prediction_first)
    assert scorers.rouge_l(gold, prediction) == pytest.approx(gold_first)


def test_bleu_tokens_split_on_whitespace_and_periods():
    assert scorers.bleu_tokens("Dr. Smith  said.It works...\nyes") == ["Dr", "Smith", "said", "It", "works", "yes"]


def test_default_rouge_keeps_umlauts_unlike_rouge_score():
    metrics = all_metrics("20Minuten", ["für alle kinder heute"], ["fär alle kinder heute"])
    assert metrics["rougeL_rouge_score"] == pytest.approx(100.0)  # rouge-score deletes ü and ä
    assert metrics["rougeL"] < 100.0


def test_py150_last_segment_and_literals():
    gold = "return build_response ( path , <STR_LIT> , <NUM_LIT> or <NUM_LIT:200> )"
    assert scorers.restore_literals(gold) == "return build_response ( path ,  , 0 or 200 )"
    output = "data = x <EOL>return build_response ( path ,  , 0 or 200 )"
    assert score("Py150", [output], [gold]) == pytest.approx(100.0)
    assert score("edit_sim", ["", "foo <EOL>"], [gold, gold]) == 0.0


def _lcs_ratio_percent(a, b):
    """Levenshtein.ratio (python-Levenshtein, used by fuzzywuzzy): 2·LCS / (|a| + |b|), from a plain DP."""
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return 100 * 2 * prev[-1] / (len(a) + len(b))


def test_edit_similarity_is_fuzzywuzzy_ratio_with_levenshtein():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("ab (),=x") for _ in range(rng.randint(1, 30)))
        b = "".join(rng.choice("ab (),=x") for _ in range(rng.randint(1, 30)))
        assert scorers.edit_similarity(a, b) == round(_lcs_ratio_percent(a, b)) / 100


def test_thinking_is_dropped_before_every_rule():
    assert score("NumGLUE-cm", ["<think>maybe 3</think> 4"], ["4"]) == 100.0
    assert score("FOMC", ["<think>A</think>"], ["A"]) == 0.0


# ---------------------------------------------------------------- VQA and captions
@pytest.mark.parametrize("raw, normalized", [
    ("Two dogs!", "2 dogs"), ("The cat.", "cat"), ("dont know", "don't know"), ("1,000", "1000"),
    ("yes\n", "yes"), ("its red", "its red"), ("a man's hat", "man's hat"),
])
def test_vqa_answer_normalisation(raw, normalized):
    assert scorers.normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_rules():
    humans = ["2"] * 2 + ["3"] * 8
    assert score("vqa", ["two", "3", "4", ""], [humans] * 4) == pytest.approx(100 * (2 / 3 + 1 + 0 + 0) / 4)
    metrics = all_metrics("vqa", ["Two", "3"], [humans, humans])
    assert metrics["vqa_exact"] == pytest.approx(50.0)
    # leave-one-out (official script): 2 matches -> (2·1/3 + 8·2/3) / 10
    assert metrics["vqa_leave_one_out"] == pytest.approx(100 * ((2 * 1 / 3 + 8 * 2 / 3) / 10 + 1.0) / 2)
    assert score("vqa_exact", ["the hat"], ["hat"]) == 100.0


def test_caption_uses_all_references():
    refs = ["A man wears an orange hat and glasses.", "A man with glasses is wearing a hat."]
    assert score("caption", [refs[0]], [refs]) == pytest.approx(100.0, abs=1e-4)
    assert score("caption", ["dogs run on grass"], [refs]) < 10
    assert {"rougeL_rouge_score", "sacrebleu"} <= set(all_metrics("caption", [refs[1]], [refs]))


def test_errors_are_one_line_piece_errors():
    with pytest.raises(PieceError, match="predictions"):
        score("FOMC", ["A"], ["A", "B"])
    with pytest.raises(PieceError, match="no scorer"):
        score("SQuAD", ["x"], ["x"])
    assert score("FOMC", [], []) == 0.0
    assert scorers.higher_is_better("Py150")


def test_references_of_records():
    assert scorers.reference_of({"prompt": "q", "answer": "B"}) == "B"
    humans = ["2"] * 10
    assert scorers.reference_of({"prompt": "q", "answer": "2", "references": humans}) == humans
    assert score("vqa", ["two", "3"], ["2", "2"]) == 50.0  # a single gold string: exact match, full credit
