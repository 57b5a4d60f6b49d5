"""Linear algebra on batches of small LoRA factors (MATH.md §2.1, §2.5).

Every factor is handled in *row form*: an ``r × p`` matrix ``X`` whose rows span the factor's
r-dimensional subspace.  ``A`` (``r × n``) is already in row form; ``B`` (``m × r``) enters as
``Bᵀ``.  Both Gram matrices of MATH (2.1) are then ``K = X Xᵀ`` (``K_A = A Aᵀ``, ``K_B = Bᵀ B``),
so one formula serves both factors.

Functions take batches ``[k, r, p]`` (k factors of equal shape) and return batches; there is no
per-factor Python loop.  All of them are pure: no optimizer state, no in-place change of inputs.

Scale normalisation.  Before forming ``K`` each factor is divided by ``c = max|X|`` (1 for a zero
factor).  ``K̂ = K / c²`` then has ``λ̂_max ≥ 1`` whenever ``X ≠ 0``, which keeps the Gram finite for
factors with entries near the float32 range limits and makes the rank threshold of (2.5) purely
relative.  Spectral functions are evaluated on ``λ̂`` and rescaled analytically.

Rank threshold (2.5).  Eigenvalues with ``λ̂ ≤ τ·λ̂_max``, or whose true value ``c² λ̂`` is not
above the dtype's ``tiny`` (the absolute floor: it makes ``K = 0`` rank 0 and keeps every ``1/σ``
finite), are outside the numerical range.  The default
``τ`` depends on the dtype the algebra runs in: 1e-6 in float32 (≈ 8 ε; as MATH suggests) and
1e-14 in float64 (≈ 45 ε, so that factors with condition numbers up to 1e6, Gram condition
1e12, stay inside the range).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RANK_TOL",
    "Spectrum",
    "algebra_precision",
    "default_rank_tol",
    "gram_spectrum",
    "inv_sqrt",
    "inv_sqrt_newton_schulz",
    "normalise",
    "spectral_apply",
]

DEFAULT_RANK_TOL: dict[torch.dtype, float] = {torch.float32: 1e-6, torch.float64: 1e-14}


def default_rank_tol(dtype: torch.dtype) -> float:
    """τ of MATH (2.5) for linear algebra carried out in ``dtype`` (float32 or float64)."""
    return DEFAULT_RANK_TOL[dtype]


def algebra_precision(
    param_dtype: torch.dtype, linalg_dtype: torch.dtype | None, rank_tol: float | None
) -> tuple[torch.dtype, float]:
    """``(dtype, τ)`` for the r×r algebra: float32 at least (float64 for float64 parameters or on request)."""
    dtype = linalg_dtype or (torch.float64 if param_dtype == torch.float64 else torch.float32)
    return dtype, rank_tol if rank_tol is not None else default_rank_tol(dtype)


def normalise(X: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(X / c, c)`` with ``c = max|X|`` per batch item (``c = 1`` where ``X = 0``).

    Non-finite items get ``c = 1`` too; their Gram is then caught by :func:`gram_spectrum`.
    """
    c = X.abs().amax(dim=(-2, -1), keepdim=True)
    c = torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))
    return X / c, c


@dataclass(frozen=True)
class Spectrum:
    """Eigendecomposition of the normalised Gram ``K̂ = X̂ X̂ᵀ = U diag(λ̂) Uᵀ`` of a batch of factors.

    Attributes:
        U: ``[k, r, r]`` orthonormal eigenvectors (columns).
        lam: ``[k, r]`` eigenvalues of ``K̂``, ascending, clamped at 0.
        in_range: ``[k, r]`` bool, the numerical range of (2.5).
        scale: ``[k, 1, 1]`` the normalisation ``c``; true Gram eigenvalues are ``c² λ̂``,
            true singular values of the factor are ``c √λ̂``.
    """

    U: Tensor
    lam: Tensor
    in_range: Tensor
    scale: Tensor

    def select(self, index: Tensor) -> Spectrum:
        """The spectra of batch items ``index`` (a 1-D index tensor)."""
        return Spectrum(self.U[index], self.lam[index], self.in_range[index], self.scale[index])


