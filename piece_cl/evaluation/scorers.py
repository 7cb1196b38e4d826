"""Task scorers that reproduce the authors' numbers rule for rule (docs/paper-notes.md §3), plus alternatives.

Every rule is a per-item score on 0..1 registered by name; a task score is 100 × the mean over
*all* items (an empty or unparsable output counts as wrong, never as skipped). Text up to the
last `</think>` is dropped before any rule, as the authors did for reasoning models.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence, Union

from piece_cl.errors import PieceError

Reference = Union[str, Sequence[str]]  # one gold string, or the human answers / captions of one item
ItemRule = Callable[[str, Reference], float]

THINK_END = "</think>"


@dataclass(frozen=True)
class Metric:
    name: str
    item_score: ItemRule
    higher_is_better: bool = True


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, higher_is_better: bool = True) -> Callable[[ItemRule], ItemRule]:
    def decorate(rule: ItemRule) -> ItemRule:
        _METRICS[name] = Metric(name, rule, higher_is_better)
        return rule

    return decorate


# TRACE task name -> the metric rule the authors used for it.
TASK_METRICS = {
    "C-STANCE": "cstance",
    "FOMC": "choice",
    "MeetingBank": "bleu_rouge",
    "ScienceQA": "scienceqa",
    "NumGLUE-cm": "number",
    "NumGLUE-ds": "number",
    "20Minuten": "bleu_rouge",
    "Py150": "edit_sim",
}


def metric_for(task: str) -> Metric:
    name = TASK_METRICS.get(task, task)
    if name not in _METRICS:
        known = sorted(set(TASK_METRICS) | set(_METRICS))
        raise PieceError(f"no scorer for task or metric '{task}'; known: {', '.join(known)}")
    return _METRICS[name]


def drop_thinking(text: str) -> str:
    """Reasoning models think first; only what follows the last `</think>` is the answer."""
    return text.rsplit(THINK_END, 1)[-1]


# ----------------------------------------------------------------------------- extraction
_CHOICE = re.compile(r"[A-D]")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_CSTANCE_WORDS = {"支持": "A", "反对": "B", "中立": "C"}


def _first_choice(text: str) -> str | None:
    match = _CHOICE.search(text)
    return match.group() if match else None


def _cstance_choice(text: str) -> str | None:
    """A letter within the first 4 characters, else the leading 支持/反对/中立 (no stripping, as the authors)."""
    return _first_choice(text[:4]) or _CSTANCE_WORDS.get(text[:2])


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return match.group() if match else None


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "cstance": _cstance_choice,
    "choice": _first_choice,
    "scienceqa": _first_choice,
    "number": _first_number,
}


def extract(task: str, prediction: str) -> str | None:
    """The answer the authors' scorer reads out of a model output (choice and number tasks)."""
    name = metric_for(task).name
    if name not in _EXTRACTORS:
        raise PieceError(f"task '{task}' (metric '{name}') has no answer extraction; it is scored on the whole text")
    return _EXTRACTORS[name](drop_thinking(prediction))


@register_metric("cstance")
def _cstance_item(prediction: str, reference: str) -> float:
    return float(_cstance_choice(prediction) == reference.strip())


@register_metric("choice")
def _choice_item(prediction: str, reference: str) -> float:
    return float(_first_choice(prediction) == reference.strip())


@register_metric("scienceqa")
def _scienceqa_item(prediction: str, reference: str) -> float:
    """The gold is "A\\n<explanation>": compare with its first capital A-D."""
    gold = _first_choice(reference)
    return float(gold is not None and _first_choice(prediction) == gold)


@register_metric("number")
def _number_item(prediction: str, reference: str) -> float:
    """Exact string match: "11.0" is not "11", as in the authors' scorer."""
    return float(_first_number(prediction) == reference.strip())


# ----------------------------------------------------------------------------- BLEU / ROUGE
def bleu_tokens(text: str) -> list[str]:
    """The authors' BLEU tokeniser: split on whitespace and '.', drop empty pieces."""
    return [token for token in re.split(r"\s|\.", text) if token]


def bleu4(reference_texts: Sequence[str], hypothesis: str) -> float:
    """nltk sentence BLEU-4, uniform weights, no smoothing (0 when any n-gram order has no match)."""
    from nltk.translate.bleu_score import sentence_bleu

    hypothesis_tokens = bleu_tokens(hypothesis)
    if not hypothesis_tokens:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count
        return float(sentence_bleu([bleu_tokens(ref) for ref in reference_texts], hypothesis_tokens, (0.25,) * 4))


