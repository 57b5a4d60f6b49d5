"""The harness's modes and the optimizer each one runs.

Modes are :data:`sdsopt.MODES` plus ``sds_sigma`` (``sds_polar`` with the singular-value channel), the peers of
docs/math.md §7 (``lorapro``, an SDSAdamW mode; ``loraplus`` with its ratio λ, or ``loraplus<λ>`` such as
``loraplus4``; ``rite``; ``peft_riemannian``: :mod:`sdsopt.lab.peers`), ``sdsplus<λ>`` (``sds`` with
``b_lr_ratio=λ``, docs/math.md (2.7)), ``sds_muonplus<λ>`` (``sds_muon``, docs/math.md §8, with ``b_lr_ratio=λ``),
``<mode>_gs`` for ``lora``, ``loraplus<λ>``, ``sds`` and ``sdsplus<λ>``
(the same optimizer as SDSAdamW with ``gradient_start=True``, docs/math.md (2.8); ``sds`` then without its
warm-up, ``warmup_steps=0``; ``loraplus<λ>_gs`` is SDSAdamW's ``mode="lora", b_lr_ratio=λ``, LoRA+ bit for bit
plus the start), ``sds_undamped`` (``sds`` with ``step_damping=0``), ``psi``
(:class:`sdsopt.PSILoRA`; ``psi_scaled`` with the diagonal metric), ``sds_layer`` (the paper's re-parameterised
layer, :class:`sdsopt.reference.PaperSDSLayers`, with AdamW) and ``full`` (full fine-tuning with AdamW, the
reference).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..optim import SDSAdamW
from ..psi import PSILoRA
from ..validation import resolve_warmup
from .peers import Chained, is_peer, make_peer

__all__ = ["ABLATION_MODES", "DEFAULT_MODES", "is_mode", "make_optimizer", "needs_capture", "sds_warmup",
           "sdsadamw_kwargs", "warmup_note"]

DEFAULT_MODES = ("full", "lora", "sds", "sds_undamped", "sds_polar", "sds_sigma", "scaled", "sds_layer", "psi",
                 "psi_scaled", "svd_oracle")
ABLATION_MODES = (*DEFAULT_MODES, "sds_muon", "lorapro", "loraplus", "loraplus4", "rite", "peft_riemannian")


def is_mode(name: str) -> bool:
    """Is ``name`` a mode of the harness: one of :data:`ABLATION_MODES`, ``loraplus<λ>``, ``sdsplus<λ>``,
    ``sds_muonplus<λ>`` or a gradient-started ``<mode>_gs``?"""
    return (name in ABLATION_MODES or re.fullmatch(r"(lora|sds|sds_muon)plus\d+(\.\d+)?", name) is not None
            or re.fullmatch(r"(lora|sds)(plus\d+(\.\d+)?)?_gs", name) is not None)


def needs_capture(mode: str) -> bool:
    """Does the run's optimizer need ``opt.attach(model)`` (``svd_oracle``; the gradient-started ``_gs`` modes
    record their first batch themselves: their optimizer is built from the model)?"""
    return mode == "svd_oracle"


def sdsadamw_kwargs(mode: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """SDSAdamW's keyword arguments (all but lr, betas and weight decay) of a mode that SDSAdamW runs, with
    ``options`` (e.g. ``warmup_steps``) on top of the mode's own (``lora`` takes none: an SDS option would not
    change plain AdamW on the factors); None for the modes it does not run (the peers, ``psi``, ``full``,
    ``sds_layer``)."""
    if mode.endswith("_gs"):  # the gradient-aligned start (docs/math.md (2.8)) on SDSAdamW's lora/sds
        base = mode[:-len("_gs")]
        ratio = float(re.sub(r"^(lora|sds)(plus)?", "", base) or 1.0)
        kw = dict(mode="lora" if base.startswith("lora") else "sds", b_lr_ratio=ratio, gradient_start=True)
        if kw["mode"] == "sds":
            kw.update({"warmup_steps": 0, **(options or {})})  # (--opt may set its own)
        return kw
    if is_peer(mode) or mode in ("psi", "psi_scaled", "full", "sds_layer"):
        return None
    kw = {"sds_sigma": dict(mode="sds_polar", decouple_sigma=True),
          "sds_undamped": dict(mode="sds", step_damping=0.0)}.get(mode, dict(mode=mode))
    if (plus := re.fullmatch(r"(sds|sds_muon)plus(.+)", mode)) is not None:  # LoRA+'s ratio on B (docs/math.md (2.7))
        kw = dict(mode=plus[1], b_lr_ratio=float(plus[2]))
    if mode != "lora":
        kw.update(options or {})
    return kw


def sds_warmup(mode: str, options: dict[str, Any] | None = None) -> int | None:
    """The plain-AdamW steps a run of ``mode`` takes before its coordinate steps (mode ``sds`` and its variants:
    ``warmup_steps``, or SDSAdamW's default), ``None`` for a mode without a warm-up."""
    kw = sdsadamw_kwargs(mode, options)
    if not kw or kw.get("mode") != "sds":
        return None
    return int(resolve_warmup({"warmup_steps": None, **kw})["warmup_steps"])


def warmup_note(mode: str, warmup: int | None, steps: int) -> str | None:
    """One line when a run of ``mode`` (``warmup`` steps of plain AdamW, :func:`sds_warmup`) spends all or most of
    its ``steps`` in its warm-up, where it is mode ``lora``'s AdamW: an A/B there compares AdamW with itself."""
    if not warmup or 2 * warmup < steps:
        return None
    fix = f"run more steps (e.g. --steps {max(100, 10 * warmup)}) or --opt warmup_steps=0"
    if warmup >= steps:
        return (f"note: mode {mode} never leaves its warm-up here: its first {warmup} steps are plain AdamW (as "
                f"mode lora's) and the run has {steps}, so it compares AdamW with itself; {fix}")
    return (f"note: mode {mode} spends {warmup} of its {steps} steps in its warm-up (plain AdamW, as mode lora's): "
            f"most of the run compares AdamW with itself; {fix}")


def make_optimizer(mode: str, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   psi: dict[str, Any] | None = None, options: dict[str, Any] | None = None
                   ) -> torch.optim.Optimizer | Chained:
    """The optimizer of one run: a peer of :mod:`sdsopt.lab.peers` (``options``: its own), AdamW for ``full`` and
    ``sds_layer``, :class:`sdsopt.PSILoRA` for ``psi`` (``psi``: its ``lookahead_iters``, ``momentum``,
    ``dampening``, ``lmbd``, ``adam_lr``), else SDSAdamW in ``mode`` (same Adam everywhere) with
    :func:`sdsadamw_kwargs`; the gradient-started ``_gs`` modes get the model (they record its first batch)."""
    kw = sdsadamw_kwargs(mode, options)
    if kw is not None:
        params = model if mode.endswith("_gs") else [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return SDSAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **kw)
    if is_peer(mode):
        return make_peer(mode, model, lr, betas, weight_decay, options)
    if mode in ("psi", "psi_scaled"):
        extra = dict(metric="diagonal") if mode == "psi_scaled" else {}
        return PSILoRA(model, lr=lr, betas=betas, weight_decay=weight_decay, **{**(psi or {}), **extra})
    # full, sds_layer: AdamW (sds_layer on the paper's layer, PaperSDSLayers in the run)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                             weight_decay=weight_decay, foreach=False)
