"""Independent float64 references for the tests: SVD-based closed forms, no code shared with sdsopt.

Everything here is computed from the full gradient ``G`` and thin SVDs of the factors, the way docs/math.md
§2 states the method, not from the r×r Grams the package uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

REF_TOL = 1e-14  # relative singular-value cut, as the package's float64 rank_tol (on σ²)


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A rows×cols matrix with orthonormal columns (rows ≥ cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def make_factor(rows: int, cols: int, kappa: float, scale: float, gen: torch.Generator) -> Tensor:
    """rows×cols matrix of rank min(rows, cols), singular values from ``scale`` down to ``scale/kappa``."""
    k = min(rows, cols)
    sigma = scale * kappa ** (-torch.linspace(0, 1, k, dtype=torch.float64))
    return orthonormal(rows, k, gen) @ torch.diag(sigma) @ orthonormal(cols, k, gen).T


def range_svd(X: Tensor, tol: float = REF_TOL) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``X`` restricted to its numerical range (σ² > tol·σ_max²)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = S**2 > tol * S[0] ** 2 if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return U[:, keep], S[keep], Vh[keep]


def polar(X: Tensor) -> Tensor:
    """Ω = U Vᵀ of the thin SVD of X (on its numerical range)."""
    U, _, Vh = range_svd(X)
    return U @ Vh


def lora_grads(A: Tensor, B: Tensor, G: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(1.1): gA = s Bᵀ G, gB = s G Aᵀ."""
    return s * B.T @ G, s * G @ A.T


def sds_reference(A: Tensor, B: Tensor, G: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(2.2) from the full gradient: g̃A = s Ω_Bᵀ G, g̃B = s G Ω_Aᵀ."""
    return s * polar(B).T @ G, s * G @ polar(A).T


def scaled_reference(A: Tensor, B: Tensor, G: Tensor, s: float, delta: float) -> tuple[Tensor, Tensor]:
    """Riemannian preconditioning: g̃A = (BᵀB + δI)^{-1} gA, g̃B = gB (AAᵀ + δI)^{-1} (linear solves)."""
    gA, gB = lora_grads(A, B, G, s)
    r = A.shape[0]
    eye = torch.eye(r, dtype=A.dtype)
    return torch.linalg.solve(B.T @ B + delta * eye, gA), torch.linalg.solve(A @ A.T + delta * eye, gB.T).T


def sigma_split_reference(X: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(2.3) for a factor X (r×p, either orientation handled by the caller) by full SVD.

    Returns (gσ over the range, basis part, U, Vh) with X = U diag(σ) Vh.
    """
    U, _, Vh = range_svd(X)
    g_sigma = torch.diagonal(U.T @ G @ Vh.T)
    return g_sigma, G - U @ torch.diag(g_sigma) @ Vh, U, Vh


def proximal_ls_right(X: Tensor, W: Tensor, anchor: Tensor, lam: float) -> Tensor:
    """argmin_Y ‖Y X − W‖² + λ‖Y − anchor‖² by least squares on the stacked system."""
    r = X.shape[0]
    lhs = torch.cat([X.T, lam**0.5 * torch.eye(r, dtype=X.dtype)])
    rhs = torch.cat([W.T, lam**0.5 * anchor.T])
    return torch.linalg.lstsq(lhs, rhs).solution.T


def psi_reference(A: Tensor, B: Tensor, W: Tensor, lam: float, sweeps: int) -> tuple[Tensor, Tensor]:
    """Proximal ALS towards W (PSI-LoRA's order: sweeps = 0 one Jacobi pass, else Gauss–Seidel with A first),
    each half-sweep by least squares on the stacked system; returns (A_K, B_K)."""
    if sweeps == 0:
        return proximal_ls_right(B.T, W.T, A.T, lam).T, proximal_ls_right(A, W, B, lam)
    A_k, B_k = A, B
    for _ in range(sweeps):
        A_k = proximal_ls_right(B_k.T, W.T, A.T, lam).T
        B_k = proximal_ls_right(A_k, W, B, lam)
    return A_k, B_k


def truncated(W: Tensor, r: int) -> Tensor:
    """Best rank-r approximation (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def qr_basis(X: Tensor) -> tuple[Tensor, Tensor]:
    """The thin QR ``X = Q R`` with ``diag R > 0`` (the basis whose ``R`` is the Cholesky factor of ``XᵀX``)."""
    Q, R = torch.linalg.qr(X)
    sign = torch.sign(torch.diagonal(R))
    return Q * sign, sign[:, None] * R


def sds_muon_reference(A: Tensor, B: Tensor, grad_w, s: float, lr: float, beta: float, ratio: float,
                       steps: int) -> list[tuple[Tensor, Tensor]]:
    """docs/math.md §8 from explicit QR bases and SVD matrix signs: per step ``G = grad_w(s·B·A)``, the
    coordinate gradients ``s·Q_Bᵀ G``, ``s·G Q_A``, the momenta carried by ``Q_newᵀ Q_old``, Nesterov, ``U Vᵀ``,
    the step ``−lr·√(m/n)`` (``·ratio`` on B) mapped back by ``R^{-1}``.  Returns the factors after each step."""
    m, n = B.shape[0], A.shape[1]
    c = (m / n) ** 0.5
    M_A, M_B, old_B, old_A = torch.zeros_like(A), torch.zeros_like(B), None, None
    out = []
    for _ in range(steps):
        G = grad_w(s * B @ A)
        Q_B, R_B = qr_basis(B)
        Q_A, R_A = qr_basis(A.T)
        g_a, g_b = s * Q_B.T @ G, s * G @ Q_A
        carried_a = M_A if old_B is None else Q_B.T @ old_B @ M_A
        carried_b = M_B if old_A is None else M_B @ old_A.T @ Q_A
        M_A, M_B = beta * carried_a + (1 - beta) * g_a, beta * carried_b + (1 - beta) * g_b
        u_a = polar(beta * M_A + (1 - beta) * g_a)
        u_b = polar(beta * M_B + (1 - beta) * g_b)
        A = A + torch.linalg.solve(R_B, -lr * c * u_a)
        B = B + (-ratio * lr * c * u_b) @ torch.linalg.inv(R_A).T
        old_B, old_A = Q_B, Q_A
        out.append((A.clone(), B.clone()))
    return out
