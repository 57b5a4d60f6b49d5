"""Mode ``sds``: the LoRA factors in the coordinates of their partner's orthonormal basis (docs/math.md §2).

Pure functions on batches of ``k`` pairs of equal shapes, in natural layout: ``A`` ``[k, r, n]``,
``B`` ``[k, m, r]``.  With the Cholesky factors of the Grams (:func:`sdsopt.linalg.cholesky_lower`)

    (2.1)  K_B = Bᵀ B = R_Bᵀ R_B = L_B L_Bᵀ        K_A = A Aᵀ = R_Aᵀ R_A = L_A L_Aᵀ     (R = Lᵀ)

the thin QRs are ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (``Q`` never formed), and the coordinates
of each factor in its partner's basis, with their gradients (bases held constant), are

    (2.2)  Ã = R_B A          g̃A = R_B^{-T} gA = s·Q_Bᵀ G          A = R_B^{-1} Ã
           B̃ = B R_Aᵀ         g̃B = gB R_A^{-1} = s·G Q_A           B = B̃ R_A^{-T}

so ``Q_B Ã = B̃ Q_Aᵀ = B A``.  Each map is one r×r product per factor.  Adam runs on
``(Ã, g̃A)`` and ``(B̃, g̃B)``; the change it makes is mapped back with :func:`to_factors_` by the r×r
matrix of :func:`factor_map` (``R^{-1}`` with the rank filter of (2.6)), one batched matmul.

The re-split (2.4) at the end of the warm-up, from the r×r core ``C = R_B R_Aᵀ = U Σ Vᵀ``:

    B ← Q_B U D_B = B · (R_B^{-1} U D_B)        A ← D_A Vᵀ Q_Aᵀ = (D_A Vᵀ R_A^{-T}) · A,     D_B D_A = Σ

so ``B' A' = B A`` exactly for any invertible ``R`` (so also for the shifted ones of (2.5)), and
under FSDP2 the maps are r×r matrices applied to local shards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import cholesky_lower, finite_or_zero, trace

__all__ = ["RESPLIT_FLOOR", "balance_scales", "coordinate_gradient", "factor_map", "lower_inverse", "resplit_maps",
           "to_factors_"]

RESPLIT_FLOOR = 1e-3
"""Relative floor of the re-split: ``D_A = diag(√max(σ, floor·σ_max))``, ``D_B = Σ D_A^{-1}``."""


def _solve(L: Tensor, X: Tensor, *, transpose: bool, left: bool) -> Tensor:
    """``L^{-1} X`` / ``L^{-T} X`` (``left``) or ``X L^{-1}`` / ``X L^{-T}`` for lower-triangular ``L``."""
    if transpose:
        return torch.linalg.solve_triangular(L.mT, X, upper=True, left=left)
    return torch.linalg.solve_triangular(L, X, upper=False, left=left)


def coordinate_gradient(L_inv: Tensor, g: Tensor, side: str) -> Tensor:
    """(2.2): the gradient of the coordinates of a factor with gradient ``g``, one batched matmul:
    ``g̃A = L_B^{-1} gA`` (``side='A'``, ``L_inv = L_B^{-1}``) or ``g̃B = gB L_A^{-T}`` (``side='B'``).

    ``L_inv`` from :func:`lower_inverse`: one r×r inverse per factor, then plain bmm, which is faster on GPUs than
    a triangular solve against every r×n block and is shared with :func:`factor_map`.
    """
    return L_inv @ g if side == "A" else g @ L_inv.mT


def lower_inverse(L: Tensor) -> Tensor:
    """``L^{-1}`` of a batch of lower-triangular r×r factors (one batched triangular solve)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)


def factor_map(K_other: Tensor, L_inv: Tensor, step_shift: float = 0.0) -> Tensor:
    """The r×r map back from coordinates, ``M = (K + μ_s I)(K + μI)^{-1} R^{-1}`` (``R = Lᵀ``, ``L Lᵀ = K + μI``,
    ``μ = τ·trace K + μ_s``, ``μ_s`` the step damping), from ``L_inv = L^{-1}`` (:func:`lower_inverse`).

    On a well-conditioned factor ``M = R^{-1}(1 + O(μ/λ_min))``, the exact inverse map of (2.2).
    The filter ``K (K + μI)^{-1}`` of (2.6) is the rank threshold (2.5) for the map back: a Cholesky frame is ``R = O·(K+μI)^{1/2}``
    for some rotation ``O``, which mixes the partner's null directions into every coordinate, so
    Adam's per-coordinate step has components there that ``R^{-1}`` would amplify by ``μ^{-1/2}``
    (the factor would jump by ~1e3–1e6 in directions that do not change ``BA``: ``r > min(m, n)``,
    a collapsed column).  The filter removes them; its gain ``λ (λ+μ)^{-3/2}`` is at most
    ``0.39 μ^{-1/2}``, no more than that of a genuine singular value of size ``√(2μ)``.  With a step
    damping ``μ_s ≫ τ·trace K`` the null directions are not filtered but damped: gain ``≈ μ_s^{-1/2}``.
    ``K = 0`` (the ``R = I`` fallback) gives ``M = I``: a plain AdamW step.
    """
    eye = torch.eye(K_other.shape[-1], dtype=K_other.dtype, device=K_other.device)
    K = finite_or_zero(K_other)
    M = (K + step_shift * eye) @ (L_inv.mT @ L_inv) @ L_inv.mT
    empty = trace(K) <= torch.finfo(K.dtype).tiny
    return torch.where(empty, eye, M)


