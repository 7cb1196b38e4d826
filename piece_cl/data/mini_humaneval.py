"""Mini-HumanEval: templated "write this function from its docstring" problems with unit tests.

It is the miniature's general skill (what the tiny model is pretrained on and may forget) and its
probe. Problems have HumanEval's shape `{task_id, prompt, canonical_solution, test, entry_point}`,
so the same probe code and sandbox run both. A problem family fixes the function; its constants
come from the docstring, so passing a held-out problem means reading the docstring, not recalling
a training sample. The probe split uses (family, constants) combinations that training never shows.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

# Bump when templates change: the pretraining cache is keyed on it.
DATA_VERSION = "mini-humaneval-v3"

_WORDS = ["cat", "tree", "moon", "river", "stone", "apple", "cloud", "piano", "lemon", "tiger"]
_LETTERS = "abcdefghij"
_HELD_OUT_EVERY = 5  # one (family, constants) combination in five is reserved for the probe


@dataclass(frozen=True)
class Family:
    """One function template: its name, signature, docstring and body, with constants as {a}, {b}, {c}."""

    name: str
    signature: str  # arguments and return annotation, e.g. "x: int) -> int"
    doc: str
    body: str  # indented solution lines
    params: Callable[[random.Random], dict]
    inputs: Callable[[random.Random], tuple]


def _k(lo: int, hi: int) -> Callable[[random.Random], dict]:
    return lambda rng: {"a": rng.randint(lo, hi)}


def _int(rng: random.Random) -> tuple:
    return (rng.randint(-20, 60),)


def _numbers(rng: random.Random) -> tuple:
    return ([rng.randint(0, 40) for _ in range(rng.randint(2, 6))],)


def _text(rng: random.Random) -> tuple:
    return ("".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 9))),)


def _letters(rng: random.Random) -> dict:
    c, d = rng.sample(_LETTERS, 2)
    return {"c": c, "d": d}


FAMILIES: list[Family] = [
    Family("add_constant", "x: int) -> int", "Return x plus {a}.", "    return x + {a}\n", _k(2, 49), _int),
    Family("subtract_constant", "x: int) -> int", "Return x minus {a}.", "    return x - {a}\n", _k(2, 49), _int),
    Family("multiply", "x: int) -> int", "Return x times {a}.", "    return x * {a}\n", _k(2, 19), _int),
    Family("remainder", "x: int) -> int", "Return the remainder of x divided by {a}.", "    return x % {a}\n",
           _k(2, 19), _int),
    Family("is_greater", "x: int) -> bool", "Return True if x is greater than {a}.", "    return x > {a}\n",
           _k(0, 49), _int),
    Family("scale_numbers", "numbers: list) -> list", "Return a list with every number multiplied by {a}.",
           "    return [n * {a} for n in numbers]\n", _k(2, 19), _numbers),
    Family("shift_numbers", "numbers: list) -> list", "Return a list with every number increased by {a}.",
           "    return [n + {a} for n in numbers]\n", _k(2, 49), _numbers),
    Family("keep_greater", "numbers: list) -> list", "Return the numbers that are greater than {a}.",
           "    return [n for n in numbers if n > {a}]\n", _k(0, 39), _numbers),
    Family("count_multiples", "numbers: list) -> int", "Count the numbers that are divisible by {a}.",
           "    return sum(1 for n in numbers if n % {a} == 0)\n", _k(2, 9), _numbers),
    Family("sum_plus", "numbers: list) -> int", "Return the sum of the numbers plus {a}.",
           "    return sum(numbers) + {a}\n", _k(2, 49), _numbers),
    Family("repeat_text", "s: str) -> str", "Return s repeated {a} times.", "    return s * {a}\n",
           _k(2, 5), _text),
    Family("first_chars", "s: str) -> str", "Return the first {a} characters of s.", "    return s[:{a}]\n",
           _k(1, 8), _text),
    Family("drop_chars", "s: str) -> str", "Return s without its first {a} characters.", "    return s[{a}:]\n",
           _k(1, 8), _text),
    Family("count_letter", "s: str) -> int", "Count how many times the letter '{c}' appears in s.",
           "    return s.count('{c}')\n", lambda rng: {"c": rng.choice(_LETTERS)}, _text),
    Family("replace_letter", "s: str) -> str", "Replace every letter '{c}' in s with '{d}'.",
           "    return s.replace('{c}', '{d}')\n", _letters, _text),
    Family("append_word", "s: str) -> str", "Return s followed by the word '{w}'.", "    return s + '{w}'\n",
           lambda rng: {"w": rng.choice(_WORDS)}, _text),
]


def _is_held_out(family: Family, params: dict) -> bool:
    """A fixed, seed-independent split of (family, constants) combinations: probe problems are never trained on."""
    key = family.name + repr(sorted(params.items()))
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % _HELD_OUT_EVERY == 0


def _make_problem(family: Family, params: dict, rng: random.Random, task_id: str) -> dict:
    body = family.body.format(**params)
    header = f"def {family.name}({family.signature}:\n"
    namespace: dict = {}
    exec(header + body, namespace)  # our own template, to compute the expected outputs
    function = namespace[family.name]
    checked = [family.inputs(rng) for _ in range(7)]
    # No doctest examples: their digits would sit between the constant and the body and a 0.9M
    # model then guesses a nearby number instead of copying the constant (probe 17.5% with one).
    prompt = header + f'    """{family.doc.format(**params)}\n    """\n'
    asserts = "".join(f"    assert candidate({', '.join(map(repr, args))}) == {function(*args)!r}\n" for args in checked)
    return {
        "task_id": task_id,
        "prompt": prompt,
        "canonical_solution": body,
        "test": f"def check(candidate):\n{asserts}",
        "entry_point": family.name,
    }


def _problems(n: int, seed: int, held_out: bool, prefix: str) -> list[dict]:
    """`n` problems cycling over the families, from the training or the held-out combinations only."""
    rng = random.Random(seed)
    families = [f for f in FAMILIES if _draw(f, random.Random(0), held_out) is not None]
    problems = []
    while len(problems) < n:
        family = families[len(problems) % len(families)]
        params = _draw(family, rng, held_out)
        if params is not None:
            problems.append(_make_problem(family, params, rng, f"{prefix}/{len(problems)}"))
    return problems


def _draw(family: Family, rng: random.Random, held_out: bool, tries: int = 500) -> dict | None:
    """Constants for `family` on the requested side of the split (None: that side has none)."""
    for _ in range(tries):
        params = family.params(rng)
        if _is_held_out(family, params) == held_out:
            return params
    return None


def training_problems(n: int, seed: int = 0) -> list[dict]:
    """Problems for pretraining: only the non-held-out (family, constants) combinations."""
    return _problems(n, seed, held_out=False, prefix="MiniHumanEval-train")


def probe_problems(n: int, seed: int = 0) -> list[dict]:
    """Problems for the probe: only held-out combinations, disjoint from every training problem."""
    return _problems(n, seed + 1_000_003, held_out=True, prefix="MiniHumanEval")


def as_lm_text(problem: dict) -> str:
    """The pretraining text of a problem: the prompt followed by its solution, as in a code corpus."""
    return problem["prompt"] + problem["canonical_solution"]
