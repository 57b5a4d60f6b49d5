"""The gradient rewrites of MATH.md §2.7–§3 (modes ``sds_polar``, ``scaled``), as pure functions on row-form factors.

(Mode ``sds`` is not a rewrite in front of Adam but a change of coordinates around it:
:mod:`sdsopt.coordinates`.)

Row form (see :mod:`sdsopt.linalg`): ``A`` is used as is (``r × n``), ``B`` as ``Bᵀ`` (``r × m``).
Every mode of MATH §3 that acts on the pair's gradients is *one* formula,

    (R)    g̃A = P(K_B) · gA        g̃B = gB · P(K_A)        K_A = A Aᵀ,  K_B = Bᵀ B

(in row form ``g̃X = P(K_other) gX`` for ``X ∈ {A, Bᵀ}``, ``P`` symmetric).  ``P`` is an r×r matrix
formed once per factor and applied with one batched matmul; the mode only chooses the spectral
function ``P = U diag(f(λ)) Uᵀ``:

=============  ==========================================  =============================
mode           f(λ)                                        MATH
=============  ==========================================  =============================
``sds_polar``  ``λ^{-1/2}`` on the numerical range, else 0  (2.7), (2.5)
``scaled``     ``1 / (λ + δ)``                              §3, Zhang & Pilanci 2024
=============  ==========================================  =============================

``scaled`` needs no eigenvectors: its default route forms ``P = (K + δI)^{-1}`` from a Cholesky
factor (``L^{-T} L^{-1}``), as cheap as mode ``sds``'s maps; ``route='eigh'`` keeps the
spectral form.

(``lora`` is the identity and never reaches this module.)  ``svd_oracle`` (:func:`svd_refactor`)
needs the full gradient, which the layers' recorded inputs provide (:mod:`sdsopt.capture`); LoRSum /
PSI-LoRA is its own optimizer, :class:`sdsopt.PSILoRA`.

The singular-value channel (2.8) splits a rewritten gradient ``G`` of a row-form factor
``X = U Σ Vᵀ`` (``U`` from the eigendecomposition of ``K = X Xᵀ``, ``V = Xᵀ U Σ⁺``):

    (2.8)  gσ = diag(Uᵀ G V) = diag(Uᵀ G Xᵀ U) ⊙ σ⁺           basis = G − U diag(gσ ⊙ σ⁺) Uᵀ X
    (2.8') correction = −U diag(Δσ) Vᵀ = U diag(δ ⊙ σ⁺) Uᵀ X   with δ = −Δσ the Adam step on σ

The Adam statistics of ``gσ`` belong to the optimizer; this module only provides the maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import (
    Spectrum,
    algebra_precision,
    cholesky_lower,
    finite_or_zero,
    gram,
    inv_sqrt,
    inv_sqrt_newton_schulz,
    spectral_matrix,
    spectrum,
)
from .coordinates import lower_inverse, to_coordinates
from .pairing import a_rows, b_matrix, b_rows

__all__ = [
    "MODES",
    "MODE_ROUTES",
    "ROUTES",
    "preconditioner",
    "resolve_route",
    "rewrite_pair",
    "sigma_correction",
    "sigma_split",
    "spectral_function",
    "svd_refactor",
]

MODES = ("lora", "sds", "sds_polar", "scaled", "svd_oracle")
SPECTRAL_MODES = ("sds_polar", "scaled")  # modes that are one spectral function of the other factor's Gram
ROUTES = ("auto", "cholesky", "eigh", "newton_schulz")
MODE_ROUTES = {"sds": ("cholesky",), "sds_polar": ("eigh", "newton_schulz"), "scaled": ("cholesky", "eigh")}
"""The routes each mode can take (``'auto'`` resolves to one of them, :func:`resolve_route`)."""


def resolve_route(route: str, device: torch.device, mode: str = "sds_polar") -> str:
    """The r×r route of ``mode``: ``'auto'`` → ``'cholesky'`` for ``sds`` and ``scaled``; for ``sds_polar``
    ``'newton_schulz'`` on CUDA (batched eigh is slow there for r ≥ 32 and syncs), else ``'eigh'``."""
    if route != "auto":
        return route
    if mode == "sds_polar":
        return "newton_schulz" if device.type == "cuda" else "eigh"
    return "cholesky"


def spectral_function(spec: Spectrum, mode: str, damping: float) -> Tensor:
    """``[k, r]`` eigenvalues ``f(λ)`` of the preconditioner ``P(K)`` for ``mode`` (table above)."""
    if mode == "sds_polar":
        return inv_sqrt(spec)
    if mode == "scaled":
        return 1.0 / (spec.lam + damping)
    raise ValueError(f"no spectral preconditioner for mode {mode!r}")


def preconditioner(
    K_other: Tensor,
    *,
    mode: str,
    route: str,
    rank_tol: float,
    damping: float,
    spec_other: Spectrum | None = None,
) -> Tensor:
    """``P(K_other)`` of equation (R) as a dense ``[k, r, r]`` batch, from Grams ``K_other`` ``[k, r, r]``.

    ``K_other`` must have passed :func:`sdsopt.linalg.finite_or_zero`.  ``route='eigh'`` builds ``P``
    from the eigendecomposition of the Gram (``spec_other`` may be passed to reuse one, which every
    route then does); ``route='newton_schulz'`` (``sds_polar``) uses the matmul-only iteration of
    :func:`sdsopt.linalg.inv_sqrt_newton_schulz`; ``route='cholesky'`` (``scaled``) inverts the Cholesky
    factor of ``K + (δ + τ·trace K)·I`` (the relative τ only guards float32 rounding, see
    :func:`sdsopt.linalg.cholesky_lower`).
    """
    if spec_other is None and route == "newton_schulz" and mode == "sds_polar":
        return inv_sqrt_newton_schulz(K_other, rank_tol)[0]
    if spec_other is None and route == "cholesky" and mode == "scaled":
        # (K + δI)^{-1} = L^{-T} L^{-1} by a triangular solve (cuBLAS on CUDA; torch.cholesky_inverse calls MAGMA
        # there, which cannot be captured in a CUDA graph)
        L_inv = lower_inverse(cholesky_lower(K_other, rank_tol, shift=damping, empty_identity=False))
        return L_inv.mT @ L_inv
    spec = spec_other if spec_other is not None else spectrum(K_other, rank_tol)
    return spectral_matrix(spec, spectral_function(spec, mode, damping))


def sigma_split(spec: Spectrum, X: Tensor, G: Tensor, GXt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(2.3): ``(gσ [k, r], basis [k, r, q])`` for row-form factors ``X`` with spectrum ``spec``.

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
    """(2.4): ``U diag(sigma_step) Vᵀ = U diag(sigma_step ⊙ σ⁺) Uᵀ X`` for row-form ``X`` ``[k, r, q]``.

    ``sigma_step`` ``[k, r]`` is the signed change of the singular values (``−lr·ratio·Adam(gσ)``).
    """
    return spectral_matrix(spec, sigma_step * inv_sqrt(spec)) @ X


def rewrite_pair(
    A: Tensor,
    B: Tensor,
    gA: Tensor,
    gB: Tensor,
    *,
    mode: str = "sds",
    route: str = "auto",
    rank_tol: float | None = None,
    damping: float = 1e-6,
    linalg_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The gradients ``(g̃A, g̃B)`` that Adam sees for one pair in ``mode`` (no Adam step).

    A convenience for tests and analysis (e.g. property-based checks of the gradient rescaling):
    ``sds`` gives the coordinates' gradients (2.2) ``g̃A = R_B^{-T} gA = s·Q_Bᵀ G``,
    ``g̃B = gB R_A^{-1} = s·G Q_A``; ``sds_polar`` and ``scaled`` their rewrites (R); ``lora`` the
    gradients themselves.  Shapes are PEFT's: ``A (r, …)``, ``B (m, r, 1, …)``; results have the
    gradients' shapes and dtypes.
    """
    if mode not in ("lora", "sds", *SPECTRAL_MODES):
        raise ValueError(f"rewrite_pair: mode must be one of {('lora', 'sds', *SPECTRAL_MODES)}, got {mode!r} "
                         "(svd_oracle needs the layers' inputs: use SDSAdamW.attach).")
    if route not in ROUTES:
        raise ValueError(f"rewrite_pair: route must be one of {ROUTES}, got {route!r}")
    if mode == "lora":
        return gA, gB
    route = resolve_route(route, A.device, mode)
    dt, tol = algebra_precision(A.dtype, linalg_dtype, rank_tol, route)
    Ar, Bm = a_rows(A).to(dt)[None], b_matrix(B).to(dt)[None]
    gAr, gBm = a_rows(gA).to(dt)[None], b_matrix(gB).to(dt)[None]
    if mode == "sds":
        L_B, L_A = cholesky_lower(gram(b_rows(B).to(dt)[None]), tol), cholesky_lower(gram(Ar), tol)
        new_a = to_coordinates(L_B, lower_inverse(L_B), Ar, gAr, "A")[1][0]
        new_b = to_coordinates(L_A, lower_inverse(L_A), Bm, gBm, "B")[1][0]
    else:
        kw = dict(mode=mode, route=route, rank_tol=tol, damping=damping)
        new_a = (preconditioner(finite_or_zero(gram(b_rows(B).to(dt)[None])), **kw) @ gAr)[0]
        new_b = (gBm @ preconditioner(finite_or_zero(gram(Ar)), **kw))[0]
    return new_a.reshape(gA.shape).to(gA.dtype), new_b.reshape(gB.shape).to(gB.dtype)


def _solve_right(M: Tensor, S: Tensor) -> Tensor:
    """``M S^{-1}`` for symmetric positive definite ``S``."""
    return torch.linalg.solve(S, M.transpose(-2, -1)).transpose(-2, -1)


def svd_refactor(W: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of ``W`` (m×n), balanced and aligned with the current ``(A, B)`` (``svd_oracle``).

    With the truncated SVD ``W_r = U Σ Vᵀ``: ``B' = U Σ^{1/2} Q``, ``A' = Qᵀ Σ^{1/2} Vᵀ``, so
    ``B' A' = W_r`` (Eckart–Young) for any orthogonal ``Q``; ``Q = polar(Σ^{1/2}(Uᵀ B + Vᵀ Aᵀ))``
    minimises ``‖B' − B‖² + ‖A' − A‖²`` over ``Q`` so that the factors do not jump between
    equivalent bases from one step to the next.  Needs ``r ≤ min(m, n)``.
    """
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, root, Vh = U[:, :r], S[:r].sqrt(), Vh[:r]
    Um, _, Vmh = torch.linalg.svd(root[:, None] * (U.T @ B + Vh @ A.T))
    Q = Um @ Vmh
    return Q.T @ (root[:, None] * Vh), (U * root) @ Q
