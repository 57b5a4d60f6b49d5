"""Linear algebra on batches of small LoRA factors (docs/math.md (2.1), (2.5)).

Every factor is seen in *row form*: an ``r × p`` matrix ``X`` whose rows span the factor's
r-dimensional subspace.  ``A`` (``r × n``) is already in row form; ``B`` (``m × r``) enters as the
transposed view ``Bᵀ`` (no copy: ``bmm`` reads transposed strides).  Both Gram matrices of docs/math.md
(2.1) are then ``K = X Xᵀ`` (``K_A = A Aᵀ``, ``K_B = Bᵀ B``), so one formula serves both factors.

Functions take batches ``[k, r, p]`` (k factors of equal shape) and return batches; there is no
per-factor Python loop.  All of them are pure: no optimizer state, no in-place change of inputs.

Rank threshold (2.5).  Gram eigenvalues with ``λ ≤ τ·λ_max``, or not above the dtype's ``tiny``
(the absolute floor: it makes ``K = 0`` rank 0 and keeps every ``1/σ ≤ 1/√tiny`` finite), are
outside the numerical range.  The default ``τ`` depends on the dtype the algebra runs in: 1e-6 in
float32 (≈ 8 ε) and 1e-14 in float64 (≈ 45 ε, so that factors with condition
numbers up to 1e6, Gram condition 1e12, stay inside the range).  The Newton–Schulz route uses τ as
its damping and has its own defaults (see :data:`DEFAULT_RANK_TOL`).

Extreme factors.  The Gram is formed from the raw factor (no rescaling pass, which would cost a
full read and write of every factor each step).  A factor whose Gram overflows (entries beyond
~1e18 in float32, where the layer's own output has long overflowed) or that is non-finite is
treated as rank 0 for the step: its partner receives no gradient, and nothing raises or turns NaN.
Factors so small that their Gram underflows below ``tiny`` are rank 0 by the floor above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RANK_TOL",
    "Spectrum",
    "algebra_precision",
    "cholesky_lower",
    "default_rank_tol",
    "finite_or_zero",
    "float32_matmul",
    "gram",
    "spectrum",
    "inv_sqrt",
    "inv_sqrt_newton_schulz",
    "ns_iterations",
    "spectral_matrix",
    "trace",
]

DEFAULT_RANK_TOL: dict[tuple[str, torch.dtype], float] = {
    ("eigh", torch.float32): 1e-6,
    ("eigh", torch.float64): 1e-14,
    # Newton–Schulz: τ is the damping δ; its rounding error grows like ε/δ and its bias like δ/λ̂,
    # so δ ≈ √ε·(typical λ̂): measured worst relative error on rank-deficient Grams 5e-4 (float32), 1e-7 (float64).
    ("newton_schulz", torch.float32): 1e-5,
    ("newton_schulz", torch.float64): 1e-11,
    # Cholesky (modes ``sds`` and ``scaled``): τ is the relative shift of (2.5), K + τ·trace(K)·I.  In float32 the
    # rounding error of a Gram is ~ r·ε·trace K, so 1e-5 keeps rank-deficient Grams factorable up to r ≈ 128.
    ("cholesky", torch.float32): 1e-5,
    ("cholesky", torch.float64): 1e-13,
}


def default_rank_tol(dtype: torch.dtype, route: str = "eigh") -> float:
    """τ of docs/math.md (2.5) (the damping δ for ``route='newton_schulz'``) for algebra carried out in ``dtype``."""
    return DEFAULT_RANK_TOL[route, dtype]


def algebra_precision(
    param_dtype: torch.dtype, linalg_dtype: torch.dtype | None, rank_tol: float | None, route: str = "eigh"
) -> tuple[torch.dtype, float]:
    """``(dtype, τ)`` for the r×r algebra: float32 at least (float64 for float64 parameters or on request)."""
    dtype = linalg_dtype or (torch.float64 if param_dtype == torch.float64 else torch.float32)
    return dtype, rank_tol if rank_tol is not None else default_rank_tol(dtype, route)


_NEW_API = {"highest": "ieee", "high": "tf32"}


@contextmanager
def float32_matmul(precision: str = "highest") -> Iterator[None]:
    """float32 products on CUDA at ``precision`` inside the block, whatever the user set: ``"highest"`` (IEEE,
    the default) or ``"high"`` (TF32: what ``benchmarks/e2e_profile.py --products`` compares), restored after.

    A user's ``torch.backends.cuda.matmul.allow_tf32 = True`` (or Trainer's ``tf32=True``) would otherwise turn
    the torch path's Grams and maps into TF32 products, ~1e-3 relative error, and the algebra on the factors must
    be float32-accurate (docs/math.md (2.5): τ assumes float32 rounding).  torch has two APIs for the flag and
    refuses to mix them once one was used, so the block sets the flag through the one the user's setting used."""
    try:
        before = torch.get_float32_matmul_precision()  # (raises once the per-backend API was used)
    except RuntimeError:
        before = None
    if before is not None:
        torch.set_float32_matmul_precision(precision)
    else:
        before_new = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = _NEW_API[precision]
    try:
        yield
    finally:
        if before is not None:
            torch.set_float32_matmul_precision(before)
        else:
            torch.backends.cuda.matmul.fp32_precision = before_new


