"""Validation of :class:`sdsopt.SDSAdamW`'s options: a ``ValueError`` that names the option, its value and the fix,
before anything is built (the options of one mode are checked by that mode, :meth:`sdsopt.modes.Mode.validate`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .modes import MODE_CLASSES, MODES, ROUTES, modes_where, validate

__all__ = ["DEFAULT_WARMUP_STEPS", "check_flag", "check_group", "resolve_warmup"]

DEFAULT_WARMUP_STEPS = 10  # mode sds's plain AdamW steps before coordinates (the paper's), without gradient_start

_LINALG_DTYPES = (None, torch.float32, torch.float64)


_YAML_HINT = " (PyYAML, a YAML 1.1 loader, reads 1e-8 as a string: write 1.0e-8, or convert with float())"
_REALS = ("eps", "weight_decay", "step_damping", "damping", "sigma_lr_ratio", "b_lr_ratio")
_BOOLS = ("amsgrad", "maximize", "decouple_sigma", "resplit", "rebalance", "gradient_start")
_INTS = ("warmup_steps", "coordinate_ramp", "oracle_max_numel")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming an option of the wrong type (a string from a config file, a bool for a
    number...) before any comparison can raise a bare ``TypeError``."""
    def fail(key: str, value: Any, want: str) -> None:
        hint = _YAML_HINT if isinstance(value, str) and want.startswith("a number") else ""
        raise ValueError(f"SDSAdamW {where}: {key}={value!r} must be {want}, got {type(value).__name__}{hint}.")

    for key in _REALS:
        if not _is_real(group[key]):
            fail(key, group[key], "a number")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_is_real, betas))):
        fail("betas", betas, "a number pair such as (0.9, 0.999)")
    if group["rank_tol"] is not None and not _is_real(group["rank_tol"]):
        fail("rank_tol", group["rank_tol"], "a number or None")
    for key in _BOOLS:
        if not isinstance(group[key], bool):
            fail(key, group[key], "True or False")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            fail(key, group[key], "True, False or None")
    for key in _INTS:
        if not isinstance(group[key], int) or isinstance(group[key], bool):
            fail(key, group[key], "an int")
    for key in ("mode", "route"):
        if not isinstance(group[key], str):
            fail(key, group[key], "a string")


def check_group(group: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the offending option (``where``: 'defaults' or 'param group i')."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"SDSAdamW {where}: a Tensor lr must be one floating-point number, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}.")
        if not group["fused"]:
            raise ValueError(f"SDSAdamW {where}: a Tensor lr needs fused=True (as torch.optim.AdamW's fused or "
                             "capturable kernels, which read it on the device); pass fused=True or a float lr.")
        lr = float(lr)  # checked once here (a read on the host); the steps never read it
    elif not _is_real(lr):
        raise ValueError(f"SDSAdamW {where}: lr={lr!r} must be a float or a one-element Tensor, got "
                         f"{type(lr).__name__}{_YAML_HINT if isinstance(lr, str) else ''}.")
    _check_types(group, where)
    mode = MODE_CLASSES.get(group["mode"])
    routes = mode.routes if mode is not None else ()
    mode_error = validate(group) if mode is not None else None
    checks = [
        (lr >= 0.0, f"lr={lr} must be >= 0"),
        (group["eps"] >= 0.0, f"eps={group['eps']} must be >= 0"),
        (group["weight_decay"] >= 0.0, f"weight_decay={group['weight_decay']} must be >= 0"),
        (len(group["betas"]) == 2 and all(0.0 <= b < 1.0 for b in group["betas"]),
         f"betas={group['betas']} must be two numbers in [0, 1)"),
        (group["mode"] != "lorsum", "mode='lorsum' is gone since 0.2: LoRSum / PSI-LoRA replaces the factors by "
         "proximal ALS instead of feeding Adam, so it is its own optimizer: sdsopt.PSILoRA(model, lr=..., "
         "lookahead_iters=..., lmbd=...)"),
        (group["mode"] in MODES, f"mode={group['mode']!r} is unknown; choose one of {MODES}"),
        (group["route"] in ROUTES, f"route={group['route']!r} is unknown; choose one of {ROUTES}"),
        (group["linalg_dtype"] in _LINALG_DTYPES,
         f"linalg_dtype={group['linalg_dtype']!r} is unknown; use None, torch.float32 or torch.float64"),
        (group["rank_tol"] is None or 0.0 < group["rank_tol"] < 1.0,
         f"rank_tol={group['rank_tol']} must be None or in (0, 1)"),

        (group["damping"] > 0.0,
         f"damping={group['damping']} must be > 0 (modes {modes_where(lambda c: c.damped)} invert K + damping·I)"),
        (group["b_lr_ratio"] > 0.0 and math.isfinite(group["b_lr_ratio"]),
         f"b_lr_ratio={group['b_lr_ratio']} must be a finite number > 0 (B's step is b_lr_ratio·lr; 1.0: off)"),
        (group["sigma_lr_ratio"] >= 0.0, f"sigma_lr_ratio={group['sigma_lr_ratio']} must be >= 0"),
        (not routes or group["route"] in ("auto", *routes),
         f"route={group['route']!r} does not apply to mode={group['mode']!r}; it takes 'auto' or one of {routes}"),
        (mode_error is None, mode_error),
        (group["warmup_steps"] >= 0, f"warmup_steps={group['warmup_steps']!r} must be an int >= 0"),
        (group["coordinate_ramp"] >= 0, f"coordinate_ramp={group['coordinate_ramp']!r} must be an int >= 0"),
        (group["step_damping"] >= 0.0, f"step_damping={group['step_damping']} must be >= 0"),
        (group["oracle_max_numel"] > 0, f"oracle_max_numel={group['oracle_max_numel']!r} must be a positive int"),
        (not (group["foreach"] and group["fused"]), "foreach=True and fused=True cannot be used together"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"SDSAdamW {where}: {message}.")


def resolve_warmup(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with ``warmup_steps=None`` (the default) made concrete: 0 where the group has ``gradient_start``
    (its start gives ``A`` orthonormal rows, docs/math.md (2.8): no warm-up is needed) or a mode that steps in
    coordinates at once (``sds_muon``, docs/math.md §8), else :data:`DEFAULT_WARMUP_STEPS`."""
    if group.get("warmup_steps", 0) is None:
        name = group.get("mode")
        mode = MODE_CLASSES.get(name) if isinstance(name, str) else None  # (check_group refuses the others)
        at_once = group.get("gradient_start") is True or (mode is not None and mode.coordinates_at_once)
        group["warmup_steps"] = 0 if at_once else DEFAULT_WARMUP_STEPS
    return group


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless the constructor-only option ``name`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"SDSAdamW: {name}={value!r} must be True or False.")
