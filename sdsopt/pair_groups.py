"""A param group's LoRA pairs as :class:`sdsopt.SDSAdamW` resolves them (explicit ``lora_pairs`` and the pairing
rule on the parameters' names), the errors that name what is wrong, and the construction's one message about
what was paired."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from . import pairing as _pairing
from .distributed import check_not_deepspeed, check_pair_layout
from .pairing import PairingFn, check_pair_shapes, param_label

__all__ = ["PairingNotice", "report_pairing", "resolve_group_pairs"]


class PairingNotice(UserWarning):
    """What ``SDSAdamW`` paired when it named parameters given without names (``infer_names``): said once per
    optimizer.  Filter it like any warning: ``warnings.filterwarnings("ignore", category=PairingNotice)``."""


def resolve_group_pairs(gi: int, group: dict[str, Any], explicit: Sequence[Any], names: list[str] | None,
                        rule: PairingFn, earlier: Sequence[tuple[list[Tensor], list[str] | None]],
                        merged_names: set[str]) -> list[tuple[int, int]]:
    """The pairs ``(index_A, index_B)`` of group ``gi`` (``names``: its parameters' names, if any; ``earlier``: the
    params and names of the groups before it).  Factors with loralib MergedLinear's layout are left out (their
    names added to ``merged_names``, with a warning).  Raises ``ValueError`` for a pair split across groups, a
    parameter in two pairs, or shapes that do not chain."""
    params: list[Tensor] = group["params"]
    for i, p in enumerate(params):
        check_not_deepspeed(p, param_label(group, i, gi))
    where = {id(p): i for i, p in enumerate(params)}
    pairs: list[tuple[int, int]] = []
    for k, pair in enumerate(explicit):
        if len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
            raise ValueError(f"param group {gi}: lora_pairs[{k}] must be a tuple of two tensors (A, B).")
        for t, role in zip(pair, "AB"):
            if id(t) not in where:
                other = next((j for j, (ps, _) in enumerate(earlier) if any(p is t for p in ps)), None)
                hint = (f"it is in param group {other}: a pair's two factors must share one group"
                        if other is not None else "add it to this group's 'params'")
                raise ValueError(f"param group {gi}: factor {role} of lora_pairs[{k}] is not in this group's params; {hint}.")
        pairs.append((where[id(pair[0])], where[id(pair[1])]))

    if names:
        index = {n: i for i, n in enumerate(names)}
        explicit_pairs = set(pairs)  # a pair given explicitly and found by name again counts once
        for a, b in rule(names):
            if _merged(params[index[a]], params[index[b]], a, b):
                merged_names.update((a, b))
            elif (index[a], index[b]) not in explicit_pairs:
                pairs.append((index[a], index[b]))
        _check_not_split(gi, names, rule, [ns for _, ns in earlier])

    def label(i: int) -> str:
        return repr(names[i]) if names else param_label(group, i, gi)

    seen: dict[int, int] = {}
    for k, (ia, ib) in enumerate(pairs):
        for i in (ia, ib):
            if i in seen or ia == ib:
                raise ValueError(
                    f"param group {gi}: {param_label(group, i, gi)} is in more than one LoRA pair; "
                    "each factor may belong to one pair only (check explicit lora_pairs and the pairing rule)."
                )
            seen[i] = k
        m, n, r = check_pair_shapes(params[ia], params[ib], label(ia), label(ib))
        check_pair_layout(params[ia], params[ib], label(ia), label(ib))
        if r > m and r > n:
            warnings.warn(
                f"SDSAdamW: LoRA pair {label(ia)} / {label(ib)} has rank r={r} above both its dimensions "
                f"(m={m}, n={n}): A and B may be swapped (A is r×n, the input side; B is m×r). Pass pairs "
                "as (A, B), or fix the pairing rule's order of values (A's first).", UserWarning, stacklevel=4)
    return pairs


def _merged(A: Tensor, B: Tensor, name_a: str, name_b: str) -> bool:
    """Whether a named pair has loralib ``MergedLinear``'s layout (k pairs stacked in each tensor): such a
    pair is left to plain AdamW, with a warning that says so and how to get SDS for it."""
    k = _pairing.merged_layout(A, B)
    if k is not None:
        warnings.warn(
            f"SDSAdamW: {name_a!r} / {name_b!r} have loralib MergedLinear's layout ({k} LoRA pairs of rank "
            f"{B.shape[1]} stacked in each tensor, applied as a grouped convolution); SDSAdamW steps whole "
            "tensors as pairs, so these get plain AdamW. For SDS on them, adapt each projection with its own "
            "loralib.Linear (or PEFT LoRA).", UserWarning, stacklevel=5)
    return k is not None


def _check_not_split(gi: int, names: list[str], rule: PairingFn, earlier: Sequence[list[str] | None]) -> None:
    """Raise if the pairing rule pairs a name of group ``gi`` with a name of an earlier group."""
    owner = {n: j for j, ns in enumerate(earlier) for n in ns or []}
    if not owner:
        return
    mine = set(names)
    for a, b in rule(list(owner) + names):
        if (a in mine) != (b in mine):
            raise ValueError(
                f"LoRA pair {a!r} / {b!r} is split across param groups {owner.get(a, gi)} and "
                f"{owner.get(b, gi)}; put both factors of a pair in the same param group "
                "(group by module, not by factor)."
            )


def report_pairing(names: list[str], pairs: list[tuple[str, str]], rule: PairingFn, merged_names: set[str],
                   names_found: bool, named: bool) -> None:
    """The construction's one message about pairing: lone factors, names found (``names_found``: some group
    came without names and was named from its modules), or no pair at all (``named``: some names existed)."""
    if rule is _pairing.default_pairing:
        lone = [n for n in _pairing.lone_factors(names, pairs) if n not in merged_names]
        if lone:
            warnings.warn(
                f"SDSAdamW: {len(lone)} LoRA factor(s) without their partner get plain AdamW "
                f"(first: {lone[0]!r}). Pass both factors to the optimizer to rewrite them.",
                UserWarning, stacklevel=3,
            )
    if names_found and pairs:
        described = (_pairing.default_pairing.describe(pairs) if rule is _pairing.default_pairing
                     else "the pairing= rule")
        warnings.warn(
            f"SDSAdamW: the parameters came without names; named them from their module and paired "
            f"{len(pairs)} LoRA pair(s) by name ({described}; first: {pairs[0][0]!r} / {pairs[0][1]!r}). "
            "infer_names=False turns this off.", PairingNotice, stacklevel=3)
    if not pairs:
        warnings.warn(
            "SDSAdamW found no LoRA pairs, so it behaves exactly as torch.optim.AdamW. "
            + ("No parameter name matched the pairing rule; pass pairing=... for custom names "
               if named else "The parameters came without names and no module holds them: pass "
               "model.named_parameters() ")
            + "or give explicit pairs: [{'params': [...], 'lora_pairs': [(A, B), ...]}].",
            UserWarning,
            stacklevel=3,
        )