def _eigh(K: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` that never raises on finite symmetric input.

    LAPACK/cuSOLVER can report non-convergence for badly clustered spectra in float32; the batch
    is then redone in float64, and if that fails too (not observed in practice) the spectrum is
    treated as empty (rank 0: the rewrite then passes no gradient for these factors) with a warning.
    """
    try:
        return torch.linalg.eigh(K)
    except torch.linalg.LinAlgError:
        pass
    try:
        lam, U = torch.linalg.eigh(K.double())
        return lam.to(K.dtype), U.to(K.dtype)
    except torch.linalg.LinAlgError as err:
        warnings.warn(
            f"sdsopt: eigh did not converge even in float64 ({err}); the affected LoRA factors are "
            "treated as rank 0 for this step (no gradient passes).",
            RuntimeWarning,
            stacklevel=3,
        )
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device).expand_as(K)
        return torch.zeros(K.shape[:-1], dtype=K.dtype, device=K.device), eye.clone()


def _normalised_gram(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(K̂, c)`` with ``K̂ = (X/c)(X/c)ᵀ``; a non-finite factor gets ``K̂ = 0`` (rank 0, no exception)."""
    Xn, c = normalise(X)
    K = Xn @ Xn.transpose(-2, -1)
    finite = torch.isfinite(K).all(dim=-1).all(dim=-1)[:, None, None]
    return torch.where(finite, K, torch.zeros_like(K)), c


def _absolute_floor(c: Tensor, dtype: torch.dtype) -> Tensor:
    """Floor on ``λ̂`` such that the true ``λ = c² λ̂`` exceeds the dtype's ``tiny``.

    Keeps ``1/σ ≤ 1/√tiny`` (≈ 1e19 in float32) so that no inverse overflows; ``c²`` underflowing
    to 0 makes the floor infinite (the factor counts as 0), ``c²`` overflowing makes it 0.
    """
    return torch.finfo(dtype).tiny / (c * c)


def gram_spectrum(X: Tensor, rank_tol: float) -> Spectrum:
    """Spectrum of ``K = X Xᵀ`` for a batch ``X`` of row-form factors ``[k, r, p]`` (MATH 2.1, 2.5).

    ``X`` must already be in the dtype the algebra should run in.
    """
    K, c = _normalised_gram(X)
    lam, U = _eigh(K)
    lam = lam.clamp_min(0.0)
    lam_max = lam[..., -1:]
    in_range = (lam > rank_tol * lam_max) & (lam > _absolute_floor(c.squeeze(-1), lam.dtype))
    return Spectrum(U=U, lam=lam, in_range=in_range, scale=c)


def spectral_apply(spec: Spectrum, f_diag: Tensor, G: Tensor) -> Tensor:
    """``U diag(f) Uᵀ G`` for batches: ``f_diag`` ``[k, r]``, ``G`` ``[k, r, q]``."""
    U = spec.U
    return U @ (f_diag.unsqueeze(-1) * (U.transpose(-2, -1) @ G))


def inv_sqrt(spec: Spectrum) -> Tensor:
    """``[k, r]`` eigenvalues of ``K^{-1/2}`` on the numerical range, 0 off it (MATH 2.1, 2.5).

    With ``K = c² K̂``: ``K^{-1/2} = U diag(λ̂^{-1/2} / c) Uᵀ``.  These are also the pseudo-inverse
    singular values ``1/σ`` of the factor, which the singular-value channel (2.3) uses.
    """
    root = spec.lam.sqrt() * spec.scale.squeeze(-1)
    return torch.where(spec.in_range, 1.0 / torch.where(spec.in_range, root, 1.0), 0.0)


def inv_sqrt_newton_schulz(
    X: Tensor, rank_tol: float, iters: int | None = None, residual_tol: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Matmul-only damped ``K^{-1/2}`` for ``K = X Xᵀ`` by the coupled Newton–Schulz iteration (MATH 2.2).

    With ``K̂ = K / (c² t)`` (``t = trace K̂ ≥ λ̂_max``, so the spectrum lies in ``[0, 1]``) and
    ``M = (K̂ + δI)/(1 + δ)``, ``δ = τ``, the iteration ``T = (3I − Z Y)/2, Y ← Y T, Z ← T Z`` from
    ``Y = M, Z = I`` converges to ``Z = M^{-1/2}`` (Higham, *Functions of Matrices*, §6.3; stable in
    its coupled form).  Returned is ``P = (K̂ + δI)^{-1/2} / (c √t)``, i.e. the spectral function
    ``f(λ̂) = (λ̂ + δ)^{-1/2}`` in place of the eigh route's hard cut of (2.5):

    * on the range (``λ̂ ≫ δ``) ``f = λ̂^{-1/2} (1 − δ/(2λ̂) + …)``;
    * a direction of the factor contributes ``f(λ̂)·√λ̂ = (λ̂/(λ̂+δ))^{1/2} ≤ 1`` to the rewritten
      gradient, so weak directions fade out smoothly instead of being cut, and nothing is amplified
      past isotropy.  ``K = 0`` gives a finite ``P`` (the partner's gradient is then exactly 0).

    A damped root is used rather than a filtered pseudo-inverse (``K̂ Z³`` etc.) because products
    with ``Z ~ δ^{-1/2}`` amplify rounding noise of ``K̂``'s null space by ``δ^{-3/2}``; here the
    amplification of a gradient's rounding-level component off the range is at most ``δ^{-1/2}``
    (1e3 in float32, 1e7 in float64, times ε).

    Iterations needed grow like ``log(1/δ)/log(2.25)``; the default adds a margin for the final
    quadratic phase.  Returns ``(P, converged)``: ``P`` a dense ``[k, r, r]`` batch, ``converged``
    a ``[k]`` bool, ``max|I − Z Y| ≤ residual_tol`` (callers fall back to eigh where it is False).
    """
    K, c = _normalised_gram(X)
    r = K.shape[-1]
    eye = torch.eye(r, dtype=K.dtype, device=K.device).expand_as(K)
    t = K.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    t = torch.where(t > 0, t, torch.ones_like(t))
    delta = rank_tol
    Y = (K / t + delta * eye) / (1.0 + delta)
    Z = eye.clone()
    if iters is None:
        iters = int(math.log(1.0 / delta) / math.log(2.25)) + 8
    for _ in range(iters):
        T = 0.5 * (3.0 * eye - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    converged = (eye - Z @ Y).abs().amax(dim=(-2, -1)) <= residual_tol
    negligible = t < _absolute_floor(c, K.dtype)  # the factor is 0 for this dtype: pass nothing
    P = Z / ((1.0 + delta) ** 0.5 * c * t.sqrt())
    return torch.where(negligible, torch.zeros_like(P), P), converged
