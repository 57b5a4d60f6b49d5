"""Which parameters form LoRA pairs, and how a pair's tensors are seen as matrices (MATH.md §1).

A *pairing function* maps the list of parameter names of an optimizer to ``(name_A, name_B)``
tuples.  :func:`regex_pairing` builds one from a regular expression with a named group
``factor``: two names pair when they are equal outside that group and the group reads ``a`` in
one and ``b`` in the other.  The default, :data:`PEFT_PATTERN`, covers PEFT's
``…lora_A.<adapter>.weight`` ↔ ``…lora_B.<adapter>.weight`` (Linear, Conv, any adapter name,
several adapters) and ``…lora_embedding_A.<adapter>`` ↔ ``…lora_embedding_B.<adapter>``.

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
    "PEFT_PATTERN",
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
"""PEFT's names: ``lora_A``/``lora_B`` (Linear, Conv, any adapter) and ``lora_embedding_A``/``_B``."""


@dataclass(frozen=True)
class RegexPairing:
    """The pairing function of :func:`regex_pairing` (a class, so that optimizers holding it pickle)."""

    pattern: str
    a: str = "A"
    b: str = "B"

    def __post_init__(self) -> None:
        if "factor" not in re.compile(self.pattern).groupindex:
            raise ValueError(f"pairing pattern {self.pattern!r} needs a named group (?P<factor>...)")

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


def regex_pairing(pattern: str, a: str = "A", b: str = "B") -> PairingFn:
    """Pairing function from a regex with a named group ``factor`` that reads ``a`` or ``b``.

    Example (kohya-style names ``….lora_down.weight`` / ``….lora_up.weight``)::

        regex_pairing(r"\\.lora_(?P<factor>down|up)\\.", a="down", b="up")
    """
    return RegexPairing(pattern, a, b)


peft_pairing: PairingFn = regex_pairing(PEFT_PATTERN)


def resolve_pairing(pairing: str | PairingFn | None) -> PairingFn:
    """The pairing rule for ``pairing``: ``None`` → PEFT names, a regex → :func:`regex_pairing`, or the function."""
    if pairing is None:
        return peft_pairing
    if isinstance(pairing, str):
        return regex_pairing(pairing)
    if callable(pairing):
        return pairing
    raise TypeError(f"pairing must be None, a regex string or a callable, got {type(pairing).__name__}.")


def lone_factors(names: Sequence[str], pairs: Sequence[tuple[str, str]], pattern: str = PEFT_PATTERN) -> list[str]:
    """Names that look like a LoRA factor (``pattern``) but were not paired."""
    paired = {n for pair in pairs for n in pair}
    regex = re.compile(pattern)
    return [n for n in names if n not in paired and regex.search(n)]


@dataclass(frozen=True)
class LoraPair:
    """A resolved pair: indices into its param group's ``params``, names, and matrix sizes."""

    group: int
    index_a: int
    index_b: int
    name_a: str
    name_b: str
    m: int
    n: int
    r: int


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
    """Row form of an A-shaped tensor: ``(r, *rest) → r × prod(rest)`` (a view when contiguous)."""
    return t.reshape(t.shape[0], -1)


def b_matrix(t: Tensor) -> Tensor:
    """Matrix view of a B-shaped tensor: ``(m, r, 1, …) → m × r``."""
    return t.reshape(t.shape[0], t.shape[1])


def b_rows(t: Tensor) -> Tensor:
    """Row form of a B-shaped tensor: ``(m, r, 1, …) → Bᵀ``, an ``r × m`` view (no copy)."""
    return b_matrix(t).transpose(-2, -1)


def param_label(group: dict[str, Any], index: int, group_index: int) -> str:
    """How errors name parameter ``index`` of param group ``group_index``: its name, or its position."""
    names = group.get("param_names")
    return repr(names[index]) if names else f"params[{index}] of param group {group_index}"
