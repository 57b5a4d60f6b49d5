"""The gradient-aligned start (``gradient_start=True``, docs/math.md (2.8)): at a pair's first step, with LoRA's
``B = 0``, the rows of ``A`` become the top-r right singular vectors of the full gradient ``G`` of that step, so
that ``W = W0 + s·B·A`` is unchanged and ``B``'s first gradient ``G·Aᵀ`` holds the top-r part of ``G``.

Pure functions on tensors (:func:`top_right_basis`, :func:`aligned_rows`), the pairs still to start
(:func:`waiting_pairs`: listed before a step creates their state, and after it to tell whether the recording may
stop), the start itself (:func:`start_pairs`, run once the step is known not to be skipped), which reads the
recorded ``(X, δ)`` of :class:`sdsopt.capture.LoraCapture`, and the recording's choices (:func:`starts_pending`:
may a pair still start; :func:`recording_roots`: which modules the optimizer records by itself;
:func:`keeps_recording`: whether a recording goes on once every pair started).

Choices the maths leaves open, made here:

* Only pairs whose ``B`` is exactly zero are started (then ``BA = 0`` before and after: the model's function is
  unchanged, no frozen weight needs the correction LoRA-GA applies to ``W0``); a pair with ``B ≠ 0`` keeps its
  factors and a warning names it once.
* The rows' scale: ``A``'s root-mean-square row norm ``‖A‖_F/√r`` (so ``‖A‖_F`` and with it the step sizes the
  user tuned for their init stay as they were); an all-zero ``A`` gets rows of norm ``3^{-1/2}``, what PEFT's
  Kaiming-uniform init gives in expectation.
* The step is not spent on the start: ``B``'s gradient is recomputed at the new ``A`` from the recorded
  ``G``, ``gB = G·Aᵀ`` (exactly the gradient autograd gives at the new ``A``, since the forward is unchanged), and
  the step goes on with it; ``gA = Bᵀ·G`` is zero before and after.  The recorded ``G`` is that of the loss the
  backward ran on, the gradients the step is handed may be rescaled since (``GradScaler.unscale_`` divides them
  by the loss scale, ``clip_grad_norm_`` multiplies them by its factor): the new ``gB`` is ``ρ·G·Aᵀ`` with ``ρ``
  the least-squares fit of the old one, ``gB₀ ≈ ρ·G·A₀ᵀ`` (1 up to rounding without such a rescaling; 1 where
  ``G·A₀ᵀ = 0``).
* The top-r basis is not a full SVD of ``G`` (a 1536 × 576 float32 SVD is a chain of host-synchronised solver
  calls on a GPU, ~0.1 s, for each of an LLM's ~200 pairs): :func:`top_right_basis` runs block subspace
  iteration, ``k = min(max(2r, r + 8), m, n)`` columns (oversampling ``k − r``), :data:`POWER_STEPS`
  products with ``GᵀG`` re-orthonormalised by QR, then a Rayleigh–Ritz step (``eigh`` of the k × k
  ``Qᵀ GᵀG Q``).  Matrix products and small factorisations, batched over the pairs of one shape, the host
  waiting once per shape.  Its error in the captured energy ``‖G Vᵀ‖²`` against the exact top-r one is of order
  ``(σ_{k+1}/σ_r)^{2·POWER_STEPS}``; where ``k = min(m, n)`` it is exact.  The start vector is Gaussian from a
  generator of fixed seed on ``G``'s device (the global RNG, dropout's, is left untouched; the same batch gives
  the same rows on the same device).
* Under DDP the recorded ``G`` is a rank's own: it is averaged over the default process group (one all-reduce
  per pair on this one step) so every rank starts from the same rows.  Sharded (DTensor) factors are refused.
* A batch whose ``G`` is not finite starts nothing for that pair (the step goes on as without the option); the
  pair starts at its next step with a finite ``G``, if it has not been stepped yet.  A step that
  ``skip_nonfinite`` skips starts nothing and leaves the pairs still to start without Adam state, so they start at
  the next step.
* Where ``G`` has rank below ``r`` the remaining rows are further orthonormal vectors (any completion is valid).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import naming
from .capture import LoraCapture
from .distributed import is_dtensor
from .linalg import algebra_precision

__all__ = ["POWER_STEPS", "Waiting", "aligned_rows", "keeps_recording", "recording_roots", "start_pairs",
           "starts_pending", "top_right_basis", "waiting_pairs"]

_DEFAULT_ROW_NORM = 3.0 ** -0.5  # E‖row‖ of PEFT's Kaiming-uniform A (entries U(±n^{-1/2}))
POWER_STEPS = 4  # products with GᵀG in top_right_basis (error ~ (σ_{k+1}/σ_r)^8)
_SEED = 20_260_608  # the start vector's generator seed (fixed: a start does not depend on the global RNG)


def top_right_basis(G: Tensor, r: int, power_steps: int = POWER_STEPS) -> Tensor:
    """``r × n`` orthonormal rows spanning ``G``'s top-r right singular subspace (docs/math.md (2.8)), in ``G``'s
    dtype, for one ``m × n`` matrix or a batch ``[..., m, n]`` (``r ≤ min(m, n)``): block subspace iteration with
    oversampling and a Rayleigh–Ritz step (the module's docstring gives the accuracy), the rows in descending
    order of their singular values, each signed so that its entry of largest magnitude is positive (a singular
    vector's sign is arbitrary; this one does not depend on rounding)."""
    m, n = G.shape[-2:]
    k = min(max(2 * r, r + 8), m, n)
    gen = torch.Generator(device=G.device).manual_seed(_SEED)
    Q = torch.randn((*G.shape[:-2], n, k), generator=gen, device=G.device, dtype=G.dtype)
    Gt = G.mT
    for _ in range(power_steps):
        Q = torch.linalg.qr(Gt @ (G @ Q)).Q  # (Householder QR: orthonormal columns also where G is rank-deficient)
    Z = G @ Q
    _, W = torch.linalg.eigh(Z.mT @ Z)  # ascending Ritz values of GᵀG on span(Q)
    V = (Q @ W[..., -r:].flip(-1)).mT
    peak = V.gather(-1, V.abs().argmax(-1, keepdim=True))  # the sign: each row's largest entry is positive
    return V * torch.where(peak < 0, -1.0, 1.0).to(V.dtype)


def aligned_rows(A: Tensor, V: Tensor) -> Tensor:
    """(2.8)'s new ``A``: the rows ``V`` scaled to ``A``'s root-mean-square row norm ``‖A‖_F/√r`` (``3^{-1/2}``
    for an all-zero ``A``), in ``V``'s dtype."""
    norm = torch.linalg.vector_norm(A.to(V.dtype)) / math.sqrt(A.shape[0])
    return V * torch.where(norm > 0, norm, torch.full_like(norm, _DEFAULT_ROW_NORM))


def _full_gradient(capture: LoraCapture, A: Tensor, B: Tensor, dtype: torch.dtype) -> Tensor:
    """The recorded ``G`` (m × n), averaged over the ranks of the default process group under DDP."""
    G = capture.full(A, B, dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(G)
        G /= dist.get_world_size()
    return G


def _check(A: Tensor, B: Tensor, capture: LoraCapture | None, name: str) -> None:
    """Refuse what the start cannot take: sharded factors, and pairs whose layers were not recorded."""
    if is_dtensor(A) or is_dtensor(B):
        raise RuntimeError(f"SDSAdamW: gradient_start=True does not support sharded factors ({name!r} is a "
                           "DTensor shard); start from PEFT's init (gradient_start=False).")
    if capture is None or not capture.has(A):
        raise RuntimeError(
            f"SDSAdamW: gradient_start=True needs the LoRA layers' inputs and output gradients of the first "
            f"batch, and none were recorded for {name!r}. The optimizer records them itself from the model passed "
            "as params, else from the live nn.Module holding the factors (as weights of nn.Linear layers: PEFT's "
            "Linear LoRA); it found none that holds these. Pass the model itself (SDSAdamW(model, ...)), or call "
            "opt.attach(model) before the first forward pass.")


Waiting = list[tuple[int, int, Tensor, Tensor]]
"""Pairs still to start, as :func:`waiting_pairs` lists them: ``(group, index_A, A, B)``."""


def waiting_pairs(groups: list[dict[str, Any]], state: MutableMapping[Tensor, dict[str, Any]]) -> Waiting:
    """The pairs of ``gradient_start`` groups still to start: both factors trainable, never stepped (no Adam
    state).  Before a step (ahead of the state it creates), the pairs it may start; after it, an empty list says
    that the recording the start needed may stop.  Groups without the key (checkpoints from before the option)
    have none."""
    return [(gi, ia, A, B) for gi, group in enumerate(groups) if group.get("gradient_start", False)
            for ia, ib in group["lora_pairs"] for A, B in [(group["params"][ia], group["params"][ib])]
            if A.requires_grad and B.requires_grad
            and "step" not in state.get(A, {}) and "step" not in state.get(B, {})]


def start_pairs(groups: list[dict[str, Any]], waiting: Waiting, capture: LoraCapture | None,
                names: Callable[[int], list[str] | None]) -> None:
    """(2.8) for the ``waiting`` pairs (:func:`waiting_pairs`, listed before the step created their state) that have
    gradients: ``A`` from the recorded ``G``, ``B``'s gradient recomputed at the new ``A``; the pairs of one shape in
    one batched :func:`top_right_basis`.  Raises ``RuntimeError`` (with the fix) when the layers' inputs were not
    recorded; ``names(gi)`` names the parameters of group ``gi`` in the messages (asked only for a pair that
    starts)."""
    buckets: dict[tuple[Any, ...], list[tuple[Tensor, Tensor, str]]] = defaultdict(list)
    for gi, ia, A, B in waiting:
        if A.grad is None or B.grad is None:
            continue
        group_names = names(gi)
        name = group_names[ia] if group_names else f"param group {gi}, params[{ia}]"
        _check(A, B, capture, name)
        if A.dim() != 2 or A.shape[0] > min(A.shape[1], B.shape[0]):
            continue  # (r > min(m, n): no r-dimensional top subspace to take; PEFT's init stays)
        dt, _ = algebra_precision(A.dtype, groups[gi]["linalg_dtype"], None, "cholesky")
        buckets[(B.shape[0], A.shape[1], A.shape[0], dt, A.device)].append((A, B, name))
    for (m, n, r, dt, device), members in buckets.items():
        Gs = torch.empty((len(members), m, n), dtype=dt, device=device)  # (one bucket's G at a time, formed in place)
        for i, (A, B, _) in enumerate(members):
            Gs[i] = _full_gradient(capture, A, B, dt)
        _start_bucket(members, Gs, r)


def _start_bucket(members: list[tuple[Tensor, Tensor, str]], Gs: Tensor, r: int) -> None:
    """The start of pairs of one shape (``Gs``: their ``G``, stacked): one batched basis, one host read of which
    pairs may start (``B = 0``, finite ``G``).  ``B``'s new gradient is ``ρ·G·Aᵀ`` in the units of the one it
    replaces, ``ρ`` the least-squares fit ``gB ≈ ρ·G·A₀ᵀ`` (1 where ``G·A₀ᵀ = 0``)."""
    A0s = torch.stack([A.detach().to(Gs.dtype) for A, _, _ in members])
    gBs = torch.stack([B.grad.to(Gs.dtype) for _, B, _ in members])
    zero_b = torch.stack([B.detach().eq(0).all() for _, B, _ in members])
    finite = torch.isfinite(Gs).flatten(1).all(1)
    # a non-finite G would poison the batched QR of its neighbours: zero it (its pair does not start)
    Gs.masked_fill_(~finite[:, None, None], 0.0)
    V = top_right_basis(Gs, r)
    fit = Gs @ A0s.mT  # (autograd's gB at A₀, up to the factor a GradScaler or clip_grad_norm_ put on the gradients)
    num, den = (fit * gBs).sum((1, 2)), (fit * fit).sum((1, 2))
    rho = torch.where((den > 0) & torch.isfinite(num / den), num / den, torch.ones_like(den))
    for (A, B, name), G, v, scale, is_zero, ok in zip(members, Gs, V, rho, zero_b.tolist(), finite.tolist()):
        if not is_zero:
            warnings.warn(f"SDSAdamW: gradient_start=True leaves the pair of {name!r} as it is: its B is not "
                          "zero, so a new A would change B·A (the model's function). Start from LoRA's zero B.",
                          stacklevel=4)
            continue
        if not ok:
            continue  # (a non-finite batch: the pair starts at its next step, AdamW's semantics for this one)
        A.copy_(aligned_rows(A.detach(), v).to(A.dtype))
        B.grad.copy_((scale * (G @ A.to(G.dtype).T)).to(B.grad.dtype))


def recording_roots(groups: list[dict[str, Any]], model: nn.Module | None) -> list[nn.Module]:
    """The modules whose LoRA layers the optimizer records by itself for the start: ``model`` (the one passed as
    ``params``) if given, else the outermost live modules holding the ``A`` factors of the groups with
    ``gradient_start`` (:func:`sdsopt.naming.holders`); none for factors no module holds (:func:`start_pairs`
    then raises, naming the fix)."""
    if model is not None:
        return [model]
    return naming.holders([g["params"][ia] for g in groups if g.get("gradient_start") for ia, _ in g["lora_pairs"]])


def starts_pending(groups: list[dict[str, Any]], done: bool) -> bool:
    """May a pair still take its gradient-aligned start: a group has ``gradient_start`` and the optimizer has not
    seen every pair started (``done``, set after a step that left none waiting)?"""
    return not done and any(g.get("gradient_start") for g in groups)


def keeps_recording(groups: list[dict[str, Any]], done: bool) -> bool:
    """Whether a recording goes on after every pair started (``attach(keep=None)``): where a group is in mode
    ``svd_oracle`` (which needs the layers' inputs at every step) or no start is pending (:func:`starts_pending`:
    the recording is not there for the start)."""
    return any(g["mode"] == "svd_oracle" for g in groups) or not starts_pending(groups, done)
