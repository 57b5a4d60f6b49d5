"""The gradient-aligned start (``gradient_start=True``, docs/math.md (2.8)): at a pair's first step, with LoRA's
``B = 0``, the rows of ``A`` become the top-r right singular vectors of the full gradient ``G`` of that step, so
that ``W = W0 + s·B·A`` is unchanged and ``B``'s first gradient ``G·Aᵀ`` holds the top-r part of ``G``.

Pure functions on tensors (:func:`top_right_basis`, :func:`aligned_rows`) and one function the optimizer calls
before its step (:func:`start_pairs`), which reads the recorded ``(X, δ)`` of :class:`sdsopt.capture.LoraCapture`.

Choices the maths leaves open, made here:

* Only pairs whose ``B`` is exactly zero are started (then ``BA = 0`` before and after: the model's function is
  unchanged, no frozen weight needs the correction LoRA-GA applies to ``W0``); a pair with ``B ≠ 0`` keeps its
  factors and a warning names it once.
* The rows' scale: ``A``'s root-mean-square row norm ``‖A‖_F/√r`` (so ``‖A‖_F`` and with it the step sizes the
  user tuned for their init stay as they were); an all-zero ``A`` gets rows of norm ``3^{-1/2}``, what PEFT's
  Kaiming-uniform init gives in expectation.
* The step is not spent on the start: ``B``'s gradient is recomputed at the new ``A`` from the recorded
  ``G``, ``gB = G·Aᵀ`` (exactly the gradient autograd gives at the new ``A``, since the forward is unchanged), and
  the step goes on with it; ``gA = Bᵀ·G`` is zero before and after.
* Under DDP the recorded ``G`` is a rank's own: it is averaged over the default process group (one all-reduce
  per pair on this one step) so every rank starts from the same rows.  Sharded (DTensor) factors are refused.
* A batch whose ``G`` is not finite starts nothing (the step goes on as without the option); the pair starts at
  its next step with a finite ``G``, if it has not been stepped yet.
* ``G``'s SVD is exact (``torch.linalg.svd``, float32 or better), once per pair: where ``G`` has rank below ``r``
  the remaining rows are further right singular vectors of ``G`` (orthonormal, any completion is valid).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .capture import LoraCapture
from .distributed import is_dtensor
from .linalg import algebra_precision

__all__ = ["aligned_rows", "start_pairs", "top_right_basis"]

_DEFAULT_ROW_NORM = 3.0 ** -0.5  # E‖row‖ of PEFT's Kaiming-uniform A (entries U(±n^{-1/2}))


def top_right_basis(G: Tensor, r: int) -> Tensor:
    """The ``r × n`` orthonormal rows spanning ``G``'s top-r right singular subspace (docs/math.md (2.8)), in
    ``G``'s dtype (``r ≤ min(m, n)``)."""
    return torch.linalg.svd(G, full_matrices=False).Vh[:r]


def aligned_rows(A: Tensor, V: Tensor) -> Tensor:
    """(2.8)'s new ``A``: the rows ``V`` scaled to ``A``'s root-mean-square row norm ``‖A‖_F/√r`` (``3^{-1/2}``
    for an all-zero ``A``), in ``V``'s dtype."""
    norm = torch.linalg.vector_norm(A.to(V.dtype)) / math.sqrt(A.shape[0])
    return V * torch.where(norm > 0, norm, torch.full_like(norm, _DEFAULT_ROW_NORM))


def _needs_start(state: MutableMapping[Tensor, dict[str, Any]], A: Tensor, B: Tensor) -> bool:
    """A pair starts at its first step: both factors trainable, with gradients, never stepped."""
    return (A.requires_grad and B.requires_grad and A.grad is not None and B.grad is not None
            and "step" not in state.get(A, {}) and "step" not in state.get(B, {}))


def _full_gradient(capture: LoraCapture, A: Tensor, B: Tensor, dtype: torch.dtype) -> Tensor:
    """The recorded ``G`` (m × n), averaged over the ranks of the default process group under DDP."""
    G = capture.full(A, B, dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(G)
        G /= dist.get_world_size()
    return G


def start_pairs(groups: list[dict[str, Any]], state: MutableMapping[Tensor, dict[str, Any]],
                capture: LoraCapture | None, names: Callable[[int], list[str] | None]) -> None:
    """(2.8) for every pair of a group with ``gradient_start`` at its first step: ``A`` from the recorded ``G``,
    ``B``'s gradient recomputed at the new ``A``.  Raises ``RuntimeError`` (with the fix) when the layers' inputs
    were not recorded; ``names(gi)`` names the parameters of group ``gi`` in the messages (asked only for a pair that
    starts).  Groups without the key (checkpoints from before the option) do not start."""
    for gi, group in enumerate(groups):
        if not group.get("gradient_start", False):
            continue
        params = group["params"]
        for ia, ib in group["lora_pairs"]:
            A, B = params[ia], params[ib]
            if not _needs_start(state, A, B):
                continue
            group_names = names(gi)
            name = group_names[ia] if group_names else f"param group {gi}, params[{ia}]"
            if is_dtensor(A) or is_dtensor(B):
                raise RuntimeError(f"SDSAdamW: gradient_start=True does not support sharded factors ({name!r} is a "
                                   "DTensor shard); start from PEFT's init (gradient_start=False).")
            if capture is None or not capture.has(A):
                raise RuntimeError(
                    f"SDSAdamW: gradient_start=True needs the LoRA layers' inputs and output gradients of the first "
                    f"batch, and none were recorded for {name!r}: call opt.attach(model) once, before the first "
                    "forward pass (PEFT Linear LoRA layers).")
            if A.dim() != 2 or A.shape[0] > min(A.shape[1], B.shape[0]):
                continue  # (r > min(m, n): no r-dimensional top subspace to take; PEFT's init stays)
            if bool(B.detach().ne(0).any()):
                warnings.warn(f"SDSAdamW: gradient_start=True leaves the pair of {name!r} as it is: its B is not "
                              "zero, so a new A would change B·A (the model's function). Start from LoRA's zero B.",
                              stacklevel=3)
                continue
            dt, _ = algebra_precision(A.dtype, group["linalg_dtype"], None, "cholesky")
            G = _full_gradient(capture, A, B, dt)
            if not bool(torch.isfinite(G).all()):
                continue  # (a non-finite batch: the pair starts at its next step, AdamW's semantics for this one)
            new_a = aligned_rows(A.detach(), top_right_basis(G, A.shape[0]))
            A.copy_(new_a.to(A.dtype))
            B.grad.copy_((G @ A.to(dt).T).to(B.grad.dtype))
