"""A param group's LoRA pairs as :class:`sdsopt.SDSAdamW` resolves them (explicit ``lora_pairs`` and the pairing
rule on the parameters' names), the errors that name what is wrong, the construction's one message about what was
paired, and the first step's check that the parameters were not all frozen since (the optimizer built before the
model was wrapped).

One message per cause, each naming the cause and the fix, and none followed by a second that contradicts it:
every parameter frozen (nothing will train); factors without their partner; stacked factors of a layer that
:mod:`sdsopt.blocks` does not know (warned where found: LitGPT's ``LoRAQKVLinear`` and loralib's ``MergedLinear``
are paired per block); rank-0 pairs (no elements: left unpaired, they step as AdamW); every pair frozen; names found
for unnamed parameters (:class:`PairingNotice`: the trainable pairs found by name, those given in ``lora_pairs``,
the frozen ones not counted); and no LoRA factor at all (the optimizer is AdamW: full fine-tuning, custom names, or
built before ``get_peft_model``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import naming
from . import pairing as _pairing
from .blocks import Block, block_rows, block_spans, direct_owners
from .distributed import check_not_deepspeed, check_pair_layout, is_dtensor
from .pairing import LoraPair, PairingFn, a_rows, check_pair_shapes, param_label

__all__ = ["PairingLog", "PairingNotice", "check_groups_intact", "check_still_trainable", "lora_pairs",
           "report_pairing", "resolve_group_pairs"]

_BUILD_AFTER_WRAP = (
    "build the optimizer from the wrapped model, SDSAdamW(peft_model.parameters(), ...), or let the trainer build "
    "it: Trainer(..., optimizer_cls_and_kwargs=(SDSAdamW, {'lr': ...})) (TRL's SFTTrainer takes the same argument)")


_INTERNAL = (str(Path(__file__).parent), str(Path(torch.__file__).parent))  # (frames _warn skips)


class PairingNotice(UserWarning):
    """What ``SDSAdamW`` paired when it named parameters given without names (``infer_names``): said once per
    optimizer.  Filter it like any warning: ``warnings.filterwarnings("ignore", category=PairingNotice)``."""


@dataclass
class PairingLog:
    """What resolving the groups' pairs leaves for the construction's message (:func:`report_pairing`).

    ``left_out``: names of factors the rule paired but that get plain AdamW (stacked factors of an unknown layer,
    warned where found; rank 0), so that they are not reported as factors without a partner; ``rank_zero``: labels
    ``'A' / 'B'`` of the rank-0 pairs; ``explicit``: ``(group, index_A, index_B)`` of the pairs given in
    ``lora_pairs`` (not reported as found by name)."""

    left_out: set[str] = field(default_factory=set)
    rank_zero: list[str] = field(default_factory=list)
    explicit: set[tuple[int, int, int]] = field(default_factory=set)
    merged: bool = False


def resolve_group_pairs(gi: int, group: dict[str, Any], explicit: Sequence[Any], names: list[str] | None,
                        rule: PairingFn, earlier: Sequence[tuple[list[Tensor], list[str] | None]],
                        log: PairingLog) -> list[tuple[int, int]]:
    """The pairs ``(index_A, index_B)`` of group ``gi`` (``names``: its parameters' names, if any; ``earlier``: the
    params and names of the groups before it), recorded in ``log`` as :class:`PairingLog` says; its stacked factors
    are paired per block and recorded as ``group["lora_blocks"]`` (:mod:`sdsopt.blocks`: ``(index_A, index_B, rows
    of B per block)``; the key only where there are some, so that other groups' state dicts stay as they were).  Left out, so
    that they get plain AdamW: stacked factors of a layer :func:`sdsopt.blocks.block_rows` does not know (with a
    warning here), and rank-0 pairs (``r = 0``: no elements, nothing to rewrite; reported by
    :func:`report_pairing`).  Raises ``ValueError`` for a pair split across groups, a parameter in two pairs, shapes
    that do not chain, or stacked factors that a group's options cannot pair per block."""
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

    blocks: list[Block] = []
    if names:
        index = {n: i for i, n in enumerate(names)}
        explicit_pairs = set(pairs)  # a pair given explicitly and found by name again counts once
        owners: dict[int, torch.nn.Module] | None = None  # (looked up at the first stacked pair)
        for a, b in rule(names):
            A, B = params[index[a]], params[index[b]]
            if _pairing.stacked_count(A, B) is not None:
                owners = direct_owners(params) if owners is None else owners
                if (rows := block_rows(owners.get(id(A)), A, B)) is not None:
                    _check_blocks(gi, group, A, B, repr(a), repr(b), rows)
                    blocks.append((index[a], index[b], rows))
                    continue
            if _merged(A, B, a, b):
                log.left_out.update((a, b))
                log.merged = True
            elif (index[a], index[b]) not in explicit_pairs:
                pairs.append((index[a], index[b]))
        _check_not_split(gi, names, rule, [ns for _, ns in earlier])

    def label(i: int) -> str:
        return repr(names[i]) if names else param_label(group, i, gi)

    given = len(explicit)
    seen: dict[int, int] = {}
    kept: list[tuple[int, int]] = []
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
        if r == 0:  # no elements: AdamW steps them (a no-op but for the step counts), nothing to rewrite
            log.rank_zero.append(f"{label(ia)} / {label(ib)}")
            log.left_out.update(names[i] for i in (ia, ib) if names)
            continue
        kept.append((ia, ib))
        if k < given:
            log.explicit.add((gi, ia, ib))
        if r > m and r > n:
            warnings.warn(
                f"SDSAdamW: LoRA pair {label(ia)} / {label(ib)} has rank r={r} above both its dimensions "
                f"(m={m}, n={n}): A and B may be swapped (A is r×n, the input side; B is m×r). Pass pairs "
                "as (A, B), or fix the pairing rule's order of values (A's first).", UserWarning, stacklevel=4)
    if blocks:
        group["lora_blocks"] = blocks
    return kept


def _check_blocks(gi: int, group: dict[str, Any], A: Tensor, B: Tensor, name_a: str, name_b: str,
                  rows: tuple[int, ...]) -> None:
    """Refuse stacked factors that group ``gi``'s options cannot step per block, naming the fix; check each
    block's views as any pair (:func:`sdsopt.pairing.check_pair_shapes`)."""
    what = f"param group {gi}: {name_a} / {name_b} stack {len(rows)} LoRA pairs (LitGPT LoRAQKVLinear / loralib " \
           "MergedLinear), which SDSAdamW steps per block"
    if is_dtensor(A) or is_dtensor(B):
        raise ValueError(f"{what}, on whole tensors: not as FSDP2 shards. Train this model with DDP, or leave "
                         "this layer out of fully_shard.")
    if group["mode"] == "svd_oracle" or group["gradient_start"]:
        option = "mode='svd_oracle'" if group["mode"] == "svd_oracle" else "gradient_start=True"
        raise ValueError(f"{what}; {option} needs each pair's own layer inputs, which the blocks share in one "
                         "grouped convolution. Use another mode / gradient_start=False for this model.")
    for (a0, a1), (b0, b1) in block_spans(A, rows):
        check_pair_shapes(A[a0:a1], B[b0:b1], f"{name_a}[{a0}:{a1}]", f"{name_b}[{b0}:{b1}]")


def _merged(A: Tensor, B: Tensor, name_a: str, name_b: str) -> bool:
    """Whether a named pair has the layout of k equal pairs stacked in each tensor (loralib ``MergedLinear``'s)
    in a layer :func:`sdsopt.blocks.block_rows` does not know: such a pair is left to plain AdamW, with a
    warning that says so and how to get SDS for it."""
    k = _pairing.merged_layout(A, B)
    if k is not None:
        warnings.warn(
            f"SDSAdamW: {name_a!r} / {name_b!r} have the layout of {k} LoRA pairs of rank {B.shape[1]} stacked in "
            "each tensor (as loralib's MergedLinear and LitGPT's LoRAQKVLinear hold them), but the layer that holds "
            "them is neither (SDSAdamW pairs those per block), so these get plain AdamW. For SDS on them, give the "
            "optimizer the model that holds them, or adapt each projection with its own LoRA layer.",
            UserWarning, stacklevel=5)
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


def report_pairing(param_groups: list[dict[str, Any]], group_names: list[list[str] | None], rule: PairingFn,
                   log: PairingLog, names_found: bool) -> bool:
    """The construction's one message per cause about what will train and what was paired (the module docstring
    lists them; ``group_names``: each group's names, given or found, if any; ``names_found``: some group came
    without names and was named from its modules).  A pair is frozen when both factors are
    (``requires_grad=False``): it stays paired (it takes SDS steps once unfrozen, e.g. by PEFT's ``set_adapter``),
    is not counted as trained and, having no gradient, is not stepped.  Returns whether any parameter is
    trainable: then :func:`check_still_trainable` checks at the first step that they still are."""
    params = [p for g in param_groups for p in g["params"]]
    names = [n for ns in group_names for n in ns or []]
    pairs = [(gi, ia, ib) for gi, g in enumerate(param_groups) for ia, ib in g["lora_pairs"]]
    pairs += [(gi, ia, ib) for gi, g in enumerate(param_groups) for ia, ib, rows in g.get("lora_blocks", ())
              for _ in rows]  # (a block is a pair)

    def label(gi: int, i: int) -> str:
        return _label(param_groups, group_names, gi, i)

    trained = [(gi, ia, ib) for gi, ia, ib in pairs
               if any(param_groups[gi]["params"][i].requires_grad for i in (ia, ib))]
    if not any(p.requires_grad for p in params):
        _warn(f"SDSAdamW: all {len(params)} parameters given are frozen (requires_grad=False)"
              + (f", its {len(pairs)} LoRA pair(s) included" if pairs else "") + ", so nothing will train. If they are "
              "the base weights of a model that PEFT wrapped (peft.get_peft_model or TRL's SFTTrainer(peft_config="
              f"...) freeze them and add the LoRA factors), {_BUILD_AFTER_WRAP}. If the adapters are frozen on "
              "purpose, unfreeze them before training (PEFT: model.set_adapter(name)).")
        return False
    lone = ([n for n in _pairing.lone_factors(names, _pair_names(param_groups, group_names)) if n not in log.left_out]
            if rule is _pairing.default_pairing else [])
    if lone:
        _warn(f"SDSAdamW: {len(lone)} LoRA factor(s) without their partner get plain AdamW (first: {lone[0]!r})"
              + ("; no pair is complete, so SDSAdamW behaves exactly as torch.optim.AdamW" if not pairs else "")
              + ". Pass both factors of each adapter (its lora_A and lora_B) to the optimizer to rewrite them.")
    if log.rank_zero:
        _warn(f"SDSAdamW: {len(log.rank_zero)} LoRA pair(s) of rank 0 (first: {log.rank_zero[0]}) hold no "
              "elements: left unpaired, they get plain AdamW, which leaves them empty. Nothing to fix unless rank 0 "
              "is a mistake (LoraConfig(r=...)).")
    if pairs and not trained:
        _warn(f"SDSAdamW: all {len(pairs)} LoRA pair(s) are frozen (requires_grad=False; first: "
              f"{label(*pairs[0][:2])}): they do not train, and the other trainable parameters get plain AdamW. "
              "Unfreeze the adapter to train it (PEFT: model.set_adapter(name), or requires_grad_(True)).")
    elif names_found and (notice := _found_names_notice(param_groups, group_names, trained, len(pairs) - len(trained),
                                                         rule, log)):
        _warn(notice, PairingNotice)
    if not pairs and not (lone or log.merged or log.rank_zero):
        _warn("SDSAdamW found no LoRA pairs, so it behaves exactly as torch.optim.AdamW. "
              + (f"No parameter name matched the pairing rule (first name: {names[0]!r}). If LoRA adapters are "
                 "added to the model after this (peft.get_peft_model, TRL's SFTTrainer(peft_config=...)), this "
                 "optimizer holds only the base weights, which the wrap freezes, so nothing will train: "
                 f"{_BUILD_AFTER_WRAP}. For LoRA factors of other names pass pairing=... "
                 if names else "The parameters came without names and none was found (no module holds them, or "
                 "infer_names=False): pass model.named_parameters() ")
              + "or give explicit pairs: [{'params': [...], 'lora_pairs': [(A, B), ...]}].")
    return True


def _warn(message: str, category: type[Warning] = UserWarning) -> None:
    """A message attributed to the first caller outside sdsopt and torch (the ``SDSAdamW(...)`` or
    ``opt.step()`` line, or the trainer's that made the call)."""
    frame, level = sys._getframe(1), 2  # (level 1: this function)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _label(param_groups: list[dict[str, Any]], group_names: list[list[str] | None], gi: int, i: int) -> str:
    """How the messages name parameter ``i`` of group ``gi``: its name (given or found), or its position."""
    ns = group_names[gi]
    return repr(ns[i]) if ns else param_label(param_groups[gi], i, gi)


def _pair_names(param_groups: list[dict[str, Any]], group_names: list[list[str] | None]) -> list[tuple[str, str]]:
    """The names ``(A, B)`` of every pair (and stacked factors) of the named groups."""
    return [(ns[ia], ns[ib]) for g, ns in zip(param_groups, group_names) if ns
            for ia, ib, *_ in [*g["lora_pairs"], *g.get("lora_blocks", ())]]


def _found_names_notice(param_groups: list[dict[str, Any]], group_names: list[list[str] | None],
                        trained: list[tuple[int, int, int]], frozen: int, rule: PairingFn, log: PairingLog) -> str:
    """The text of the :class:`PairingNotice` of names found for unnamed parameters: the trainable pairs paired by
    name (by which rule), those given in ``lora_pairs``, and the frozen pairs, not counted; ``""`` when no pair
    was found by name (the pairs given explicitly need no notice)."""
    by_name = [(ns[ia], ns[ib]) for gi, ia, ib in trained
               if (gi, ia, ib) not in log.explicit and (ns := group_names[gi])]
    if not by_name:
        return ""
    described = _pairing.default_pairing.describe(by_name) if rule is _pairing.default_pairing else "the pairing= rule"
    given = len(trained) - len(by_name)
    return (f"SDSAdamW: the parameters came without names; named them from their module and paired {len(by_name)} "
            f"LoRA pair(s) by name ({described}; first: {by_name[0][0]!r} / {by_name[0][1]!r})"
            + (f", and {given} given in lora_pairs" if given else "")
            + (f"; {frozen} frozen pair(s) (requires_grad=False) are not counted: they do not train unless unfrozen"
               if frozen else "") + ". infer_names=False turns this off.")


def check_still_trainable(param_groups: list[dict[str, Any]]) -> None:
    """The first step's check: warn if every parameter of the optimizer is frozen now and none has a gradient,
    although some were trainable when it was built (:func:`report_pairing`): the model was wrapped after the
    optimizer was built (``peft.get_peft_model``, TRL's ``SFTTrainer(peft_config=...)``), which froze the base
    weights this optimizer holds and added LoRA factors it does not.  Names the module that holds them now and the
    first trainable parameter it lacks, if found."""
    params = [p for g in param_groups for p in g["params"]]
    if any(p.requires_grad or p.grad is not None for p in params):
        return
    root = naming.holder(params[0]) if params else None
    mine = {id(p) for p in params}
    missing = [n for n, p in root.named_parameters() if p.requires_grad and id(p) not in mine] if root else []
    found = (f"; the {type(root).__name__} that holds them now trains {len(missing)} parameter(s) this optimizer "
             f"lacks (first: {missing[0]!r})" if missing else "")
    _warn(
        f"SDSAdamW: every one of the {len(params)} parameters this optimizer holds is frozen now "
        "(requires_grad=False), though some were trainable when it was built, so its steps change nothing. The "
        "model was wrapped after the optimizer was built: peft.get_peft_model, or TRL's SFTTrainer(peft_config="
        f"...), freezes the base weights and adds LoRA factors this optimizer does not hold{found}. Fix: "
        f"{_BUILD_AFTER_WRAP}.")


def lora_pairs(param_groups: list[dict[str, Any]], names: Callable[[int], list[str] | None]) -> list[LoraPair]:
    """Every resolved pair of ``param_groups`` (:attr:`sdsopt.SDSAdamW.lora_pairs`), with its group, indices, names
    (``names(gi)``: group ``gi``'s parameter names, or ``None``: ``params[i]``) and ``(m, n, r)``; per group its
    pairs, then the blocks of its stacked factors (their rows in the names and in ``rows_a``/``rows_b``)."""
    out = []
    for gi, group in enumerate(param_groups):
        group_names = names(gi)

        def name(i: int, rows: tuple[int, int] | None) -> str:
            return (group_names[i] if group_names else f"params[{i}]") + (f"[{rows[0]}:{rows[1]}]" if rows else "")

        spans = [(ia, ib, None, None) for ia, ib in group["lora_pairs"]]
        spans += [(ia, ib, ra, rb) for ia, ib, rows in group.get("lora_blocks", ())
                  for ra, rb in block_spans(group["params"][ia], rows)]
        for ia, ib, ra, rb in spans:
            A, B = group["params"][ia], group["params"][ib]
            out.append(LoraPair(
                group=gi, index_a=ia, index_b=ib, name_a=name(ia, ra), name_b=name(ib, rb),
                m=rb[1] - rb[0] if rb else B.shape[0], n=a_rows(A).shape[1], r=ra[1] - ra[0] if ra else A.shape[0],
                rows_a=ra, rows_b=rb,
            ))
    return out


def check_groups_intact(param_groups: list[dict[str, Any]], sizes: list[int]) -> None:
    """Raise ``RuntimeError`` if a param group no longer holds the tensors it was built with (``sizes[gi]`` of them:
    its pairs are indices into them): a wrapper replaced the parameters (DeepSpeed ZeRO flattens them)."""
    for gi, (group, size) in enumerate(zip(param_groups, sizes)):
        if len(group["params"]) != size:
            raise RuntimeError(
                f"SDSAdamW: param group {gi} now holds {len(group['params'])} tensors instead of the {size} it was "
                "built with, so its LoRA pairs are lost. A wrapper replaced the parameters (DeepSpeed ZeRO flattens "
                "them into partitions): SDSAdamW supports DDP and FSDP2, not ZeRO."
            )
