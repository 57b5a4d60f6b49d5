"""Mode ``scaled``: Riemannian preconditioning (Zhang & Pilanci 2024), ``g̃B = gB·(K_A + δI)^{-1}``,
``g̃A = (K_B + δI)^{-1}·gA`` (docs/math.md (3.1) with ``f(λ) = 1/(λ + δ)``), Adam on the plain factors.

Its default route needs no eigenvectors: ``(K + δI)^{-1} = L^{-T} L^{-1}`` from a Cholesky factor, as cheap as
``sds``'s maps (one kernel launch for a whole family with ``fused=True``); ``route="eigh"`` keeps the spectral form.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import fused
from ..spectral import damped_inverse
from .precondition import Preconditioned

__all__ = ["Scaled"]


class Scaled(Preconditioned):
    """``scaled``: (3.1) with ``f(λ) = 1/(λ + δ)``, ``δ = damping``."""

    name = "scaled"
    routes = ("cholesky", "eigh")
    spectral_function = staticmethod(damped_inverse)
    damped = True

    def fused_preconditioner(self, K: Tensor, k: int, route: str, tol: float, group: dict[str, Any]) -> Tensor:
        if route == "cholesky":  # one launch for all of them
            return fused.inverses(K, k, tol, group["damping"])
        return super().fused_preconditioner(K, k, route, tol, group)
