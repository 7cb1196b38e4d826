"""Records of the miniature's four synthetic tasks, in TRACE's `{"prompt", "answer"}` format.

Each generator mirrors one kind of TRACE task's prompt style: letter-choice classification (FOMC),
a number-answer word problem (NumGLUE), a rewrite (MeetingBank, 20Minuten) and a code-line
continuation (Py150). The tasks' metrics and budgets are the benchmark's (benchmarks/tiny.py).
"""
from __future__ import annotations

import random
from typing import Callable

from piece_cl.errors import PieceError

Record = dict[str, str]

# --- tiny_choice: topic classification with letter answers, in FOMC's prompt style -------------
_TOPICS = {
    "A": ["won the final match", "scored a late goal", "trained at the stadium", "lost the tennis game",
          "ran a fast race", "joined the football team", "kicked the ball hard", "coached the young players"],
    "B": ["saw heavy rain all day", "felt the cold wind", "watched the storm arrive", "waited for the snow",
          "enjoyed the warm sunshine", "heard thunder at night", "noticed the thick fog", "checked the forecast"],
    "C": ["baked fresh bread", "cooked a spicy soup", "ate a sweet cake", "tasted the cheese",
          "made a fruit salad", "fried some eggs", "ordered a large pizza", "boiled the rice"],
    "D": ["played the old piano", "sang a quiet song", "heard the band play", "learned a new guitar chord",
          "joined the city choir", "wrote a short melody", "listened to the drums", "tuned the violin"],
}
_SUBJECTS = ["my neighbour", "the old man", "a young girl", "our teacher", "the tall boy", "my sister",
             "the new student", "a tired worker", "his friend", "the farmer", "her cousin", "the doctor"]
_WHEN = ["yesterday", "today", "last week", "on sunday", "this morning", "after lunch", "at night", "again"]


def _choice(rng: random.Random) -> Record:
    label = rng.choice(sorted(_TOPICS))
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_TOPICS[label])} {rng.choice(_WHEN)}"
    prompt = ("What is the topic of the following sentence? A. sports, B. weather, C. food, D. music. "
              f"Choose one from A, B, C and D.\nSentence:\n{sentence}\nTopic:")
    return {"prompt": prompt, "answer": label}


# --- tiny_number: a one-step word problem with a number answer, in NumGLUE's prompt style -------
_NAMES = ["Tom", "Ava", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]


def _number(rng: random.Random) -> Record:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        question, answer = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    else:
        a += b
        question, answer = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    return {"prompt": f"Solve the following math problem.\nQuestion:\n{question}\nAnswer:", "answer": str(answer)}


# --- tiny_rewrite: present to past tense, scored by BLEU-4 and ROUGE-L -------------------------
_VERBS = {"walks": "walked", "looks": "looked", "talks": "talked", "waits": "waited", "jumps": "jumped",
          "runs": "ran", "goes": "went", "comes": "came", "sits": "sat", "swims": "swam", "drives": "drove",
          "rides": "rode", "writes": "wrote", "sings": "sang", "sleeps": "slept", "reads": "read"}
_PLACES = ["to the market", "near the river", "in the garden", "at the station", "by the lake",
           "around the park", "into the city", "across the bridge", "behind the school", "along the beach"]
_TIMES = ["every morning", "after dinner", "on weekends", "before work", "in the evening", "with a friend"]


def _rewrite(rng: random.Random) -> Record:
    verb = rng.choice(sorted(_VERBS))
    subject, place, time = rng.choice(_SUBJECTS), rng.choice(_PLACES), rng.choice(_TIMES)
    return {
        "prompt": f"Rewrite the sentence in the past tense.\nSentence:\n{subject} {verb} {place} {time}\nRewrite:",
        "answer": f"{subject} {_VERBS[verb]} {place} {time}",
    }


# --- tiny_codeline: Py150-style next-line completion with <EOL> separators --------------------
_ATTRS = ["name", "size", "value", "price", "count", "weight", "score", "label", "color", "speed", "path", "level"]
_ARGS = ["items", "values", "rows", "entries", "records", "nodes"]
_ITEM_VARS = ["item", "obj", "entry", "elem", "row", "node"]
_ACCS = ["total", "result", "acc", "summed"]
_MODULES = ["os", "sys", "json", "time", "math", "random"]
_CLASSES = ["Order", "Store", "Graph", "Report", "Widget", "Parser", "Loader", "Cache"]


def _codeline(rng: random.Random) -> Record:
    attr, arg, item, acc = rng.choice(_ATTRS), rng.choice(_ARGS), rng.choice(_ITEM_VARS), rng.choice(_ACCS)
    header = f"<s> import {rng.choice(_MODULES)} <EOL> class {rng.choice(_CLASSES)} ( object ) : <EOL> "
    kind = rng.randrange(4)
    if kind == 0:
        context = f"def total_{attr} ( self , {arg} ) : <EOL> {acc} = <NUM_LIT:0> <EOL> for {item} in {arg} : <EOL>"
        line = f"{acc} += {item} . {attr}"
    elif kind == 1:
        context = f"def set_{attr} ( self , {attr} ) : <EOL>"
        line = f"self . _{attr} = {attr}"
    elif kind == 2:
        context = f"def get_{attr} ( self ) : <EOL>"
        line = f"return self . _{attr}"
    else:
        context = f"def find_{attr} ( self , {arg} , {attr} ) : <EOL> for {item} in {arg} : <EOL>"
        line = f"if {item} . {attr} == {attr} :"
    return {"prompt": header + context, "answer": line}


# name -> record generator, in the benchmark's default order (the tokenizer corpus follows it)
GENERATORS: dict[str, Callable[[random.Random], Record]] = {
    "tiny_choice": _choice,
    "tiny_number": _number,
    "tiny_rewrite": _rewrite,
    "tiny_codeline": _codeline,
}


def unique_records(name: str, n: int, seed: int) -> list[Record]:
    """`n` records of task `name` with distinct prompts (drawn from `seed`), so that splits cut from them
    are disjoint."""
    if name not in GENERATORS:
        raise PieceError(f"unknown tiny task '{name}'; known: {', '.join(GENERATORS)}")
    generator, rng = GENERATORS[name], random.Random(f"{seed}/{name}")
    records: dict[str, Record] = {}
    for _ in range(50 * n):
        record = generator(rng)
        records.setdefault(record["prompt"], record)
        if len(records) == n:
            return list(records.values())
    raise PieceError(f"cannot draw {n} distinct records from {name[len('tiny_'):]}; lower the split sizes")


def tokenizer_corpus(per_task: int = 300) -> list[str]:
    """Text of every tiny task (fixed seed: the word pools, not the draw, decide the vocabulary), for
    the miniature's tokenizer, which is trained before any benchmark is built."""
    rng = random.Random("tokenizer-corpus")
    return [r["prompt"] + " " + r["answer"] for generator in GENERATORS.values() for r in
            (generator(rng) for _ in range(per_task))]
