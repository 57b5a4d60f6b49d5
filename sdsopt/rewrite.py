"""What Adam sees for one pair in each mode, as a function for tests and analysis (e.g. property-based checks of
the gradient rescaling): :func:`rewrite_pair`."""

from __future__ import annotations

import torch
from torch import Tensor

from .coordinates import coordinate_gradient, lower_inverse
from .linalg import algebra_precision, cholesky_lower, finite_or_zero, gram
from .modes import MODE_CLASSES, ROUTES, Mode, modes_where
from .modes.precondition import Preconditioned
from .modes.sds import SDS
from .pairing import a_rows, b_matrix, b_rows
from .spectral import preconditioner

__all__ = ["rewrite_pair"]


def _from_the_pair(cls: type[Mode]) -> bool:
    """Is what Adam sees in this mode a function of the pair and its gradients alone, computed here?  The
    identity (the base's :meth:`Mode.transform`), the coordinates (2.2) and the rewrites (3.1)."""
    return cls.transform is Mode.transform or issubclass(cls, (SDS, Preconditioned))


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
    ``g̃B = gB R_A^{-1} = s·G Q_A``; ``sds_polar`` and ``scaled`` their rewrites (3.1); ``lora`` the
    gradients themselves.  Shapes are PEFT's: ``A (r, …)``, ``B (m, r, 1, …)``; results have the
    gradients' shapes and dtypes.
    """
    cls = MODE_CLASSES.get(mode)
    if cls is None or not _from_the_pair(cls):
        raise ValueError(f"rewrite_pair: mode must be one of {modes_where(_from_the_pair)}, got {mode!r} "
                         "(the other modes need more than the pair: use SDSAdamW).")
    if route not in ROUTES or (cls.routes and route not in ("auto", *cls.routes)):
        raise ValueError(f"rewrite_pair: route must be 'auto' or one of {cls.routes} for mode={mode!r}, got {route!r}")
    if not issubclass(cls, (SDS, Preconditioned)):  # the identity
        return gA, gB
    route = cls.resolve_route(route, A.device)
    dt, tol = algebra_precision(A.dtype, linalg_dtype, rank_tol, route)
    Ar = a_rows(A).to(dt)[None]
    gAr, gBm = a_rows(gA).to(dt)[None], b_matrix(gB).to(dt)[None]
    if issubclass(cls, SDS):
        L_B, L_A = cholesky_lower(gram(b_rows(B).to(dt)[None]), tol), cholesky_lower(gram(Ar), tol)
        new_a = coordinate_gradient(lower_inverse(L_B), gAr, "A")[0]
        new_b = coordinate_gradient(lower_inverse(L_A), gBm, "B")[0]
    else:
        kw = dict(f=cls.spectral_function, route=route, rank_tol=tol, damping=damping)
        new_a = (preconditioner(finite_or_zero(gram(b_rows(B).to(dt)[None])), **kw) @ gAr)[0]
        new_b = (gBm @ preconditioner(finite_or_zero(gram(Ar)), **kw))[0]
    return new_a.reshape(gA.shape).to(gA.dtype), new_b.reshape(gB.shape).to(gB.dtype)
