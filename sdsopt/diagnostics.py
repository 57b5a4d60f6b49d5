"""What a user debugging LoRA logs: :meth:`sdsopt.SDSAdamW.diagnostics`, as pure functions on the factors.

Per pair (``A`` an ``r × n`` row-form factor, ``B`` an ``m × r`` matrix, docs/math.md §1), every number from
r×r or 2r×2r Grams in float64: one Gram product per factor, then batched eigendecompositions of small matrices
for all pairs of one rank, and one host read for the whole report.

* ``phase``: mode ``sds``: ``"warmup"`` (the pair's plain AdamW steps, docs/math.md (2.4)) or ``"coordinates"``;
  any other mode: its name.
* ``kappa_A``, ``kappa_B``: ``σ_max/σ_min`` of the factor on its numerical range ``σ > 1e-7·σ_max`` (float64
  Grams resolve ``σ`` down to ``~1e-8·σ_max``, so this is the range they can see; :func:`sdsopt.lab.metrics.condition_number`
  takes the SVD of the factor instead); ``inf`` for a zero factor (PEFT's ``B = 0`` at the start).
* ``norm_A``, ``norm_B`` (Frobenius) and ``norm_ratio = ‖B‖/‖A‖`` (mode ``sds`` re-balances it towards 1 at each
  coordinate step, docs/math.md (2.4), from the Grams before the step).

The last step's change, only when it was asked for beforehand (:meth:`sdsopt.SDSAdamW.track_step`: the factors
are copied at the start of the next step, once; nothing is kept or computed otherwise).  With ``A, B`` before the
step and ``A', B'`` after it, ``ΔW = B'A' − BA = [B' − B, B]·[A'; A' − A]`` exactly (rank ≤ 2r; no difference of
two rounded products, and the scale ``s`` of ``s·BA`` cancels in every number below):

* ``step_effective_rank``: ``exp(H(p))``, ``p_i = σ_i/Σσ`` of ``ΔW`` (docs/math.md §5's effective rank, of the
  exact change rather than of its first-order part).  With ``U = [B' − B, B]`` and ``V = [A'; A' − A]``,
  ``σ(ΔW)² = eig(Sᵀ (V Vᵀ) S)`` with ``UᵀU = S Sᵀ``: 2r×2r matrices only.
* ``step_relative``: ``‖ΔW‖_F / ‖BA‖_F`` (``inf`` from ``BA = 0``).
* ``step_share_B``: how much of the step the ``B`` side made, ``b / (a + b)`` with ``b = ‖(I − P_B) ΔW‖_F`` (the
  part outside ``B``'s column space, which only a change of ``B`` makes: to first order ``(I − P_B)·ΔB·A``) and
  ``a = ‖ΔW (I − P_A)‖_F`` (outside ``A``'s row space: ``B·ΔA·(I − P_A)``).  These are the parts of
  ``‖ΔB·A‖`` and ``‖B·ΔA‖`` that do not depend on how ``BA`` is split between the factors: a re-scaling
  ``(cA, B/c)`` (``sds``'s re-balance) or ``(MA, BM⁻¹)`` moves both factors and neither number.  ``NaN`` when the
  step stays inside both spaces (then no side can be told apart), 1 for LoRA's first step from ``B = 0``; a part
  below ``1e-6·‖ΔW‖_F`` counts as 0 (``b`` and ``a`` come from differences of squares of float64 Grams).

Why the exact last step, and not Adam's moments (the direction of the next step): the moments are not the step
(bias correction, ``sds``'s damping filter and ramp, the weight decay), they are zeroed when a pair ends its
warm-up (exactly when its diagnostics matter most), and mapping them to weight space would repeat mode ``sds``'s
own map back.  The copy costs one LoRA-sized tensor per factor for one step, only when asked for.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .blocks import block_pairs
from .distributed import is_dtensor
from .modes.sds import SDS
from .pairing import LoraPair, a_rows, b_matrix

__all__ = ["KAPPA_TOL", "StepTracker", "entropy_rank", "factor_pairs", "factor_statistics", "phase", "range_condition",
           "report", "snapshot", "step_statistics", "summarise"]

KAPPA_TOL = 1e-7
"""Relative floor of the numerical range of :func:`factor_statistics` and the pseudo-inverses of
:func:`step_statistics`, on singular values (``1e-14`` on Gram eigenvalues, float64)."""

Factors = tuple[Tensor, Tensor]


def entropy_rank(s: Tensor) -> Tensor:
    """``exp(−Σ p_i log p_i)``, ``p = s / Σ s``, over the last dimension of non-negative singular values ``s``
    (a batch ``[..., k]`` gives ``[...]``; 0 where every ``s`` is 0).  Shared with
    :func:`sdsopt.lab.metrics.effective_rank`."""
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, torch.ones_like(total))
    h = -torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p)).sum(-1)
    return torch.where(total[..., 0] > 0, h.exp(), torch.zeros_like(h))


def range_condition(s: Tensor, tol: float) -> Tensor:
    """``σ_max / σ_min`` over the numerical range ``σ > tol·σ_max`` of the last dimension of singular values ``s``
    (any order; a batch ``[..., k]`` gives ``[...]``); ``inf`` where every ``σ`` is 0.  Shared with
    :func:`sdsopt.lab.metrics.condition_number`."""
    top = s.amax(-1, keepdim=True)
    low = torch.where(s > tol * top, s, torch.full_like(s, float("inf"))).amin(-1)
    return torch.where(top[..., 0] > 0, top[..., 0] / low, torch.full_like(low, float("inf")))


def factor_pairs(param_groups: Sequence[dict[str, Any]]) -> list[Factors]:
    """The ``(A, B)`` tensors of every resolved LoRA pair, in :attr:`sdsopt.SDSAdamW.lora_pairs`'s order (a block of
    stacked factors as row views: :func:`sdsopt.blocks.block_pairs`)."""
    return [pair for g in param_groups
            for pair in [*((g["params"][ia], g["params"][ib]) for ia, ib in g["lora_pairs"]), *block_pairs(g)]]


def snapshot(param_groups: Sequence[dict[str, Any]]) -> list[Factors]:
    """Detached copies of :func:`factor_pairs`' tensors (the factors before a step)."""
    return [(A.detach().clone(), B.detach().clone()) for A, B in factor_pairs(param_groups)]


