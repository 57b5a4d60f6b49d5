"""Checks that an optimizer checkpoint fits the optimizer loading it, before anything is changed.

``torch.optim.Optimizer.load_state_dict`` maps saved state onto parameters by position and checks only the
number of parameters per group; a checkpoint of another model, LoRA rank or pairing loads silently and fails
steps later with a bare size mismatch.  :func:`check_state_dict` raises a ``ValueError`` naming the parameter
and the fix instead (used by :class:`sdsopt.SDSAdamW` and :class:`sdsopt.PSILoRA`).  :func:`from_adamw` lets
``SDSAdamW`` resume a ``torch.optim.AdamW`` checkpoint where the mathematics allows it (switching mid-run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .pairing import param_label

__all__ = ["ADAMW_MODES", "check_modes", "check_state_dict", "checked_sds", "from_adamw"]

ADAMW_MODES = ("sds", "lora")
"""The modes whose pairs can resume ``torch.optim.AdamW``'s moments: those of the plain factors' gradients, which
mode ``lora`` keeps throughout and mode ``sds`` during its warm-up."""
_ADAMW_ONLY = ("capturable", "differentiable", "decoupled_weight_decay", "foreach", "fused")
"""Options of an AdamW param group that ``from_adamw`` does not carry over: how AdamW ran, not where training
is (``foreach``/``fused`` stay this optimizer's)."""

ExpectedShape = Callable[[int, int, str], "tuple[int, ...] | None"]


def check_state_dict(where: str, state_dict: Any, param_groups: list[dict[str, Any]],
                     expected_shape: ExpectedShape) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has this optimizer's param groups, LoRA pairs and parameter
    counts, and every state tensor has the shape ``expected_shape(group index, param index, key)`` gives
    (``None``: any shape; scalars such as step counts are not checked).  ``where`` prefixes the messages."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{where}: expected an optimizer state dict with 'state' and 'param_groups' "
                         "(what the optimizer's state_dict() returns).")
    saved = state_dict["param_groups"]
    if len(saved) != len(param_groups):
        raise ValueError(f"{where}: the checkpoint has {len(saved)} param group(s), this optimizer "
                         f"{len(param_groups)}; build it with the same param groups as the one that was saved.")
    for gi, (mine, theirs) in enumerate(zip(param_groups, saved)):
        ours = [tuple(p) for p in mine["lora_pairs"]]
        other = [tuple(p) for p in theirs.get("lora_pairs", [])]
        if ours != other:
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint has LoRA pairs {other[:3]}... "
                f"but this optimizer has {ours[:3]}...; build the optimizer from the same model and "
                "parameter order (and pairing rule) as the one that was saved."
            )
        ours, other = ([(a, b, tuple(rows)) for a, b, rows in g.get("lora_blocks", ())] for g in (mine, theirs))
        if ours != other:
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint has stacked LoRA factors {other[:3]} (index of A, "
                f"of B, rows of B per block) but this optimizer has {ours[:3]}; build the optimizer from the same "
                "model (LoRA layers and rank) as the one that was saved."
            )
        if len(theirs["params"]) != len(mine["params"]):
            raise ValueError(f"{where}: param group {gi} of the checkpoint holds {len(theirs['params'])} "
                             f"parameters, this optimizer's {len(mine['params'])}; build the optimizer from the "
                             "same model and parameter order as the one that was saved.")
        for i, (pid, p) in enumerate(zip(theirs["params"], mine["params"])):
            for key, value in state_dict["state"].get(pid, {}).items():
                want = expected_shape(gi, i, key)
                if want is not None and isinstance(value, Tensor) and tuple(value.shape) != tuple(want):
                    raise ValueError(
                        f"{where}: {param_label(mine, i, gi)} is {tuple(p.shape)} but the checkpoint's "
                        f"{key} for it is {tuple(value.shape)}, not {tuple(want)} (LoRA rank, model or options "
                        "changed?); build the model and optimizer as they were saved, or start the optimizer state "
                        "afresh."
                    )


