"""Mode ``sds_muon``'s geometry (docs/math.md §8): pure functions on batches of ``k`` factors in row form
``[k, r, d]`` (``A`` as it is, ``r × n``; ``B`` as ``Bᵀ``, ``r × m``), each with its partner's frame ``L^{-1}``
(:func:`sdsopt.coordinates.lower_inverse` of the partner's Gram, docs/math.md (2.1)).

The step of a path is the orthogonalised (Nesterov) momentum of its coordinate gradient (2.2): the momentum is
kept in factor units between steps and carried to the new basis by the partner's motion (8.1), mixed with the
gradient (8.2), orthogonalised through its r×r Gram (8.3) and scaled by the layer's spectral size (8.4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linalg import inv_sqrt_newton_schulz

__all__ = ["MSIGN_MIN_DAMPING", "factor_units", "momentum", "msign", "spectral_scale", "transport"]

MSIGN_MIN_DAMPING = 1e-8
"""Least relative damping of :func:`msign` (float64 algebra, whose τ is 1e-13): the matrix sign raises a direction of
``Y`` with ``σ² = δ‖Y‖_F²`` to 1 together with its rounding error ``~ε/δ``; at 1e-8 that stays ~2e-8, at 1e-13 it
would be ~2e-3 and the step would depend on rounding (measured: (8.5) broke at 1e-5 on 2×2 pairs)."""


def transport(L_inv: Tensor, cross: Tensor, N: Tensor) -> Tensor:
    """(8.1): the stored momentum ``N`` (factor units, formed in the basis of the partner ``P_prev``) in the
    coordinates of the partner's present basis, ``L^{-1} (P P_prevᵀ) N``, with ``cross = P P_prevᵀ`` ``[k, r, r]``
    (summed over shards under FSDP2).  It is the projection of the momentum's weight-space image ``P_prevᵀ N``
    onto the present basis ``Q = Pᵀ L^{-T}``: ``Qᵀ P_prevᵀ N``, without forming ``Q``."""
    return L_inv @ (cross @ N)


def momentum(carried: Tensor, g: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(8.2): ``(M, Y)`` with the new momentum ``M = β·carried + (1 − β)·g`` and the Nesterov look-ahead
    ``Y = β·M + (1 − β)·g`` that is orthogonalised (Muon's default; ``g`` the coordinate gradient (2.2))."""
    M = torch.lerp(g, carried, beta)
    return M, torch.lerp(g, M, beta)


def msign(Y: Tensor, S: Tensor, rank_tol: float) -> Tensor:
    """(8.3): ``(S + δ·trace(S)·I)^{-1/2} Y`` with ``S = Y Yᵀ`` ``[k, r, r]`` (summed over shards under FSDP2),
    ``δ = max(rank_tol, MSIGN_MIN_DAMPING)``,
    by the damped Newton–Schulz root of :func:`sdsopt.linalg.inv_sqrt_newton_schulz` (matmul only, no host
    synchronisation).

    On the numerical range this is ``U Vᵀ`` for ``Y = U Σ Vᵀ``: every singular value of the step is 1.  The
    damping is relative (rotation-invariant, so the map stays equivariant, (8.5)): a direction with
    ``σ² ≪ τ·‖Y‖_F²`` fades out smoothly instead of being raised to 1, and ``Y = 0`` gives 0 (a zero ``B``
    gives a zero step of ``A``, not amplified rounding noise).  A Gram that is not finite gives ``0·Y``: NaN
    where ``Y`` holds a NaN (as AdamW lets a non-finite gradient through), 0 where ``Y`` is finite but its
    Gram overflowed (no Inf from finite input)."""
    finite = S.isfinite().all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    root, _ = inv_sqrt_newton_schulz(torch.where(finite, S, torch.zeros((), dtype=S.dtype, device=S.device)),
                                     max(rank_tol, MSIGN_MIN_DAMPING))
    return torch.where(finite, root @ Y, Y * 0)


def factor_units(L_inv: Tensor, M: Tensor) -> Tensor:
    """(8.1): the momentum ``M`` (coordinates) in factor units ``N = L^{-T} M`` for storage: its weight-space
    image ``Q M = Pᵀ N`` needs no basis, only the partner ``P`` of this step, which is kept beside it."""
    return L_inv.mT @ M


def spectral_scale(m: int, n: int) -> float:
    """(8.4): ``√(m/n)`` for a layer of ``n`` inputs and ``m`` outputs: a step of unit singular values in the
    coordinates, times ``lr·√(m/n)``, is a weight-space step of spectral norm ``s·lr·√(n_out/n_in)``."""
    return math.sqrt(m / n)