def gram(X: Tensor) -> Tensor:
    """``K = X Xᵀ`` for row-form factors ``[k, r, p]`` (one bmm; see :func:`finite_or_zero`)."""
    return X @ X.transpose(-2, -1)


def trace(K: Tensor) -> Tensor:
    """``trace K`` of a batch of r×r matrices, shaped ``[..., 1, 1]`` to scale or mask them."""
    return K.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def cholesky_lower(K: Tensor, rank_tol: float, shift: float = 0.0, empty_identity: bool = True) -> Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = K + (τ·trace K + shift)·I`` for Grams ``K`` ``[k, r, r]`` (docs/math.md (2.1), (2.5)).

    ``R = Lᵀ`` is the upper-triangular factor of the sign-fixed thin QR of the factor (``X = Q R``
    with ``diag R > 0``), up to the relative shift ``τ`` that keeps rank-deficient factors (LoRA's
    ``B = 0`` start, a collapsed column, ``r > min(m, n)``) factorable.  The shift is applied always,
    not only when the factorisation fails, so that nothing here waits for the device: on a
    well-conditioned factor it changes ``R`` by a relative ``O(τ)`` (τ = 1e-5 in float32, 1e-13 in
    float64), and any invertible ``R`` is an exact change of coordinates (docs/math.md (2.2)), so the shift
    only makes ``Q = X R^{-1}`` orthonormal to within ``O(τ·κ²)`` instead of exactly.

    Sync-free fallbacks (``torch.where``, no Python branch on data):

    * ``K`` non-finite or ``trace K ≤ tiny`` (``B = 0``): ``L = I``, so the pair's coordinates are
      the factors themselves and it takes a plain AdamW step (docs/math.md (2.5));
    * the factorisation still fails (float32 rounding on a badly rank-deficient Gram with large r):
      ``L = √(trace K / r)·I``, an isotropic coordinate system of the factor's scale.

    ``shift`` is an absolute addition (mode ``scaled``'s damping δ, mode ``sds``'s step damping);
    ``empty_identity=False`` factors ``K = 0`` as ``√shift·I`` instead of the identity (``scaled``).
    """
    r = K.shape[-1]
    eye = torch.eye(r, dtype=K.dtype, device=K.device)
    K = finite_or_zero(K)
    t = trace(K)
    L, info = torch.linalg.cholesky_ex(K + (rank_tol * t + shift) * eye)
    empty = t <= torch.finfo(K.dtype).tiny
    if not empty_identity:
        empty = torch.zeros_like(empty)  # K + δI is positive definite even for K = 0
    failed = (info != 0)[..., None, None] | ~L.isfinite().all(dim=(-2, -1), keepdim=True)
    fallback = torch.where(empty, eye, ((t + shift) / r).clamp_min(torch.finfo(K.dtype).tiny).sqrt() * eye)
    return torch.where(failed | empty, fallback, L)


def finite_or_zero(K: Tensor) -> Tensor:
    """Grams with a non-finite entry replaced by 0 (rank 0: the partner gets no gradient, nothing raises).

    Applied once to the batch of all Grams of a step, before any eigensolver or iteration sees them.
    """
    finite = K.sum(dim=(-2, -1), keepdim=True).isfinite()
    return torch.where(finite, K, torch.zeros((), dtype=K.dtype, device=K.device))


class Spectrum(NamedTuple):
    """Eigendecomposition ``K = X Xᵀ = U diag(λ) Uᵀ`` of a batch of factors' Grams.

    Attributes:
        U: ``[k, r, r]`` orthonormal eigenvectors (columns).
        lam: ``[k, r]`` eigenvalues, ascending, clamped at 0 (``σ = √λ`` are the factor's singular values).
        in_range: ``[k, r]`` bool, the numerical range of (2.5).
    """

    U: Tensor
    lam: Tensor
    in_range: Tensor

    def select(self, index: Tensor) -> Spectrum:
        """The spectra of batch items ``index`` (a 1-D index tensor)."""
        return Spectrum(self.U[index], self.lam[index], self.in_range[index])


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


def spectrum(K: Tensor, rank_tol: float) -> Spectrum:
    """Spectrum of a batch of Grams ``K = X Xᵀ`` ``[k, r, r]`` (from :func:`gram`), docs/math.md (2.1) and (2.5)."""
    lam, U = _eigh(K)
    lam = lam.clamp_min(0.0)
    in_range = (lam > rank_tol * lam[..., -1:]) & (lam > torch.finfo(lam.dtype).tiny)
    return Spectrum(U=U, lam=lam, in_range=in_range)


def inv_sqrt(spec: Spectrum) -> Tensor:
    """``[k, r]`` eigenvalues of ``K^{-1/2}`` on the numerical range, 0 off it (docs/math.md (2.1), (2.5)).

    These are also the pseudo-inverse singular values ``1/σ`` of the factor, which the
    singular-value channel (3.2) uses.
    """
    return torch.where(spec.in_range, torch.where(spec.in_range, spec.lam, 1.0).rsqrt(), 0.0)


def spectral_matrix(spec: Spectrum, f: Tensor) -> Tensor:
    """The symmetric ``[k, r, r]`` matrix ``U diag(f) Uᵀ`` (formed once, then applied by one bmm)."""
    return (spec.U * f.unsqueeze(-2)) @ spec.U.transpose(-2, -1)


def ns_iterations(delta: float) -> int:
    """Newton–Schulz iterations that reach convergence from the smallest eigenvalue ``δ/(1+δ)`` of ``M``.

    For small eigenvalues the product ``x = zy`` grows by ``9/4`` per iteration until ``x ~ 1/2``,
    then converges quadratically; 8 iterations of margin cover the quadratic phase to rounding level.
    """
    return int(math.log(1.0 / delta) / math.log(2.25)) + 8


def inv_sqrt_newton_schulz(K: Tensor, rank_tol: float, iters: int | None = None) -> tuple[Tensor, Tensor]:
    """Matmul-only damped ``K^{-1/2}`` for Grams ``K`` ``[k, r, r]`` by the coupled Newton–Schulz iteration (docs/math.md (3.1)).

    With ``K̂ = K / t`` (``t = trace K ≥ λ_max``, so the spectrum lies in ``[0, 1]``) and
    ``M = (K̂ + δI)/(1 + δ)``, ``δ = τ``, the iteration ``T = (3I − Z Y)/2, Y ← Y T, Z ← T Z`` from
    ``Y = M, Z = I`` converges to ``Z = M^{-1/2}`` (Higham, *Functions of Matrices*, sec. 6.3; stable in
    its coupled form).  Returned is ``P = (K̂ + δI)^{-1/2} / √t``, i.e. the spectral function
    ``f(λ̂) = (λ̂ + δ)^{-1/2}`` in place of the eigh route's hard cut of (2.5):

    * on the range (``λ̂ ≫ δ``) ``f = λ̂^{-1/2} (1 − δ/(2λ̂) + …)``;
    * a direction of the factor contributes ``f(λ̂)·√λ̂ = (λ̂/(λ̂+δ))^{1/2} ≤ 1`` to the rewritten
      gradient, so weak directions fade out smoothly instead of being cut, and nothing is amplified
      past isotropy.  ``K = 0`` (or a Gram below ``tiny``) gives ``P = 0``.

    A damped root is used rather than a filtered pseudo-inverse (``K̂ Z³`` etc.) because products
    with ``Z ~ δ^{-1/2}`` amplify rounding noise of ``K̂``'s null space by ``δ^{-3/2}``; here the
    rounding error grows like ``ε/δ`` (measured: see :data:`DEFAULT_RANK_TOL`).

    Convergence needs no runtime check (which would cost a host synchronisation per step on
    GPUs): for a finite PSD ``K`` the spectrum of ``M`` lies in ``[δ/(1+δ) − O(ε), 1]``, which the
    iteration count of :func:`ns_iterations` covers, and callers pass Grams through
    :func:`finite_or_zero`; :class:`sdsopt.SDSAdamW` rejects ``δ < 64 ε``.  The residual
    ``max|I − Z Y|`` is returned (``[k]``) for tests and diagnostics.
    """
    r = K.shape[-1]
    eye = torch.eye(r, dtype=K.dtype, device=K.device).expand_as(K)
    t = trace(K)
    negligible = t <= torch.finfo(K.dtype).tiny
    t = torch.where(negligible, torch.ones_like(t), t)
    delta = rank_tol
    Y = (K / t + delta * eye) / (1.0 + delta)
    Z = eye.clone()
    half_three = 1.5 * eye
    for _ in range(ns_iterations(delta) if iters is None else iters):
        T = torch.baddbmm(half_three, Z, Y, alpha=-0.5)  # (3I − Z Y)/2 in one kernel
        Y = Y @ T
        Z = T @ Z
    residual = (eye - Z @ Y).abs().amax(dim=(-2, -1))
    P = Z * ((1.0 + delta) ** -0.5 * t.rsqrt())
    return torch.where(negligible, torch.zeros_like(P), P), residual