def to_factors_(X: Tensor, M_other: Tensor, delta: Tensor, side: str, keep: float = 1.0, gain: float = 1.0
                ) -> Tensor:
    """(2.2) backwards, in place: ``X ← keep·X + gain·ΔX`` with the change ``ΔX`` of factor ``X`` for a change
    ``delta`` of its coordinates: ``side='A'``: ``ΔA = M_B ΔÃ`` (≈ ``R_B^{-1} ΔÃ``); ``side='B'``:
    ``ΔB = ΔB̃ M_Aᵀ`` (≈ ``ΔB̃ R_A^{-T}``), with ``M`` from :func:`factor_map`.  One ``baddbmm_`` for a batch
    ``[k, …]``, one ``addmm_`` for one pair's matrices; ``keep``, ``gain`` as in (2.6) (decay, re-balancing)."""
    add = X.baddbmm_ if X.dim() == 3 else X.addmm_
    return add(M_other, delta, beta=keep, alpha=gain) if side == "A" else add(delta, M_other.mT, beta=keep, alpha=gain)


def resplit_maps(K_A: Tensor, K_B: Tensor, rank_tol: float, floor: float = RESPLIT_FLOOR) -> tuple[Tensor, Tensor]:
    """(2.4): r×r maps ``(M_A, M_B)`` with ``A' = M_A A``, ``B' = B M_B`` and ``B' A' = B A``.

    ``K_A``, ``K_B``: the pairs' Grams ``[k, r, r]`` (summed over shards under FSDP2), factored by
    :func:`sdsopt.linalg.cholesky_lower` with relative shift ``rank_tol``.

    ``M_B = R_B^{-1} U D_B`` and ``M_A = D_A Vᵀ R_A^{-T}`` from the SVD of the core ``R_B R_Aᵀ``.
    Directions with ``σ ≥ floor·σ_max`` are balanced (``D_A = D_B = Σ^{1/2}``); weaker ones keep
    ``A``'s part at ``√(floor·σ_max)`` and ``B``'s at ``σ/√(floor·σ_max)`` (``B``'s column is zero
    where ``σ = 0``, as at LoRA's start), so no direction of both factors collapses to zero and
    the pair stays trainable.  Signs: in each column of ``U`` the entry of largest magnitude is positive
    (the SVD leaves them free; without a convention a CPU and a GPU re-split differ by sign flips of
    factor rows/columns, which leave ``BA`` equal but not the factors).  A pair with a zero core (``B A = 0``: a layer that received no
    gradient in the warm-up) is left as it is (identity maps).
    """
    L_A, L_B = cholesky_lower(K_A, rank_tol), cholesky_lower(K_B, rank_tol)
    U, S, Vh = torch.linalg.svd(L_B.mT @ L_A)
    # the SVD fixes each (u_j, v_j) only up to a common sign, and LAPACK and cuSOLVER choose differently: fix it
    # (largest-magnitude entry of u_j positive), so that the re-split factors do not depend on the device
    sign = torch.sign(torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U, Vh = U * sign, Vh * sign.mT
    tiny = torch.finfo(S.dtype).tiny
    zero = (trace(finite_or_zero(K_A)) <= tiny) | (trace(finite_or_zero(K_B)) <= tiny)
    top = S[..., :1]
    d_a = torch.maximum(S, floor * top).clamp_min(tiny).sqrt()
    d_b = S / d_a
    M_B = _solve(L_B, U * d_b[..., None, :], transpose=True, left=True)
    M_A = _solve(L_A, d_a[..., :, None] * Vh, transpose=False, left=False)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    empty = zero | (top <= tiny)[..., None]
    return torch.where(empty, eye, M_A), torch.where(empty, eye, M_B)


def balance_scales(K_A: Tensor, K_B: Tensor) -> tuple[Tensor, Tensor]:
    """``(c, 1/c)`` as ``[k, 1, 1]`` with ``c = (trace K_B / trace K_A)^{1/4} = (‖B‖_F/‖A‖_F)^{1/2}``.

    ``(cA, B/c)`` has equal factor norms and the same ``BA``, coordinates (2.2), coordinate
    gradients and Adam state (all invariant under the scaling, docs/math.md P1).  ``1`` where either
    factor is zero or non-finite.
    """
    t_a, t_b = trace(finite_or_zero(K_A)), trace(finite_or_zero(K_B))
    tiny = torch.finfo(K_A.dtype).tiny
    ok = (t_a > tiny) & (t_b > tiny)
    c = torch.where(ok, (t_b / torch.where(ok, t_a, 1.0)).pow(0.25), 1.0)
    return c, 1.0 / c
