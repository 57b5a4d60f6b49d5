"""Which parameters form LoRA pairs, and how a pair's tensors are seen as matrices (docs/math.md §1).

A *pairing function* maps the list of parameter names of an optimizer to ``(name_A, name_B)``
tuples.  :func:`regex_pairing` builds one from a regular expression with a named group
``factor``: two names pair when they are equal outside that group and the group reads ``a`` in
one and ``b`` in the other.  The default, :data:`default_pairing`, covers PEFT's
``…lora_A.<adapter>.weight`` ↔ ``…lora_B.<adapter>.weight`` (Linear, Conv, any adapter name,
several adapters) and ``…lora_embedding_A.<adapter>`` ↔ ``…lora_embedding_B.<adapter>``, loralib's
``lora_A``/``lora_B``, torchtune's ``lora_a``/``lora_b`` and kohya/LyCORIS/musubi's ``lora_down``/``lora_up``.

Matrix views (row form, see :mod:`sdsopt.linalg`):

* ``A`` of shape ``(r, *rest)`` is the ``r × prod(rest)`` matrix (Conv: ``r × c·k·k``);
* ``B`` of shape ``(m, r, 1, …)`` is the ``m × r`` matrix; its row form is ``Bᵀ`` (``r × m``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "resolve_pairing",
    "AnyRule",
    "KOHYA_PATTERN",
    "PEFT_PATTERN",
    "TORCHTUNE_PATTERN",
    "default_pairing",
    "merged_layout",
    "stacked_count",
    "LoraPair",
    "PairingFn",
    "a_rows",
    "b_rows",
    "check_pair_shapes",
    "b_matrix",
    "lone_factors",
    "param_label",
    "peft_pairing",
    "regex_pairing",
    "RegexPairing",
]

PairingFn = Callable[[Sequence[str]], list[tuple[str, str]]]

PEFT_PATTERN = r"(?:^|\.)lora_(?:embedding_)?(?P<factor>A|B)(?:\.|$)"
"""PEFT's names: ``lora_A``/``lora_B`` (Linear, Conv, any adapter) and ``lora_embedding_A``/``_B``; also loralib's
``lora_A``/``lora_B`` parameters."""
TORCHTUNE_PATTERN = r"(?:^|\.)lora_(?P<factor>a|b)(?:\.|$)"
"""torchtune's ``LoRALinear``: ``lora_a``/``lora_b``."""
KOHYA_PATTERN = r"(?:^|\.)lora_(?P<factor>down|up)(?:\.|$)"
"""kohya sd-scripts, LyCORIS and musubi-tuner: ``lora_down``/``lora_up``."""


def _literal_pair(pattern: str) -> tuple[str, str] | None:
    """The two values the group ``factor`` of ``pattern`` can read, when it lists them literally: ``(?P<factor>
    x|y)`` gives ``(x, y)``, ``(?P<factor>[xy])`` gives ``(x, y)``; else ``None``."""
    group = re.search(r"\(\?P<factor>([^()]*)\)", pattern)
    if group is None:
        return None
    body = group.group(1)
    alternatives = body.split("|") if "|" in body else list(body[1:-1]) if re.fullmatch(r"\[\w\w\]", body) else []
    if len(alternatives) == 2 and all(re.fullmatch(r"\w+", a) for a in alternatives) and len(set(alternatives)) == 2:
        return alternatives[0], alternatives[1]
    return None


@dataclass(frozen=True)
class RegexPairing:
    """The pairing function of :func:`regex_pairing` (a class, so that optimizers holding it pickle)."""

    pattern: str
    a: str = "A"
    b: str = "B"

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.pattern).groupindex
        except re.error as exc:
            raise ValueError(f"pairing pattern {self.pattern!r} is not a valid regular expression ({exc}).") from None
        if "factor" not in groups:
            raise ValueError(f"pairing pattern {self.pattern!r} needs a named group (?P<factor>...) that reads "
                             "which factor a name is, e.g. r'\\.lora_(?P<factor>down|up)\\.'.")

    def __call__(self, names: Sequence[str]) -> list[tuple[str, str]]:
        regex = re.compile(self.pattern)  # (re caches compiled patterns)
        slots: dict[str, dict[str, str]] = {}
        for name in names:
            match = regex.search(name)
            if match is None or match.group("factor") not in (self.a, self.b):
                continue
            start, end = match.span("factor")
            key = name[:start] + "\0" + name[end:]
            role = "A" if match.group("factor") == self.a else "B"
            slots.setdefault(key, {})[role] = name
        return [(s["A"], s["B"]) for s in slots.values() if len(s) == 2]