def rouge_l(gold: str, prediction: str) -> float:
    """ROUGE-L F of the `rouge` 1.0.1 package called as the authors did: get_scores(gold, prediction).

    Its summary-level LCS splits sentences on '.', so argument order matters. Inputs the package
    rejects (no sentence or no word after its splitting) score 0, which is what an item the
    authors skipped contributed to their mean.
    """
    from rouge import Rouge

    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(gold, prediction, avg=True)["rouge-l"]["f"])
    except (ValueError, ZeroDivisionError):
        return 0.0


def _bleu_and_rouge(prediction: str, reference: str) -> tuple[float, float]:
    if not prediction or not reference:
        return 0.0, 0.0
    return bleu4([reference], prediction), rouge_l(reference, prediction)


@register_metric("bleu_rouge")
def _bleu_rouge_item(prediction: str, reference: str) -> float:
    """(BLEU-4 + ROUGE-L F) / 2 per item (MeetingBank, 20Minuten)."""
    return sum(_bleu_and_rouge(prediction, reference)) / 2


@register_metric("caption")
def _caption_item(prediction: str, references: Sequence[str]) -> float:
    """Flickr30K: (multi-reference BLEU-4 + best ROUGE-L over the references) / 2."""
    if not prediction:
        return 0.0
    best_rouge = max((rouge_l(ref, prediction) for ref in references if ref), default=0.0)
    return (bleu4(references, prediction) + best_rouge) / 2


# ----------------------------------------------------------------------------- Py150
_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def restore_literals(code: str) -> str:
    """TRACE's Py150 post-processing: <NUM_LIT>→0, <STR_LIT>/<CHAR_LIT>→'', <X_LIT:v>→v."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, literal in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{literal}>", literal)
    return code


def py150_line(prediction: str) -> str:
    """The predicted next line: the last `<EOL>`-separated segment, literals restored."""
    return restore_literals(prediction.split("<EOL>")[-1])


def edit_similarity(left: str, right: str) -> float:
    """fuzzywuzzy's fuzz.ratio/100 as run with python-Levenshtein: the InDel ratio, rounded to an integer percent.

    rapidfuzz's fuzz.ratio computes the same InDel ratio (2·LCS / total length) unrounded;
    fuzzywuzzy rounds it (`intr`), so we round too. Empty strings score 0.
    """
    from rapidfuzz import fuzz

    if not left or not right:
        return 0.0
    return round(fuzz.ratio(left, right)) / 100


@register_metric("edit_sim")
def _edit_sim_item(prediction: str, reference: str) -> float:
    return edit_similarity(py150_line(prediction), restore_literals(reference))


# ----------------------------------------------------------------------------- VQA
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official script's regex, kept as is
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he'll he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd "
    "she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
    "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
    "you'd you'd've you'll you're you've"
).split()
# Spellings that are ordinary words must not be "repaired" into contractions.
_REAL_WORDS = {"its", "well", "were", "shell", "hell", "id", "ill", "wed", "shed", "lets"}


def _contraction_variants() -> dict[str, str]:
    """The official map sends apostrophe-less spellings ("dont", "couldnt've") to the canonical form."""
    variants = {}
    for canonical in _CANONICAL_CONTRACTIONS:
        positions = [i for i, char in enumerate(canonical) if char == "'"]
        for count in range(1, len(positions) + 1):
            for dropped in combinations(positions, count):
                variant = "".join(c for i, c in enumerate(canonical) if i not in dropped)
                if variant not in _REAL_WORDS:
                    variants[variant] = canonical
    return variants


_CONTRACTIONS = _contraction_variants()


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA evaluation's processPunctuation + processDigitArticle."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _answers(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def top_answer(reference: Reference) -> str:
    """The most frequent human answer (after normalisation); ties go to the first given."""
    normalized = [normalize_vqa_answer(a) for a in _answers(reference)]
    return Counter(normalized).most_common(1)[0][0] if normalized else ""


@register_metric("vqa")
def _vqa_item(prediction: str, reference: Reference) -> float:
    """min(#humans who gave the answer / 3, 1), both sides normalised as the official script does.

    A plain string reference is a single gold answer, so the rule degenerates to exact match.
    """
    answer = normalize_vqa_answer(prediction)
    if not answer:
        return 0.0
    if isinstance(reference, str):
        return float(answer == normalize_vqa_answer(reference))
    humans = [normalize_vqa_answer(a) for a in reference]
    return min(humans.count(answer) / 3, 1.0)


def _vqa_leave_one_out(prediction: str, reference: Reference) -> float:
    """The official script's variant: the min(·/3, 1) rule averaged over the 10 leave-one-out subsets."""
    answer = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in _answers(reference)]
    if not answer or not humans:
        return 0.0
    matches = humans.count(answer)
    per_held_out = [min((matches - (human == answer)) / 3, 1.0) for human in humans]
    return sum(per_held_out) / len(per_held_out)


