"""The r×r maps of the modes that rewrite gradients (``sds_polar``, ``scaled``), as pure functions on row-form
factors (``A`` as is, ``r × n``; ``B`` as ``Bᵀ``, ``r × m``): docs/math.md §3.

(3.1) is one formula for both modes, ``g̃X = P(K_other)·gX`` in row form, ``P = U diag(f(λ)) Uᵀ`` formed once per
factor and applied with one batched matmul; the mode chooses ``f`` (its class's ``spectral_function``):

=====================  ==========================================  ===================================
f                      f(λ)                                        docs/math.md
=====================  ==========================================  ===================================
:func:`inverse_root`   ``λ^{-1/2}`` on the numerical range, else 0  (3.1), (2.5)  (``sds_polar``)
:func:`damped_inverse` ``1 / (λ + δ)``                              (3.1), Zhang & Pilanci 2024 (``scaled``)
=====================  ==========================================  ===================================

The singular-value channel splits a rewritten gradient ``G`` of a row-form factor ``X = U Σ Vᵀ`` (``U`` from the
eigendecomposition of ``K = X Xᵀ``, ``V = Xᵀ U Σ⁺``): :func:`sigma_split` is (3.2), :func:`sigma_correction` (3.3).
The Adam statistics of ``gσ`` belong to the mode (:mod:`sdsopt.modes.precondition`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .coordinates import lower_inverse
from .linalg import Spectrum, cholesky_lower, inv_sqrt, inv_sqrt_newton_schulz, spectral_matrix, spectrum

__all__ = ["damped_inverse", "inverse_root", "preconditioner", "sigma_correction", "sigma_split"]


def inverse_root(spec: Spectrum, damping: float) -> Tensor:
    """``[k, r]`` eigenvalues ``f(λ) = λ^{-1/2}`` of ``P(K)`` on the numerical range (2.5), else 0 (``damping``
    unused)."""
    return inv_sqrt(spec)


def damped_inverse(spec: Spectrum, damping: float) -> Tensor:
    """``[k, r]`` eigenvalues ``f(λ) = 1/(λ + δ)`` of ``P(K)``, ``δ = damping``."""
    return 1.0 / (spec.lam + damping)


def preconditioner(
    K_other: Tensor,
    *,
    f: Callable[[Spectrum, float], Tensor],
    route: str,
    rank_tol: float,
    damping: float,
    spec_other: Spectrum | None = None,
) -> Tensor:
    """``P(K_other)`` of (3.1) with eigenvalues ``f(λ)`` as a dense ``[k, r, r]`` batch, from Grams ``K_other``
    ``[k, r, r]``.

    ``K_other`` must have passed :func:`sdsopt.linalg.finite_or_zero`.  ``route='eigh'`` builds ``P``
    from the eigendecomposition of the Gram (``spec_other`` may be passed to reuse one, which every
    route then does); the routes without eigenvectors compute one ``f`` each: ``route='newton_schulz'``
    (:func:`inverse_root`) the matmul-only iteration of :func:`sdsopt.linalg.inv_sqrt_newton_schulz`;
    ``route='cholesky'`` (:func:`damped_inverse`) inverts the Cholesky factor of ``K + (δ + τ·trace K)·I`` (the
    relative τ only guards float32 rounding, see :func:`sdsopt.linalg.cholesky_lower`).
    """
    if spec_other is None and route == "newton_schulz":
        return inv_sqrt_newton_schulz(K_other, rank_tol)[0]
    if spec_other is None and route == "cholesky":
        # (K + δI)^{-1} = L^{-T} L^{-1} by a triangular solve (cuBLAS on CUDA; torch.cholesky_inverse calls MAGMA
        # there, which cannot be captured in a CUDA graph)
        L_inv = lower_inverse(cholesky_lower(K_other, rank_tol, shift=damping, empty_identity=False))
        return L_inv.mT @ L_inv
    spec = spec_other if spec_other is not None else spectrum(K_other, rank_tol)
    return spectral_matrix(spec, f(spec, damping))


def sigma_split(spec: Spectrum, X: Tensor, G: Tensor, GXt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(3.2): ``(gσ [k, r], basis [k, r, q])`` for row-form factors ``X`` with spectrum ``spec``.

    ``gσ = diag(Uᵀ (G Xᵀ) U) ⊙ σ⁺`` and ``basis = G − U diag(gσ ⊙ σ⁺) Uᵀ X``.  Directions off the
    numerical range (2.5) have ``σ⁺ = 0``: they get ``gσ = 0`` and keep their whole gradient in ``basis``.
    ``GXt`` is the r×r ``G Xᵀ`` when the caller already has it: for column shards of ``X`` and ``G``
    (FSDP2) it is the sum of the shards' ``G_i X_iᵀ``; ``None`` computes it from ``G`` and ``X``.
    """
    s_pinv = inv_sqrt(spec)
    U = spec.U
    if GXt is None:
        GXt = G @ X.transpose(-2, -1)
    g_sigma = (U.transpose(-2, -1) @ GXt @ U).diagonal(dim1=-2, dim2=-1) * s_pinv
    return g_sigma, G - spectral_matrix(spec, g_sigma * s_pinv) @ X


def sigma_correction(spec: Spectrum, X: Tensor, sigma_step: Tensor) -> Tensor:
    """(3.3): ``U diag(sigma_step) Vᵀ = U diag(sigma_step ⊙ σ⁺) Uᵀ X`` for row-form ``X`` ``[k, r, q]``.

    ``sigma_step`` ``[k, r]`` is the signed change of the singular values (``−lr·ratio·Adam(gσ)``).
    """
    return spectral_matrix(spec, sigma_step * inv_sqrt(spec)) @ X