@dataclass(frozen=True)
class AnyRule:
    """Pairs found by any of several rules (each name in one pair at most: the first rule that pairs it wins)."""

    rules: tuple[RegexPairing, ...]

    def __call__(self, names: Sequence[str]) -> list[tuple[str, str]]:
        out, taken = [], set()
        for rule in self.rules:
            for a, b in rule(names):
                if a not in taken and b not in taken:
                    out.append((a, b))
                    taken.update((a, b))
        return out

    def describe(self, pairs: Sequence[tuple[str, str]]) -> str:
        """How many of ``pairs`` each rule's names account for, e.g. ``'lora_A/lora_B: 4'``."""
        counts = []
        for rule in self.rules:
            regex = re.compile(rule.pattern)
            n = sum(1 for a, _ in pairs if (m := regex.search(a)) and m.group("factor") == rule.a)
            if n:
                counts.append(f"lora_{rule.a}/lora_{rule.b}: {n}")
        return ", ".join(counts) or "none"


def regex_pairing(pattern: str, a: str | None = None, b: str | None = None) -> PairingFn:
    """Pairing function from a regex with a named group ``factor`` whose value tells A from B.

    ``a``/``b`` are the values for the A factor (``r × n``, the input side) and the B factor (``m × r``).  Left
    out, they are read from the pattern when the group lists two literal values, A's first:
    ``(?P<factor>down|up)`` reads ``down`` = A, ``up`` = B; ``(?P<factor>[AB])`` reads ``A``, ``B``.  A pattern
    that is not a valid regex, has no group ``factor``, or whose values cannot be read raises ``ValueError``.

    Example (kohya-style names ``….lora_down.weight`` / ``….lora_up.weight``)::

        regex_pairing(r"\\.lora_(?P<factor>down|up)\\.")
    """
    if a is None or b is None:
        RegexPairing(pattern)  # (validates the pattern itself first)
        found = _literal_pair(pattern)
        if found is None:
            raise ValueError(
                f"pairing pattern {pattern!r}: cannot read which value of the group (?P<factor>...) is A and which "
                "is B; list two literal values, A's first (e.g. (?P<factor>down|up)), or pass "
                "regex_pairing(pattern, a='down', b='up').")
        a, b = found
    return RegexPairing(pattern, a, b)


peft_pairing = RegexPairing(PEFT_PATTERN, "A", "B")
default_pairing = AnyRule((peft_pairing, RegexPairing(TORCHTUNE_PATTERN, "a", "b"),
                           RegexPairing(KOHYA_PATTERN, "down", "up")))
"""The default rule: PEFT/loralib (``lora_A``/``lora_B``, ``lora_embedding_A``/``_B``), torchtune
(``lora_a``/``lora_b``) and kohya/LyCORIS/musubi (``lora_down``/``lora_up``) names."""


def resolve_pairing(pairing: str | PairingFn | None) -> PairingFn:
    """The pairing rule for ``pairing``: ``None`` → :data:`default_pairing`, a regex → :func:`regex_pairing`
    (values read from the pattern), or the function."""
    if pairing is None:
        return default_pairing
    if isinstance(pairing, str):
        return regex_pairing(pairing)
    if callable(pairing):
        return pairing
    raise ValueError(f"pairing must be None, a regex string or a callable, got {type(pairing).__name__}.")


def lone_factors(names: Sequence[str], pairs: Sequence[tuple[str, str]],
                 rule: AnyRule = default_pairing) -> list[str]:
    """Names that look like a LoRA factor to one of ``rule``'s patterns but were not paired."""
    paired = {n for pair in pairs for n in pair}
    regexes = [(re.compile(r.pattern), (r.a, r.b)) for r in rule.rules]
    return [n for n in names if n not in paired
            and any((m := regex.search(n)) and m.group("factor") in values for regex, values in regexes)]