@register_metric("vqa_exact")
def _vqa_exact_item(prediction: str, reference: Reference) -> float:
    """Exact match with the top answer (a string, or the most frequent of the human answers)."""
    answer = normalize_vqa_answer(prediction)
    return float(bool(answer) and answer == top_answer(reference))


# ----------------------------------------------------------------------------- public API
def reference_of(record: dict) -> Reference:
    """What a test record is scored against: its "references" (VQA answers, captions) or its "answer"."""
    return record.get("references", record["answer"])


def _check_lengths(predictions: Sequence[str], references: Sequence[Reference]) -> None:
    if len(predictions) != len(references):
        raise PieceError(f"{len(predictions)} predictions for {len(references)} references")


def _mean_percent(rule: Callable[[str, Reference], float], predictions, references) -> float:
    if not predictions:
        return 0.0
    return 100.0 * sum(rule(drop_thinking(p), r) for p, r in zip(predictions, references)) / len(predictions)


def score(task: str, predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """The authors' score on 0..100 for a TRACE task name or a generic metric name."""
    metric = metric_for(task)
    _check_lengths(predictions, references)
    return _mean_percent(metric.item_score, predictions, references)


def higher_is_better(task: str) -> bool:
    return metric_for(task).higher_is_better


def _text_alternatives(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """Library-standard scores for text outputs, so that our numbers can be put beside others'."""
    import sacrebleu
    from rouge_score import rouge_scorer

    reference_lists = [_answers(r) for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge_scores = [
        max((scorer.score(ref, p)["rougeL"].fmeasure for ref in refs), default=0.0)
        for p, refs in zip(predictions, reference_lists)
    ]
    depth = max(len(refs) for refs in reference_lists)
    padded = [[refs[i] if i < len(refs) else refs[0] for refs in reference_lists] for i in range(depth)]
    return {
        "rougeL_rouge_score": 100.0 * sum(rouge_scores) / len(predictions),
        "sacrebleu": float(sacrebleu.corpus_bleu(list(predictions), padded).score),
    }


def all_metrics(task: str, predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
    """The default score under "score", plus the alternatives written beside it in metrics.json."""
    metric = metric_for(task)
    _check_lengths(predictions, references)
    results = {"score": _mean_percent(metric.item_score, predictions, references)}
    if not predictions:
        return results
    answers = [drop_thinking(p) for p in predictions]
    if metric.name in _EXTRACTORS:
        extractor = _EXTRACTORS[metric.name]
        results["parsed_percent"] = 100.0 * sum(extractor(a) is not None for a in answers) / len(answers)
    if metric.name == "bleu_rouge":
        parts = [_bleu_and_rouge(a, r) for a, r in zip(answers, references)]
        results["bleu4"] = 100.0 * sum(b for b, _ in parts) / len(parts)
        results["rougeL"] = 100.0 * sum(r for _, r in parts) / len(parts)
    if metric.name == "edit_sim":
        results["paper_text_bleu_rouge"] = _mean_percent(_bleu_rouge_item, answers, references)
        lines = [py150_line(a) for a in answers]
        golds = [restore_literals(r) for r in references]
        results |= _text_alternatives(lines, golds)
    elif metric.name in {"bleu_rouge", "caption"}:
        results |= _text_alternatives(answers, references)
    if metric.name in {"vqa", "vqa_exact"}:
        results["vqa"] = _mean_percent(_vqa_item, answers, references)
        results["vqa_exact"] = _mean_percent(_vqa_exact_item, answers, references)
        results["vqa_leave_one_out"] = _mean_percent(_vqa_leave_one_out, answers, references)
    return results
