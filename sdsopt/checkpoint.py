"""Checks that an optimizer checkpoint fits the optimizer loading it, before anything is changed.

``torch.optim.Optimizer.load_state_dict`` maps saved state onto parameters by position and checks only the
number of parameters per group; a checkpoint of another model, LoRA rank or pairing loads silently and fails
steps later with a bare size mismatch.  :func:`check_state_dict` raises a ``ValueError`` naming the parameter
and the fix instead (used by :class:`sdsopt.SDSAdamW` and :class:`sdsopt.PSILoRA`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .pairing import param_label

__all__ = ["check_modes", "check_state_dict"]

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
