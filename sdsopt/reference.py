"""The SDS-LoRA paper's re-parameterised layer (docs/math.md (2.0)), as a *reference* for A/B runs and tests.

This is not an optimizer mode: it changes the model's forward.  After a warm-up of plain LoRA
steps, each adapted layer computes

    (2.0)  y = W0 x + s·( sg(Q_B)·A + B·sg(Q_A)ᵀ ) x        Q_B = qr(B).Q (m×r),  Q_A = qr(Aᵀ).Q (n×r)

with the bases ``Q`` held in buffers (stop-gradient), so ``∂L/∂A = s·Q_Bᵀ·G``, ``∂L/∂B = s·G·Q_A`` and
the update between two basis refreshes is linear in ``(A, B)`` (rank ≤ 2r, no ``δB·δA`` term).
Schedule, as read from the paper's authors' training code and a third-party re-implementation:

* ``warmup_steps`` (10) plain LoRA steps; then the function-preserving re-split (the paper's Eq. 8):
  with ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` and ``R_B R_Aᵀ = U Σ Vᵀ``, the bases become ``Q_B U``, ``Q_A V``
  and each branch carries half of the learned update, ``A ← (Σ/2) (Q_A V)ᵀ``, ``B ← Q_B U (Σ/2)``;
  the optimizer's state for ``A`` and ``B`` is cleared;
* the bases are then refreshed from the drifted factors (sign-aligned QR) every 1, 2, …, 5 steps
  over five equal phases of ``total_steps``, skipped while a factor has a row (``A``) or column
  (``B``) of norm ≤ ``guard`` (1e-2).  A refresh is not function-preserving: it moves ``W``.

Use with plain ``torch.optim.AdamW``: build :class:`PaperSDSLayers` on the model, call
:meth:`PaperSDSLayers.after_step` after every ``optimizer.step()``.  Weight decay acts on the two
branches' coefficients, so it shrinks ``ΔW`` by ``(1 − ηλ)`` per step where AdamW on ``B·A`` (and
:class:`sdsopt.SDSAdamW`) shrinks it by ``(1 − ηλ)²``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PaperSDSLayers"]


@dataclass
class _Layer:
    module: nn.Module
    A: nn.Parameter  # r×n (PEFT lora_A weight)
    B: nn.Parameter  # m×r (PEFT lora_B weight)
    scale: float
    q_a: Tensor | None = None  # n×r
    q_b: Tensor | None = None  # m×r


def _aligned_qr(X: Tensor, old: Tensor | None) -> Tensor:
    """``Q`` of the thin QR of ``X`` (float32 or better), columns' signs aligned with ``old``."""
    Q = torch.linalg.qr(X.float() if X.dtype in (torch.float16, torch.bfloat16) else X).Q
    if old is not None:
        signs = torch.sign((Q * old).sum(0))
        Q = Q * torch.where(signs == 0, 1.0, signs)
    return Q


class PaperSDSLayers:
    """Turns every LoRA layer of ``model`` (PEFT ``lora.Linear`` or :class:`sdsopt.lab.tasks.lora.LoraLinear`)
    into the paper's layer (2.0) after the warm-up, and runs its basis schedule.

    Args:
        model: the LoRA model; layers are modules with ``lora_A[adapter]``/``lora_B[adapter]``
            ``nn.Linear`` children, a ``scaling`` (float or per-adapter dict) and a base layer
            (``base`` or ``base_layer``).  Dropout on the LoRA input is not applied.
        total_steps: length of training (the refresh phases are fifths of it).
        warmup_steps, phases, guard: the schedule above (paper: 10, 5, 1e-2).
    """

    def __init__(self, model: nn.Module, total_steps: int, *, warmup_steps: int = 10, phases: int = 5,
                 guard: float = 1e-2, adapter: str = "default") -> None:
        if warmup_steps < 1 or phases < 1 or total_steps < 1:
            raise ValueError("PaperSDSLayers: total_steps, warmup_steps and phases must be >= 1 "
                             "(B = 0 at LoRA's start has no column space, so the layer needs a warm-up).")
        self.total_steps, self.warmup_steps, self.phases, self.guard = total_steps, warmup_steps, phases, guard
        self.steps = 0
        self.layers: list[_Layer] = []
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
                continue
            scaling = module.scaling[adapter] if isinstance(module.scaling, dict) else module.scaling
            layer = _Layer(module, lora_a[adapter].weight, lora_b[adapter].weight, float(scaling))
            module.forward = types.MethodType(self._forward(layer), module)
            self.layers.append(layer)
        if not self.layers:
            raise ValueError(f"PaperSDSLayers: no LoRA layer with adapter {adapter!r} in the model.")

    @staticmethod
    def _forward(layer: _Layer):
        original = layer.module.forward

        def forward(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
            if layer.q_a is None:
                return original(x, *args, **kwargs)
            base = getattr(module, "base_layer", None) or module.base
            q_a, q_b = layer.q_a.to(x.dtype), layer.q_b.to(x.dtype)
            branch_a = nn.functional.linear(nn.functional.linear(x, layer.A), q_b)  # sg(Q_B)·A x
            branch_b = nn.functional.linear(nn.functional.linear(x, q_a.T), layer.B)  # B·sg(Q_A)ᵀ x
            return base(x, *args, **kwargs) + layer.scale * (branch_a + branch_b)

        return forward

    def delta_weight(self, layer: _Layer) -> Tensor:
        """The layer's ``ΔW`` (m×n): ``s·B·A`` in the warm-up, ``s·(Q_B A + B Q_Aᵀ)`` after it."""
        if layer.q_a is None:
            return layer.scale * layer.B @ layer.A
        return layer.scale * (layer.q_b.to(layer.A.dtype) @ layer.A + layer.B @ layer.q_a.to(layer.B.dtype).T)

    @torch.no_grad()
    def activate(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The Eq. 8 re-split: bases from the factors' QRs and the r×r core's SVD, half the update in
        each branch; clears ``optimizer``'s state of the factors."""
        for layer in self.layers:
            Qb, Rb = torch.linalg.qr(layer.B.double())
            Qa, Ra = torch.linalg.qr(layer.A.double().T)
            U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
            layer.q_b, layer.q_a = Qb @ U, Qa @ Vh.T
            layer.A.copy_(((S / 2)[:, None] * layer.q_a.T).to(layer.A.dtype))
            layer.B.copy_((layer.q_b * (S / 2)).to(layer.B.dtype))
            dtype = torch.promote_types(layer.A.dtype, torch.float32)
            layer.q_b, layer.q_a = layer.q_b.to(dtype), layer.q_a.to(dtype)
            if optimizer is not None:
                for p in (layer.A, layer.B):
                    optimizer.state.pop(p, None)

    @torch.no_grad()
    def refresh(self) -> None:
        """Bases from the current factors (sign-aligned QR), except where the guard holds them."""
        for layer in self.layers:
            if layer.A.norm(dim=1).min() <= self.guard or layer.B.norm(dim=0).min() <= self.guard:
                continue
            layer.q_b = _aligned_qr(layer.B, layer.q_b)
            layer.q_a = _aligned_qr(layer.A.T, layer.q_a)

    def refresh_interval(self, step: int) -> int:
        """1, 2, …, ``phases``: the refresh interval in the phase that holds ``step``."""
        return min(self.phases, 1 + (step - 1) * self.phases // self.total_steps)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call after every ``optimizer.step()``: the re-split at the end of the warm-up, then refreshes."""
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.activate(optimizer)
        elif self.steps > self.warmup_steps and (self.steps - self.warmup_steps) % self.refresh_interval(self.steps) == 0:
            self.refresh()
