"""Ablation metrics of docs/math.md §5, as pure functions on matrices (float64 recommended).

* :func:`effective_rank`: ``exp(H(p))``, ``p_i = σ_i / Σ_j σ_j``;
* :func:`alignment`: cosine ``⟨G, ΔW⟩ / (‖G‖ ‖ΔW‖)`` between the full gradient and a weight-space step;
* :func:`captured_fraction`: the fraction of ``‖G‖²`` in the tangent space of the rank-r product at
  ``B A``, ``T = {U M + N Vᵀ}`` (``U = col(B)``, ``V = row(A)``), which is where every first-order
  step ``ΔB A + B ΔA`` lives: ``‖P_T G‖² / ‖G‖²`` with ``P_T G = P_U G + G P_V − P_U G P_V``;
* :func:`condition_number` (on the numerical range) and :func:`stable_rank` ``‖M‖_F² / ‖M‖₂²``;
* :func:`entropy_rank`, :func:`range_condition`: the same two formulas on given singular values, batched (they
  live in the library's :mod:`sdsopt.diagnostics`, which feeds them the singular values of r×r Gram algebra);
* :func:`first_order_step`: ``ΔW = ΔB A + B ΔA``.

:func:`pair_metrics` bundles them for one LoRA pair; the ablation harness records them per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diagnostics import entropy_rank, range_condition

__all__ = [
    "alignment",
    "captured_fraction",
    "condition_number",
    "effective_rank",
    "entropy_rank",
    "first_order_step",
    "pair_metrics",
    "range_condition",
    "stable_rank",
]


def effective_rank(M: Tensor) -> float:
    """``exp(−Σ p_i log p_i)`` with ``p = σ / Σσ`` (1 for a rank-1 matrix, k for k equal singular values)."""
    return float(entropy_rank(torch.linalg.svdvals(M.double())))


def alignment(G: Tensor, step: Tensor) -> float:
    """Cosine between ``G`` and ``step`` (0 when either is 0)."""
    num = (G.double() * step.double()).sum()
    den = G.double().norm() * step.double().norm()
    return float(num / den) if den > 0 else 0.0


def _range_basis(X: Tensor, tol: float = 1e-10) -> Tensor:
    U, S, _ = torch.linalg.svd(X.double(), full_matrices=False)
    keep = S > tol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return U[:, keep]


def captured_fraction(G: Tensor, A: Tensor, B: Tensor) -> float:
    """``‖P_T G‖² / ‖G‖²`` for the tangent space at ``B A`` (A: r×n, B: m×r)."""
    G = G.double()
    U, V = _range_basis(B), _range_basis(A.T)
    PuG = U @ (U.T @ G)
    projected = PuG + (G @ V) @ V.T - (PuG @ V) @ V.T
    total = G.norm() ** 2
    return float(projected.norm() ** 2 / total) if total > 0 else 0.0


def condition_number(X: Tensor, tol: float = 1e-10) -> float:
    """``σ_max / σ_min`` over the numerical range (``σ > tol·σ_max``); ``inf`` for a zero matrix."""
    s = torch.linalg.svdvals(X.double())
    return float(range_condition(s, tol)) if s.numel() else float("inf")


def stable_rank(M: Tensor) -> float:
    """``‖M‖_F² / ‖M‖₂²`` (0 for a zero matrix)."""
    s = torch.linalg.svdvals(M.double())
    return float((s**2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def first_order_step(A: Tensor, B: Tensor, dA: Tensor, dB: Tensor) -> Tensor:
    """``ΔW = ΔB A + B ΔA`` (m×n), the first-order weight-space change of a factor step."""
    return dB.double() @ A.double() + B.double() @ dA.double()


def pair_metrics(A: Tensor, B: Tensor, dA: Tensor, dB: Tensor, G: Tensor | None = None) -> dict[str, float]:
    """§5 metrics of one step of one pair (``A``, ``B`` before the step; ``dA``, ``dB`` the change).

    The alignment is taken with ``−G`` (a descent step aligns positively); ``G`` = ∂L/∂(BA).
    """
    dW = first_order_step(A, B, dA, dB)
    out = {
        "step_effective_rank": effective_rank(dW),
        "step_stable_rank": stable_rank(dW),
        "kappa_A": condition_number(A),
        "kappa_B": condition_number(B),
    }
    if G is not None:
        out["alignment"] = alignment(-G, dW)
        out["captured_fraction"] = captured_fraction(G, A, B)
        out["grad_effective_rank"] = effective_rank(G)
    return out
