"""Data for the LLM tasks, generated or read locally (no hub): word problems with worked solutions, and
Python standard-library functions split into signature + docstring and body.

* :func:`word_problems` draws multi-step arithmetic word problems from seven families (shopping with change,
  two-leg journeys, sharing and restocking, discounts, savings goals, areas and fences, ages).  Each has a
  worked solution, one line per step, ending in ``The answer is N.``; ``steps`` chains that many extra
  operations onto each problem (harder problems).  Train and test are disjoint: every question is drawn
  from one seeded generator, and a question whose text occurs in the other split is drawn again.
* :func:`stdlib_functions` reads module-level functions with docstrings from the running Python's standard
  library with :mod:`ast`: prompt = decorators + signature + docstring, target = the body.  Which functions
  exist depends on the Python version; the train and test *modules* are disjoint lists fixed here.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CODE_TEST_MODULES", "CODE_TRAIN_MODULES", "Example", "final_answer", "first_code_line", "stdlib_functions",
           "word_problems"]

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Maya",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("candle", "candles"), ("mug", "mugs"), ("plant", "plants"))


@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` and is trained on ``target`` only."""

    prompt: str
    target: str
    answer: str  # what exact match compares: the final number (math) or the first line of the body (code)


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    (a1, a2), (b1, b2) = r.sample(ITEMS, 2)
    na, pa, nb, pb = r.randint(2, 9), r.randint(2, 15), r.randint(2, 9), r.randint(2, 15)
    cost_a, cost_b = na * pa, nb * pb
    total = cost_a + cost_b
    bill = next(b for b in (20, 50, 100, 200, 500) if b >= total)
    q = (f"{who} buys {na} {a2} at ${pa} each and {nb} {b2} at ${pb} each, and pays with a ${bill} bill. "
         f"How many dollars of change does {who} get?")
    steps = [f"The {a2} cost {na} * {pa} = {cost_a} dollars.", f"The {b2} cost {nb} * {pb} = {cost_b} dollars.",
             f"Together they cost {cost_a} + {cost_b} = {total} dollars.",
             f"The change is {bill} - {total} = {bill - total} dollars."]
    return q, steps, bill - total


