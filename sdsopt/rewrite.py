"""The gradient rewrites of MATH.md §2–§3, as pure functions on batches of row-form factors.

Row form (see :mod:`sdsopt.linalg`): ``A`` is used as is (``r × n``), ``B`` as ``Bᵀ`` (``r × m``).
In row form every mode of MATH §3 that acts on the pair's gradients is *one* formula,

    (R)    g̃X = P(K_other) · gX            for X ∈ {A, Bᵀ},  K_other = X_other X_otherᵀ

because ``g̃A = P_B gA`` and ``g̃B = gB P_A  ⇔  g̃Bᵀ = P_A gBᵀ`` (``P`` symmetric).  The mode only
chooses the spectral function ``P = U diag(f(λ)) Uᵀ``:

=========  ==========================================  =============================
mode       f(λ)                                        MATH
=========  ==========================================  =============================
``sds``    ``λ^{-1/2}`` on the numerical range, else 0  (2.2), (2.5)
``scaled`` ``1 / (λ + δ)``                              §3, Zhang & Pilanci 2024
=========  ==========================================  =============================

(``lora`` is the identity and never reaches this module.)

The singular-value channel (2.3)–(2.4) splits a rewritten gradient ``G`` of a row-form factor
``X = U Σ Vᵀ`` (``U`` from the eigendecomposition of ``K = X Xᵀ``, ``V = Xᵀ U Σ⁺``):

    (2.3)  gσ = diag(Uᵀ G V) = diag(Uᵀ G Xᵀ U) ⊙ σ⁺           basis = G − U diag(gσ ⊙ σ⁺) Uᵀ X
    (2.4)  correction = −U diag(Δσ) Vᵀ = U diag(δ ⊙ σ⁺) Uᵀ X   with δ = −Δσ the Adam step on σ

The Adam statistics of ``gσ`` belong to the optimizer; this module only provides the maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import Spectrum, algebra_precision, gram_spectrum, inv_sqrt, inv_sqrt_newton_schulz, spectral_apply
from .pairing import a_rows, b_rows, from_b_rows

__all__ = [
    "MODES",
    "ROUTES",
    "preconditioned",
    "rewrite_pair",
    "sigma_correction",
    "sigma_split",
    "spectral_function",
]

MODES = ("lora", "sds", "scaled")
ROUTES = ("eigh", "newton_schulz")


def spectral_function(spec: Spectrum, mode: str, damping: float) -> Tensor:
    """``[k, r]`` eigenvalues ``f(λ)`` of the preconditioner ``P(K)`` for ``mode`` (table above)."""
    if mode == "sds":
        return inv_sqrt(spec)
    if mode == "scaled":
        lam = spec.lam * spec.scale.squeeze(-1) ** 2
        return 1.0 / (lam + damping)
    raise ValueError(f"no spectral preconditioner for mode {mode!r}")


def preconditioned(
    X_other: Tensor,
    G: Tensor,
    *,
    mode: str,
    route: str,
    rank_tol: float,
    damping: float,
    spec_other: Spectrum | None = None,
) -> Tensor:
    """Equation (R): ``P(K_other) @ G`` for batches ``X_other`` ``[k, r, p]`` and ``G`` ``[k, r, q]``.

    ``route='eigh'`` builds ``P`` from the eigendecomposition of the Gram (``spec_other`` may be
    passed to reuse one); ``route='newton_schulz'`` (``sds`` only) uses the matmul-only iteration of
    :func:`sdsopt.linalg.inv_sqrt_newton_schulz` and falls back to eigh for the batch items whose
    iteration did not converge.
    """
    if mode == "sds" and route == "newton_schulz":
        P, converged = inv_sqrt_newton_schulz(X_other, rank_tol)
        out = P @ G
        if not bool(converged.all()):
            bad = (~converged).nonzero().squeeze(-1)
            spec = gram_spectrum(X_other[bad], rank_tol)
            out[bad] = spectral_apply(spec, inv_sqrt(spec), G[bad])
        return out
    spec = spec_other if spec_other is not None else gram_spectrum(X_other, rank_tol)
    return spectral_apply(spec, spectral_function(spec, mode, damping), G)


def sigma_split(spec: Spectrum, X: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """(2.3): ``(gσ [k, r], basis [k, r, q])`` for row-form factors ``X`` with spectrum ``spec``.

    Directions off the numerical range (2.5) have ``σ⁺ = 0``: they get ``gσ = 0`` and keep their
    whole gradient in ``basis``.
    """
    s_pinv = inv_sqrt(spec)
    U = spec.U
    Ut_X = U.transpose(-2, -1) @ X  # Σ Vᵀ : r × q
    g_sigma = (U.transpose(-2, -1) @ G @ Ut_X.transpose(-2, -1)).diagonal(dim1=-2, dim2=-1) * s_pinv
    basis = G - U @ ((g_sigma * s_pinv).unsqueeze(-1) * Ut_X)
    return g_sigma, basis


def sigma_correction(spec: Spectrum, X: Tensor, sigma_step: Tensor) -> Tensor:
    """(2.4): ``U diag(sigma_step) Vᵀ = U diag(sigma_step ⊙ σ⁺) Uᵀ X`` for row-form ``X`` ``[k, r, q]``.

    ``sigma_step`` ``[k, r]`` is the signed change of the singular values (``−lr·ratio·Adam(gσ)``).
    """
    return spectral_apply(spec, sigma_step * inv_sqrt(spec), X)


def rewrite_pair(
    A: Tensor,
    B: Tensor,
    gA: Tensor,
    gB: Tensor,
    *,
    mode: str = "sds",
    route: str = "eigh",
    rank_tol: float | None = None,
    damping: float = 1e-6,
    linalg_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Rewrite one pair's gradients ``(gA, gB) → (g̃A, g̃B)`` as :class:`sdsopt.SDSAdamW` does (no Adam).

    A convenience for tests and analysis (e.g. property-based checks of the gradient rescaling).
    Shapes are PEFT's: ``A (r, …)``, ``B (m, r, 1, …)``; results have the gradients' shapes and dtypes.
    """
    if mode not in MODES or route not in ROUTES:
        raise ValueError(f"mode must be one of {MODES} and route one of {ROUTES}; got {mode!r}, {route!r}")
    if mode == "lora":
        return gA, gB
    dt, tol = algebra_precision(A.dtype, linalg_dtype, rank_tol)
    XA, XB = a_rows(A).to(dt)[None], b_rows(B).to(dt)[None]
    kw = dict(mode=mode, route=route, rank_tol=tol, damping=damping)
    new_a = preconditioned(XB, a_rows(gA).to(dt)[None], **kw)[0]
    new_b = preconditioned(XA, b_rows(gB).to(dt)[None], **kw)[0]
    return new_a.reshape(gA.shape).to(gA.dtype), from_b_rows(new_b, gB).to(gB.dtype)