def stacked_count(A: Tensor, B: Tensor) -> int | None:
    """``k`` when ``(A, B)`` may be k > 1 stacked LoRA pairs (2-D, ``A`` with ``k·r`` rows for ``B``'s r columns: LitGPT's
    ``LoRAQKVLinear``, loralib's ``MergedLinear``; :mod:`sdsopt.blocks`), else ``None``."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] == 0 or A.shape[0] == B.shape[1]:
        return None
    k, rest = divmod(A.shape[0], B.shape[1])
    return k if rest == 0 and k > 1 else None


def merged_layout(A: Tensor, B: Tensor) -> int | None:
    """``k`` when ``(A, B)`` has loralib ``MergedLinear``'s layout (``A``: ``k·r × n``, ``B``: ``k·m′ × r``, k > 1:
    k pairs of equal blocks stacked in one tensor each, applied as a grouped convolution), else ``None``."""
    k = stacked_count(A, B)
    return k if k is not None and B.shape[0] % k == 0 else None


@dataclass(frozen=True)
class LoraPair:
    """A resolved pair: indices into its param group's ``params``, names, and matrix sizes.  A block of stacked
    factors (LitGPT's ``LoRAQKVLinear``, loralib's ``MergedLinear``: :mod:`sdsopt.blocks`) is the pair of rows
    ``rows_a`` of ``params[index_a]`` and rows ``rows_b`` of ``params[index_b]`` (``(start, stop)``), and its names
    say so (``….lora_A[0:8]``); ``None`` for a pair of whole tensors."""

    group: int
    index_a: int
    index_b: int
    name_a: str
    name_b: str
    m: int
    n: int
    r: int
    rows_a: tuple[int, int] | None = None
    rows_b: tuple[int, int] | None = None


def check_pair_shapes(A: Tensor, B: Tensor, name_a: str, name_b: str) -> tuple[int, int, int]:
    """Validate that ``B·A`` chains and return ``(m, n, r)``; raise ``ValueError`` naming both otherwise.

    ``name_a``/``name_b`` are labels as they should appear in messages (already quoted).
    """
    for t, name in ((A, name_a), (B, name_b)):
        if t.dim() < 2:
            raise ValueError(
                f"LoRA factor {name} has shape {tuple(t.shape)}; a factor must be at least 2-D. "
                "Check the pairing (pairing=/lora_pairs=) or leave this parameter unpaired."
            )
        if t.is_complex() or not t.is_floating_point():
            raise ValueError(
                f"LoRA factor {name} has dtype {t.dtype}; SDSAdamW pairs only real floating-point "
                "factors. Leave it unpaired (it then gets plain AdamW) or convert it."
            )
        if t.is_sparse:
            raise ValueError(f"LoRA factor {name} is a sparse tensor; use a dense parameter.")
    r = A.shape[0]
    if B.shape[1] != r or math.prod(B.shape[2:]) != 1:
        raise ValueError(
            f"LoRA pair shapes do not chain: A {name_a} is {tuple(A.shape)} (rank r={r} = dim 0) but "
            f"B {name_b} is {tuple(B.shape)} (needs shape (m, {r}) or (m, {r}, 1, ...)). "
            "Pass pairs as (A, B) in this order and check that both belong to the same adapter."
        )
    if A.device != B.device:
        raise ValueError(f"LoRA pair {name_a} ({A.device}) / {name_b} ({B.device}) spans devices.")
    return B.shape[0], math.prod(A.shape[1:]), r


def a_rows(t: Tensor) -> Tensor:
    """Row form of an A-shaped tensor: ``(r, *rest) → r × prod(rest)`` (a view when contiguous; a 2-D tensor as
    it is, without a dispatched op: per-pair loops call this a few hundred times a step)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def b_matrix(t: Tensor) -> Tensor:
    """Matrix view of a B-shaped tensor: ``(m, r, 1, …) → m × r`` (a 2-D tensor as it is)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], t.shape[1])


def b_rows(t: Tensor) -> Tensor:
    """Row form of a B-shaped tensor: ``(m, r, 1, …) → Bᵀ``, an ``r × m`` view (no copy)."""
    return b_matrix(t).transpose(-2, -1)


def param_label(group: dict[str, Any], index: int, group_index: int) -> str:
    """How errors name parameter ``index`` of param group ``group_index``: its name, or its position."""
    names = group.get("param_names")
    return repr(names[index]) if names else f"params[{index}] of param group {group_index}"