def phase(group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]], ia: int) -> str:
    """``"warmup"`` / ``"coordinates"`` for a pair of mode ``sds`` (A factor ``group['params'][ia]``), else the
    group's mode name."""
    if group["mode"] != SDS.name:
        return group["mode"]
    return "coordinates" if SDS.in_coordinates(state, group, ia) else "warmup"


def _spectrum(K: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvalues (clamped at 0), eigenvectors and numerical range (:data:`KAPPA_TOL`) of PSD Grams ``[k, p, p]``."""
    lam, vec = torch.linalg.eigh(K)
    lam = lam.clamp_min(0.0)
    in_range = lam > (KAPPA_TOL**2) * lam[..., -1:]
    return lam, vec, in_range


def _pinv(K: Tensor) -> Tensor:
    """Pseudo-inverses of PSD Grams ``[k, r, r]`` on their numerical range."""
    lam, vec, in_range = _spectrum(K)
    inv = torch.where(in_range, 1.0 / torch.where(in_range, lam, 1.0), 0.0)
    return (vec * inv.unsqueeze(-2)) @ vec.mT


def _trace(X: Tensor) -> Tensor:
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def factor_statistics(K_A: Tensor, K_B: Tensor) -> dict[str, Tensor]:
    """``kappa_A``, ``kappa_B``, ``norm_A``, ``norm_B``, ``norm_ratio`` (each ``[k]``) from float64 Grams
    ``K_A = AAᵀ``, ``K_B = BᵀB`` ``[k, r, r]``."""
    out: dict[str, Tensor] = {}
    for side, K in (("A", K_A), ("B", K_B)):
        out[f"kappa_{side}"] = range_condition(torch.linalg.eigvalsh(K).clamp_min(0.0).sqrt(), KAPPA_TOL)
        out[f"norm_{side}"] = _trace(K).clamp_min(0.0).sqrt()
    out["norm_ratio"] = out["norm_B"] / out["norm_A"]
    return out


def step_grams(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """``(UᵀU, V Vᵀ)`` of ``ΔW = B'A' − BA = U V``, ``U = [B' − B, B]``, ``V = [A'; A' − A]`` (float64, 2r×2r), from
    the factors after (``A``, ``B``: row-form A, matrix B) and before (``A0``, ``B0``) a step."""
    A, B, A0, B0 = (t.double() for t in (A, B, A0, B0))
    U = torch.cat([B - B0, B0], dim=1)
    V = torch.cat([A, A - A0], dim=0)
    return U.mT @ U, V @ V.mT


def step_statistics(G_U: Tensor, G_V: Tensor) -> dict[str, Tensor]:
    """``step_effective_rank``, ``step_relative``, ``step_share_B`` (each ``[k]``) from :func:`step_grams`'
    batches ``[k, 2r, 2r]`` (see the module docstring for the formulas)."""
    r = G_U.shape[-1] // 2
    lam, vec, _ = _spectrum(G_U)
    S = vec * lam.sqrt().unsqueeze(-2)  # UᵀU = S Sᵀ
    sigma = torch.linalg.eigvalsh(S.mT @ G_V @ S).clamp_min(0.0).sqrt()
    total = (sigma**2).sum(-1)
    K_B = G_U[..., r:, r:]
    A0 = torch.cat([torch.eye(r, dtype=G_V.dtype, device=G_V.device).expand(*G_V.shape[:-2], r, r),
                    -torch.eye(r, dtype=G_V.dtype, device=G_V.device).expand(*G_V.shape[:-2], r, r)], dim=-1)
    VAt = G_V @ A0.mT  # V Aᵀ with A = A' − (A' − A): [A'Aᵀ; (A' − A)Aᵀ]
    K_A = A0 @ VAt  # A Aᵀ
    C_B = G_U[..., :, r:]  # Uᵀ B
    in_B = _trace(C_B @ _pinv(K_B) @ C_B.mT @ G_V)  # ‖P_B ΔW‖²
    in_A = _trace(G_U @ VAt @ _pinv(K_A) @ VAt.mT)  # ‖ΔW P_A‖²
    b = (total - in_B).clamp_min(0.0).sqrt()
    a = (total - in_A).clamp_min(0.0).sqrt()
    tiny = 10 * KAPPA_TOL * total.sqrt()  # differences of squares resolve ~1e-8·‖ΔW‖: below this, a side made nothing
    b, a = torch.where(b > tiny, b, 0.0), torch.where(a > tiny, a, 0.0)
    product = _trace(K_B @ K_A).clamp_min(0.0).sqrt()  # ‖BA‖
    return {"step_effective_rank": entropy_rank(sigma),
            "step_relative": torch.where(product > 0, total.sqrt() / product, math.inf),
            "step_share_B": torch.where(a + b > 0, b / (a + b), math.nan)}


def _batched(pairs: list[tuple[int, Factors, Factors | None]]) -> dict[int, dict[str, float]]:
    """Every pair's statistics, the r×r algebra batched per rank; one host read per rank."""
    by_rank: dict[tuple[int, bool], list[tuple[int, Factors, Factors | None]]] = defaultdict(list)
    for item in pairs:
        by_rank[(item[1][0].shape[0], item[2] is not None)].append(item)
    out: dict[int, dict[str, float]] = {}
    for (_, tracked), items in by_rank.items():
        rows = [(a_rows(A.detach()).double(), b_matrix(B.detach()).double()) for _, (A, B), _ in items]
        stats = factor_statistics(torch.stack([A @ A.mT for A, _ in rows]), torch.stack([B.mT @ B for _, B in rows]))
        if tracked:
            grams = [step_grams(A, B, a_rows(before[0]), b_matrix(before[1]))
                     for (A, B), (_, _, before) in zip(rows, items) if before is not None]
            stats.update(step_statistics(torch.stack([g[0] for g in grams]), torch.stack([g[1] for g in grams])))
        keys = list(stats)
        table = torch.stack([stats[k] for k in keys], dim=-1).cpu().tolist()  # the host read
        for (index, _, _), values in zip(items, table):
            out[index] = dict(zip(keys, values))
    return out


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The per-pair rows of :func:`report` summarised for a logger: ``pairs``, ``pairs_<phase>`` (counts), and per
    number ``<key>_mean``, ``<key>_min``, ``<key>_max`` over the pairs where it is defined (not NaN; ``inf`` counts)."""
    rows = list(rows)
    out: dict[str, float] = {"pairs": float(len(rows))}
    for name in sorted({r["phase"] for r in rows}):
        out[f"pairs_{name}"] = float(sum(r["phase"] == name for r in rows))
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)))
    for key in keys:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        if values:
            finite = all(math.isfinite(v) for v in values)
            out[f"{key}_mean"] = statistics.fmean(values) if finite else max(values)
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def report(param_groups: Sequence[dict[str, Any]], state: MutableMapping[Tensor, dict[str, Any]],
           pairs: Sequence[LoraPair], before: list[Factors] | None = None) -> dict[str, Any]:
    """``{"pairs": [row, …], "summary": {…}}``: one row per pair of ``pairs`` (the optimizer's
    :attr:`~sdsopt.SDSAdamW.lora_pairs`, whose order :func:`factor_pairs` follows; ``param_groups``: the groups
    the step runs on, their blocks of stacked factors as pairs of views, :class:`sdsopt.blocks.BlockViews`) with its ``name`` (A's), ``phase``
    and the numbers of the module docstring as Python floats, the step's only where ``before`` (:func:`snapshot`
    taken before the last step) holds the pair at the shape it has now; ``summary`` is :func:`summarise`'s.

    Reads the device once per rank (a host synchronisation); changes nothing.  FSDP2 shards (DTensor factors)
    raise ``NotImplementedError``: their Grams are partial sums.
    """
    factors = factor_pairs(param_groups)
    items: list[tuple[int, Factors, Factors | None]] = []
    for i, (A, B) in enumerate(factors):
        if is_dtensor(A) or is_dtensor(B):
            raise NotImplementedError("SDSAdamW.diagnostics(): FSDP2-sharded (DTensor) factors are not supported")
        old = before[i] if before is not None and len(before) == len(factors) else None
        if old is not None and (old[0].shape != A.shape or old[1].shape != B.shape):
            old = None
        items.append((i, (A, B), old))
    stats = _batched(items)
    phases = [phase(g, state, ia) for g in param_groups for ia, _ in g["lora_pairs"]]
    rows = [{"name": pair.name_a, "phase": phases[i], **stats[i]} for i, pair in enumerate(pairs)]
    return {"pairs": rows, "summary": summarise(rows)}


class StepTracker:
    """Keeps the LoRA factors as they are at the start of one optimizer step, for :func:`report`.

    :meth:`arm` registers a step pre-hook (``torch.optim.Optimizer.register_step_pre_hook``): the next step copies
    the factors (:func:`snapshot`), the step after drops the copy and removes the hook (unless armed again), so
    :attr:`before` always refers to the last step and nothing is kept or run while the tracker is not armed.
    """

    def __init__(self) -> None:
        self._armed = False
        self._before: list[Factors] | None = None
        self._handle: Any = None

    def arm(self, opt: Optimizer) -> None:
        """Copy ``opt``'s factors at the start of its next step."""
        self._armed = True
        if self._handle is None:
            self._handle = opt.register_step_pre_hook(self._pre_step)

    def _pre_step(self, opt: Optimizer, args: Any, kwargs: Any) -> None:
        if self._armed:
            self._armed = False
            self._before = snapshot(opt.param_groups)
            return
        self._before = None
        self._handle.remove()
        self._handle = None

    @property
    def before(self) -> list[Factors] | None:
        """The factors before the last step, if it was tracked."""
        return self._before
