"""Float32-accurate batched products from TF32 tensor-core passes ("tf32x3"), for the torch path on CUDA.

The torch path's products on the factors — the Grams (docs/math.md (2.1)), the coordinate gradients (2.2) and the
maps back (2.6) — must be float32-accurate (τ of (2.5) assumes float32 rounding).  cuBLAS runs IEEE float32 on
the CUDA cores (~45 TFLOP/s on an H100/H200); TF32 tensor cores run 4–6× faster but keep 10 mantissa bits.
Split each float32 operand exactly into its TF32 part and the rest, ``x = h + l`` (``h``: ``x`` with the 13 low
mantissa bits cleared; ``l = x − h`` is exact and ``|l| ≤ 2⁻¹⁰|x|``), and

    a·b ≈ h_a·h_b + h_a·l_b + l_a·h_b        (the dropped l_a·l_b is ≤ 2⁻²⁰|a||b|)

with each pass on TF32 tensor cores (``l`` rounded to TF32 once more: ≤ 2⁻²⁰|x|), each product within
3·2⁻²⁰ of ``|a||b|`` (float32's unit roundoff is 2⁻²⁴, IEEE's accumulation error already ~2⁻²⁴·√p): float32-level accuracy,
as the fused kernels' ``tf32x3`` (:mod:`sdsopt.kernels`).  A Gram needs two passes: ``X Xᵀ ≈ H Hᵀ + C + Cᵀ``,
``C = H Lᵀ``.  The splits are extra passes over the operands, so whether this beats IEEE depends on the rank:
:func:`for_factors` chooses (measured: benchmarks/RESULTS.md, section "r > 64 on the GPU").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import float32_matmul, gram

__all__ = ["IEEE", "TF32X3", "TF32X3_MIN_RANK", "Products", "for_factors", "gram_x3", "matmul_x3", "tf32_split"]

_LOW_BITS = -8192
"""``0xFFFFE000`` as an int32: keeps sign, exponent and the 10 leading mantissa bits (a TF32 number)."""


def tf32_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, l)`` with ``h`` TF32-representable, ``h + l == x`` exactly (float32 ``x``)."""
    hi = (x.view(torch.int32) & _LOW_BITS).view(torch.float32)
    return hi, x - hi


def matmul_x3(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of float32 batches from three TF32 passes (module docstring)."""
    ah, al = tf32_split(a)
    bh, bl = tf32_split(b)
    with float32_matmul("high"):
        out = ah @ bl
        add = out.baddbmm_ if out.dim() == 3 else out.addmm_
        add(al, bh)
        return add(ah, bh)


def gram_x3(X: Tensor) -> Tensor:
    """``X Xᵀ`` of row-form factors ``[k, r, p]`` from two TF32 passes (module docstring)."""
    h, lo = tf32_split(X)
    with float32_matmul("high"):
        cross = h @ lo.mT
        return (cross + cross.mT).baddbmm_(h, h.mT)


def _add_x3_(X: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``X ← beta·X + alpha·a b`` in place, the product from three TF32 passes."""
    ah, al = tf32_split(a)
    bh, bl = tf32_split(b)
    add = X.baddbmm_ if X.dim() == 3 else X.addmm_
    with float32_matmul("high"):
        add(ah, bh, beta=beta, alpha=alpha)
        add(ah, bl, alpha=alpha)
        return add(al, bh, alpha=alpha)


def _add_(X: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    return (X.baddbmm_ if X.dim() == 3 else X.addmm_)(a, b, beta=beta, alpha=alpha)


class Products(NamedTuple):
    """The three products on the factors, on batches ``[k, …]`` or matrices: ``gram(X) = X Xᵀ``,
    ``matmul(a, b) = a b`` and ``add_(X, a, b, beta, alpha)``: ``X ← beta·X + alpha·a b`` in place."""

    gram: Callable[[Tensor], Tensor]
    matmul: Callable[[Tensor, Tensor], Tensor]
    add_: Callable[..., Tensor]


IEEE = Products(gram, torch.matmul, _add_)
"""cuBLAS's float32 products (IEEE inside the step: :func:`sdsopt.linalg.float32_matmul`), and every CPU product."""
TF32X3 = Products(gram_x3, matmul_x3, _add_x3_)
"""float32-accurate products from TF32 passes (module docstring)."""

TF32X3_MIN_RANK = 128
"""Smallest rank whose CUDA float32 batches take :data:`TF32X3` (below it, IEEE: the skinny products are
memory-bound, and the splits' extra passes cost more than the tensor cores save)."""


def for_factors(X: Tensor, r: int) -> Products:
    """The products for float32 batches like ``X`` of rank ``r``: :data:`TF32X3` on CUDA from
    :data:`TF32X3_MIN_RANK`, else :data:`IEEE` (float64 algebra, CPUs)."""
    if X.is_cuda and X.dtype == torch.float32 and r >= TF32X3_MIN_RANK:
        return TF32X3
    return IEEE