def check_modes(where: str, state_dict: Any, param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` if a param group of the checkpoint ran another mode than this optimizer's (its Adam
    moments are of other gradients or coordinates), or is sdsopt 0.1's ``sds`` (moments of the plain factors)."""
    for gi, (mine, theirs) in enumerate(zip(param_groups, state_dict["param_groups"])):
        if theirs.get("mode") == "sds" and "warmup_steps" not in theirs and state_dict["state"]:
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint was written by sdsopt 0.1, whose "
                "mode 'sds' kept Adam moments of the plain factors. Since 0.2, 'sds' runs Adam in the bases' "
                "coordinates and those moments do not apply. Resume with mode='sds_polar' (0.1's 'sds' under "
                "its new name) and rewrite the checkpoint's param_groups[i]['mode'] to 'sds_polar', or start "
                "the optimizer state afresh with mode='sds'."
            )
        if theirs.get("mode", mine["mode"]) != mine["mode"]:
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint ran mode={theirs['mode']!r}, this optimizer "
                f"mode={mine['mode']!r}; its Adam moments are of other gradients (or other coordinates). "
                f"Resume with mode={theirs['mode']!r}, or switch modes by loading only the model's "
                "weights and starting the optimizer state afresh."
            )


def checked_sds(where: str, state_dict: Any, param_groups: list[dict[str, Any]]) -> Any:
    """``state_dict`` ready for :meth:`sdsopt.SDSAdamW.load_state_dict`: an AdamW checkpoint converted
    (:func:`from_adamw`), then checked (:func:`check_state_dict`, Adam's moments shaped as their parameters, and
    :func:`check_modes`); raises ``ValueError`` before anything is changed."""
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "muon_prev")
    state_dict = from_adamw(where, state_dict, param_groups)
    check_state_dict(where, state_dict, param_groups,
                     lambda gi, i, key: param_groups[gi]["params"][i].shape if key in moments else None)
    check_modes(where, state_dict, param_groups)
    return state_dict


def _is_adamw(state_dict: Any) -> bool:
    """Whether ``state_dict`` looks like ``torch.optim.AdamW``'s (or another optimizer's): param groups, none of
    which carries sdsopt's ``lora_pairs`` or ``mode``."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    return (isinstance(groups, list) and bool(groups) and isinstance(state_dict.get("state"), dict)
            and all(isinstance(g, dict) and "lora_pairs" not in g and "mode" not in g for g in groups))


def from_adamw(where: str, state_dict: Any, param_groups: list[dict[str, Any]]) -> Any:
    """``state_dict`` as :class:`sdsopt.SDSAdamW` state when it is ``torch.optim.AdamW``'s, else unchanged.

    The param groups keep the checkpoint's AdamW settings (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``amsgrad``, ``maximize`` and any other key, e.g. a scheduler's ``initial_lr``) and take this optimizer's
    sdsopt options, pairs and ``foreach``/``fused``.  AdamW's moments are those of the plain factors, so:

    * parameters outside pairs, and pairs in mode ``lora``, resume as they are (AdamW bit for bit);
    * pairs in mode ``sds`` (``warmup_steps = w``) that AdamW stepped ``k`` times (the larger of the factors'
      counts) resume in the warm-up at count ``min(k, w − 1)``: for ``k < w`` that is the state an uninterrupted
      ``SDSAdamW`` run has after ``k`` steps (its warm-up is AdamW), so the run continues it bit for bit; for
      ``k ≥ w`` the next step is the AdamW step the AdamW run would have taken, and ends the warm-up (re-split,
      Adam state reset), since moments of the plain factors do not apply in coordinates.  With ``w = 0`` the
      pair's state is dropped: it starts in coordinates with fresh moments, as every pair does after its warm-up;
    * pairs in the other modes, if AdamW stepped them, raise ``ValueError``: their Adam runs on rewritten
      gradients (``sds_polar``, ``scaled``, ``lorapro``) or on ``W = BA`` (``svd_oracle``), whose moments are
      not AdamW's.

    Raises ``ValueError`` for a ``torch.optim.Adam`` checkpoint with (coupled, L2) ``weight_decay``.  Group and
    parameter counts and shapes are left to :func:`check_state_dict`.
    """
    if not _is_adamw(state_dict) or len(state_dict["param_groups"]) != len(param_groups):
        return state_dict
    state = dict(state_dict["state"])
    groups = []
    for gi, (mine, theirs) in enumerate(zip(param_groups, state_dict["param_groups"])):
        if not theirs.get("decoupled_weight_decay", True) and theirs.get("weight_decay", 0):
            raise ValueError(
                f"{where}: param group {gi} of the checkpoint is torch.optim.Adam's with weight_decay="
                f"{theirs['weight_decay']} (added to the gradient), not AdamW's decoupled decay; SDSAdamW continues "
                "AdamW only. Resume with torch.optim.Adam, or start this optimizer's state afresh.")
        group = {k: v for k, v in theirs.items() if k not in _ADAMW_ONLY}
        groups.append({**{k: v for k, v in mine.items() if k != "params"}, **group})
        if len(theirs["params"]) == len(mine["params"]):  # (else check_state_dict says so)
            _pairs_from_adamw(where, gi, mine, theirs["params"], state)
    return {**state_dict, "state": state, "param_groups": groups}


def _pairs_from_adamw(where: str, gi: int, group: dict[str, Any], ids: list[Any], state: dict[Any, Any]) -> None:
    """:func:`from_adamw` for the pairs of group ``gi`` (``ids``: the checkpoint's ids of its parameters), in
    ``state`` (a copy of the checkpoint's; the entries changed are replaced, not mutated)."""
    for ia, ib in group["lora_pairs"]:
        pair = [ids[ia], ids[ib]]
        steps = [int(state[i]["step"]) for i in pair if "step" in state.get(i, {})]
        if not steps:
            continue  # never stepped: it starts as in a fresh optimizer
        if group["mode"] not in ADAMW_MODES:
            raise ValueError(
                f"{where}: param group {gi}: the checkpoint is torch.optim.AdamW's, whose moments are of the plain "
                f"factors' gradients, but mode={group['mode']!r} runs Adam on other gradients (rewritten, or of "
                f"W = BA), so they do not apply to LoRA pair {param_label(group, ia, gi)} / "
                f"{param_label(group, ib, gi)}. Resume with mode='sds' (its warm-up is AdamW) or mode='lora', or "
                "load only the model's weights and start this optimizer's state afresh.")
        if group["mode"] != "sds":
            continue
        if group["warmup_steps"] == 0:
            for i in pair:
                state.pop(i, None)
            continue
        count = min(max(steps), group["warmup_steps"] - 1)
        for i in pair:
            state[i] = {**state.get(i, {}), "sds_warmup": count}