def _journey(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    v1, t1, v2, t2 = r.randint(3, 12) * 5, r.randint(1, 5), r.randint(3, 12) * 5, r.randint(1, 5)
    d1, d2 = v1 * t1, v2 * t2
    q = (f"{who} drives at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. "
         f"How many kilometres does {who} drive in all?")
    steps = [f"The first part is {v1} * {t1} = {d1} km.", f"The second part is {v2} * {t2} = {d2} km.",
             f"In all {d1} + {d2} = {d1 + d2} km."]
    return q, steps, d1 + d2


def _sharing(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    item = r.choice(ITEMS)[1]
    friends, each, bought = r.randint(2, 8), r.randint(2, 9), r.randint(5, 40)
    given = friends * each
    start = given + r.randint(1, 60)
    left = start - given
    q = (f"{who} has {start} {item}. {who} gives {each} {item} to each of {friends} friends and then buys "
         f"{bought} more. How many {item} does {who} have now?")
    steps = [f"{who} gives away {friends} * {each} = {given} {item}.",
             f"{who} has {start} - {given} = {left} {item} left.",
             f"After buying, {who} has {left} + {bought} = {left + bought} {item}."]
    return q, steps, left + bought


def _discount(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    item = r.choice(ITEMS)
    pct = r.choice((10, 20, 25, 50))
    price = r.randint(1, 12) * (100 // pct) * r.choice((1, 2, 4))
    off = price * pct // 100
    unit = price - off
    n = r.randint(2, 6)
    q = (f"A {item[0]} costs ${price}. It is on sale for {pct}% off. {who} buys {n} {item[1]} on sale. "
         f"How many dollars does {who} pay?")
    steps = [f"The discount is {pct}% of {price} = {off} dollars.", f"One {item[0]} costs {price} - {off} = {unit} dollars.",
             f"{n} {item[1]} cost {n} * {unit} = {n * unit} dollars."]
    return q, steps, n * unit


def _savings(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    weekly, have = r.randint(3, 25), r.randint(0, 60)
    weeks = r.randint(2, 12)
    goal = have + weekly * weeks - r.randint(0, weekly - 1)
    need = goal - have
    q = (f"{who} has ${have} and saves ${weekly} every week. How many weeks does {who} need to have at "
         f"least ${goal}?")
    steps = [f"{who} still needs {goal} - {have} = {need} dollars.",
             f"{need} / {weekly} is {need // weekly} with remainder {need % weekly}, so {who} needs {weeks} weeks."]
    return q, steps, weeks


def _garden(r: random.Random) -> tuple[str, list[str], int]:
    who = r.choice(NAMES)
    w, h, post = r.randint(3, 20), r.randint(3, 20), r.randint(2, 9)
    perimeter = 2 * (w + h)
    q = (f"{who}'s garden is a rectangle {w} m wide and {h} m long. Fence costs ${post} per metre. "
         f"How many dollars does fencing the whole garden cost?")
    steps = [f"The perimeter is 2 * ({w} + {h}) = {perimeter} m.",
             f"The fence costs {perimeter} * {post} = {perimeter * post} dollars."]
    return q, steps, perimeter * post


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    a, b = r.sample(NAMES, 2)
    age_b, diff, later = r.randint(3, 30), r.randint(2, 25), r.randint(2, 15)
    age_a = age_b + diff
    total = age_a + later + age_b + later
    q = (f"{a} is {diff} years older than {b}, who is {age_b}. What will the sum of their ages be in "
         f"{later} years?")
    steps = [f"{a} is {age_b} + {diff} = {age_a} years old.",
             f"In {later} years {a} will be {age_a + later} and {b} {age_b + later}.",
             f"The sum is {age_a + later} + {age_b + later} = {total}."]
    return q, steps, total


FAMILIES = (_shopping, _journey, _sharing, _discount, _savings, _garden, _ages)


def _chain(r: random.Random, q: str, steps: list[str], value: int) -> tuple[str, list[str], int]:
    """One more operation on the answer so far (a harder problem: one more step to get right)."""
    kind = r.randrange(3)
    k = r.randint(2, 9)
    if kind == 0:
        return (q + f" Then multiply that number by {k}.", steps + [f"Multiplied by {k}: {value} * {k} = {value * k}."],
                value * k)
    if kind == 1:
        return q + f" Then add {k * 7}.", steps + [f"Adding {k * 7}: {value} + {k * 7} = {value + k * 7}."], value + k * 7
    return (q + f" Then subtract {k}.", steps + [f"Subtracting {k}: {value} - {k} = {value - k}."], value - k)


def word_problems(train: int, test: int, seed: int = 0, steps: int = 0) -> tuple[list[Example], list[Example]]:
    """``train`` and ``test`` word problems (families in turn), disjoint question texts; ``steps`` extra
    chained operations per problem.  Deterministic in ``seed``."""
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[list[Example]] = [[], []]
    for split, count in enumerate((train, test)):
        while len(out[split]) < count:
            family = FAMILIES[len(out[split]) % len(FAMILIES)]
            q, work, value = family(r)
            for _ in range(steps):
                q, work, value = _chain(r, q, work, value)
            if q in seen:
                continue
            seen.add(q)
            out[split].append(Example(q, "\n".join(work) + f"\nThe answer is {value}.", str(value)))
    return out[0], out[1]


_ANSWER = re.compile(r"The answer is (-?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the first ``The answer is`` in generated text, or ``None``."""
    match = _ANSWER.search(text)
    return match.group(1) if match else None


# modules of pure-Python functions with docstrings; disjoint lists (the test modules are never trained on)
CODE_TRAIN_MODULES = ("argparse", "base64", "calendar", "configparser", "csv", "difflib", "dis", "email.utils",
                      "ftplib", "gettext", "glob", "gzip", "heapq", "imaplib", "inspect", "locale", "mailbox",
                      "mimetypes", "ntpath", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform",
                      "posixpath", "pprint", "quopri", "random", "shutil", "smtplib", "statistics", "subprocess",
                      "tarfile", "tempfile", "threading", "traceback", "typing", "urllib.parse", "uuid", "warnings",
                      "zipfile")
CODE_TEST_MODULES = ("bisect", "colorsys", "fnmatch", "fractions", "functools", "html", "json.encoder",
                     "shlex", "string", "textwrap", "tokenize", "webbrowser")


def _source(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text(encoding="utf-8")


def _functions(module: str, max_chars: int) -> list[Example]:
    source = _source(module)
    if source is None:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or not node.body or node.col_offset != 0:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if len(node.body) < 2:
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        body_start, end = doc.end_lineno, node.end_lineno
        prompt, body = "".join(lines[start:body_start]), "".join(lines[body_start:end])
        first = first_code_line(body)
        if first and len(prompt) + len(body) <= max_chars:
            out.append(Example(prompt, body, first))
    return out


def first_code_line(text: str) -> str:
    """The first line of ``text`` that is neither blank nor a comment, stripped (``""`` if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")), "")


def stdlib_functions(modules: tuple[str, ...], max_chars: int = 1200) -> list[Example]:
    """Module-level functions with a docstring and a body, from ``modules`` of the running Python (modules
    it lacks are skipped), each at most ``max_chars`` characters; in module then source order."""
    return [ex for module in modules for ex in _functions(module, max_chars)]
