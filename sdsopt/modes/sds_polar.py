"""Mode ``sds_polar`` (sdsopt 0.1's ``sds``): the one-sided rewrite ``g̃B = gB·K_A^{-1/2}``,
``g̃A = K_B^{-1/2}·gA`` (docs/math.md (3.1) with ``f(λ) = λ^{-1/2}`` on the numerical range (2.5)), Adam on the
plain factors; the singular-value channel ``decouple_sigma`` lives here (3.2)–(3.3).

Route ``newton_schulz`` computes a *damped* root ``(K + δ·trace K·I)^{-1/2}`` instead of the hard cut of (2.5)
(a filtered pseudo-inverse amplifies rounding noise by ``δ^{-3/2}``); it agrees with ``eigh`` to ``O(δ/λ)`` on the
range (P6).  ``route="auto"`` takes it on CUDA only, where batched eigh is slow and synchronises.
"""

from __future__ import annotations

import torch

from ..spectral import inverse_root
from .precondition import Preconditioned

__all__ = ["SDSPolar"]


class SDSPolar(Preconditioned):
    """``sds_polar``: (3.1) with the polar factor's ``f(λ) = λ^{-1/2}``."""

    name = "sds_polar"
    routes = ("eigh", "newton_schulz")
    spectral_function = staticmethod(inverse_root)

    @staticmethod
    def auto_route(device: torch.device) -> str:
        return "newton_schulz" if device.type == "cuda" else "eigh"
