"""The three routes of mode ``sds``'s coordinate step (docs/math.md (2.2), (2.6)), one function each with one
signature, ``(ctx, buckets, plan) -> positions stepped``, and the dispatcher that chooses one per bucket
(:func:`step_coordinates`), as torch's ``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam``:

* :func:`step_fused`: the Triton kernels of :mod:`sdsopt.fused` (``fused=True``; CUDA, or Triton's interpreter);
* :func:`step_per_pair`: torch ops pair by pair, on the CPU for factors in the algebra's dtype of at least
  :data:`PER_PAIR_MIN_NUMEL` elements (the map back an ``addmm_`` on the parameter itself);
* :func:`step_stacked`: torch ops on stacks of a bucket's factors, in chunks of bounded bytes.

Every route computes, for each factor stepped, the frame of its partner's Gram (the Grams of all of the route's
buckets in one batch: :func:`sdsopt.gram_batch.solve_grams`), the coordinates' gradient (2.2), Adam's change of
the coordinates (torch's AdamW on a zero buffer, or the kernel) and the map back (2.6).  What the mode's state
machine decides (the ramp, the cached families) arrives in a :class:`Plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import fused
from ..adam import adamw, side_lr
from ..buckets import Bucket, Bucketing, chunks, fused_bucket, stacked, unstack
from ..coordinates import balance_scales, coordinate_gradient, factor_map, lower_inverse, to_factors_
from ..distributed import is_dtensor, process_group
from ..gram_batch import GramRequest, solve_grams
from ..linalg import algebra_precision, cholesky_lower, gram
from ..pairing import a_rows, b_matrix
from .base import StepContext

__all__ = ["PER_PAIR_MIN_NUMEL", "Frame", "Part", "Plan", "SideStep", "decoupled_decay", "keep_gain", "parts",
           "route_of", "side_steps", "stack_grams", "step_coordinates", "step_fused", "step_per_pair", "step_shift",
           "step_stacked"]

Ramp = float | Tensor | None
"""The ramp factor of a bucket's pairs (a number, ``[k, 1, 1]`` where they differ, ``None``: off)."""


class Plan(NamedTuple):
    """What mode ``sds``'s state machine hands its routes for one step: ``ramp(ids_a, like)``, the ramp of the
    pairs whose A factors are ``ids_a`` (a Tensor in ``like``'s dtype and device where they differ), and the
    mode's cached buckets and families."""

    ramp: Callable[[list[int], Tensor], Ramp]
    bucketing: Bucketing


class Frame(NamedTuple):
    """A batch of pairs' bases for one side (docs/math.md (2.1), (2.6)): the partner's Gram ``K``, the lower
    Cholesky factor ``L`` of ``K + (τ·trace K + μ_s)·I`` (``R = Lᵀ``), ``L^{-1}`` and the map back ``M``
    (:func:`sdsopt.coordinates.factor_map`)."""

    K: Tensor
    L: Tensor
    L_inv: Tensor
    M: Tensor


class Part(NamedTuple):
    """Pairs of one bucket stepped together (a chunk, or the whole bucket), in the algebra's dtype ``dt``, with the
    key of their Grams' factorisation ``(τ, μ_s)``."""

    bucket: Bucket
    dt: torch.dtype
    key: tuple[float, float]


class SideStep(NamedTuple):
    """One factor kind of a :class:`Part` as a route steps it: ``side`` (``"A"``/``"B"``), the factors' indices in
    the group's params, the frame of the partner's Gram, the re-balancing scale (``None``: off) and the ramp."""

    side: str
    ids: list[int]
    frame: Frame
    scale: Tensor | None
    ramp: Ramp


Route = Callable[[StepContext, list[Bucket], Plan], set[int]]

PER_PAIR_MIN_NUMEL = 4096
"""Smallest factor (elements) of a bucket that takes :func:`step_per_pair` on the CPU: below it one dispatched op
per factor costs more than the stacks save; not on GPUs, where the step would be host-bound (measured:
benchmarks/RESULTS.md, section "On a CPU")."""


def _per_pair_route(group: dict[str, Any], bucket: Bucket, dt: torch.dtype) -> bool:
    """Does the bucket take :func:`step_per_pair`?  Factors on the CPU, in the algebra's dtype (no rounding to a
    16-bit parameter dtype to defer), of at least :data:`PER_PAIR_MIN_NUMEL` elements, contiguous, not FSDP2
    shards."""
    params: list[Tensor] = group["params"]
    A, B = params[bucket.a[0]], params[bucket.b[0]]
    return (A.device.type == "cpu" and A.dtype == dt and B.dtype == dt and not (is_dtensor(A) or is_dtensor(B))
            and min(A.numel(), B.numel()) >= PER_PAIR_MIN_NUMEL
            and all(params[i].is_contiguous() for i in bucket.a + bucket.b))


def _algebra(group: dict[str, Any], bucket: Bucket) -> tuple[torch.dtype, float]:
    """The algebra's dtype and τ (docs/math.md (2.5)) of the bucket's Cholesky factorisations."""
    return algebra_precision(group["params"][bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"],
                             "cholesky")


def route_of(group: dict[str, Any], bucket: Bucket) -> Route:
    """The route that steps ``bucket``: the kernels where they take it, else pair by pair or stacked."""
    if fused_bucket(group, bucket):
        return step_fused
    return step_per_pair if _per_pair_route(group, bucket, _algebra(group, bucket)[0]) else step_stacked


def step_coordinates(ctx: StepContext, buckets: list[Bucket], plan: Plan) -> set[int]:
    """Adam on the coordinates (2.2) of the pairs of ``buckets`` and the map back (2.6), each bucket by its
    :func:`route_of`; returns the positions stepped (to be taken out of ``ctx.lists``)."""
    by_route: dict[Route, list[Bucket]] = {step_fused: [], step_per_pair: [], step_stacked: []}
    for bucket in buckets:
        by_route[route_of(ctx.group, bucket)].append(bucket)
    done: set[int] = set()
    for route, mine in by_route.items():
        if mine:
            done |= route(ctx, mine, plan)
    return done


def keep_gain(decay: float | Tensor, scale: Tensor | None, ramp: Ramp) -> tuple[float | Tensor, float | Tensor]:
    """The coefficients of the map back ``X ← keep·X + gain·M·ΔX̃`` (docs/math.md (2.6)): ``keep = c(1 − ρ·decay)``,
    ``gain = c·ρ`` with the decoupled weight decay ``decay = lr·weight_decay`` (it commutes with the map, (2.6)),
    the re-balancing scale ``c`` (``[k, 1, 1]``, ``rebalance=True``) and the ramp ``ρ`` (the first coordinate
    steps; it scales the decay too).  Python numbers where all three are, else Tensors."""
    c: float | Tensor = 1.0 if scale is None else scale
    rho: float | Tensor = 1.0 if ramp is None else ramp
    return c * (1.0 - rho * decay), c * rho


def decoupled_decay(ctx: StepContext) -> float | Tensor:
    """AdamW's decoupled decay ``lr·weight_decay`` on the factors (applied in the map back); 0 on a step skipped
    on the device."""
    decay = ctx.group["lr"] * ctx.group["weight_decay"]
    if ctx.found_inf is not None and not (isinstance(decay, float) and decay == 0.0):
        decay = torch.where(ctx.found_inf > 0, 0.0, decay)
    return decay


def step_shift(group: dict[str, Any], bucket: Bucket) -> float:
    """The step damping ``μ_s = γ·lr·√min(m, n)`` (docs/math.md (2.6)), from the whole factors' shapes: under
    FSDP2 A and B are local shards, and every rank must take the same step."""
    return group["step_damping"] * group["lr"] * math.sqrt(min(bucket.layer))


def parts(group: dict[str, Any], buckets: list[Bucket], *, whole: bool,
          shift: Callable[[dict[str, Any], Bucket], float] = step_shift) -> list[Part]:
    """The buckets as :class:`Part` s: each whole, or in chunks of bounded bytes (:func:`sdsopt.buckets.chunks`);
    ``shift(group, bucket)``: the step damping of their frames (default mode ``sds``'s, :func:`step_shift`)."""
    out = []
    for bucket in buckets:
        dt, tol = _algebra(group, bucket)
        key = (tol, shift(group, bucket))
        out += [Part(piece, dt, key) for piece in ([bucket] if whole else chunks(bucket, dt))]
    return out


def _solve_frame(key: Hashable, K: Tensor) -> Frame:
    """The :class:`Frame` of a batch of Grams ``K`` summed over their shards, ``key = (τ, μ_s)``."""
    tol, shift = key
    L = cholesky_lower(K, tol, shift=shift)
    L_inv = lower_inverse(L)
    return Frame(K, L, L_inv, factor_map(K, L_inv, shift))


GramsOf = Callable[[dict[str, Any], list[int], str, torch.dtype], Tensor]
"""A route's Grams ``[k, r, r]`` of the factors ``ids`` of one kind (``"A"``: ``A Aᵀ``, ``"B"``: ``Bᵀ B``)."""


def side_steps(ctx: StepContext, pieces: list[Part], plan: Plan, grams_of: GramsOf) -> list[list[SideStep]]:
    """Per part, its factor kinds to step (A where it has gradients, with the frame of ``K_B``; B with that of
    ``K_A``), their frames from one Gram batch for all parts, re-balancing scales and ramp."""
    group, params = ctx.group, ctx.group["params"]
    requests, wanted = [], []
    for part in pieces:
        b = part.bucket
        kinds = [("A", b.a, b.b, "B")] if b.has_a else []
        kinds += [("B", b.b, b.a, "A")] if b.has_b else []
        wanted.append([(side, ids, len(requests) + j) for j, (side, ids, _, _) in enumerate(kinds)])
        requests += [GramRequest(grams_of(group, partner, kind, part.dt), process_group(params[partner[0]]),
                                 part.key) for _, _, partner, kind in kinds]
    frames = solve_grams(requests, _solve_frame)
    out = []
    for part, kinds in zip(pieces, wanted):
        mine = {side: frames[j] for side, _, j in kinds}
        scales: dict[str, Tensor] = {}
        if group["rebalance"] and group["lr"] > 0 and len(mine) == 2:  # lr = 0 (a scheduler) moves nothing
            scales = dict(zip("AB", balance_scales(K_A=mine["B"].K, K_B=mine["A"].K)))
            if ctx.found_inf is not None:  # a step skipped on the device leaves the factors as they are
                scales = {k: torch.where(ctx.found_inf > 0, torch.ones_like(c), c) for k, c in scales.items()}
        ramp = plan.ramp(part.bucket.a, frames[kinds[0][2]].K)
        out.append([SideStep(side, ids, mine[side], scales.get(side), ramp) for side, ids, _ in kinds])
    return out


def _adam_change(ctx: StepContext, side: str, pos: list[int], g_t: list[Tensor], change: Tensor) -> None:
    """Adam's change of the coordinates into the zero buffer ``change`` ``[k, …]``: torch's AdamW (the group's
    kernel) without weight decay on the coordinates' gradients ``g_t`` and the factors' moments (its update does
    not depend on the parameter's value apart from the decay, so the buffer ends holding the change, exactly)."""
    lists = ctx.lists
    sub = {key: [lists[key][q] for q in pos] if lists[key] else []
           for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")}
    sub["params"] = list(unstack(change, lists["params"][pos[0]].shape))
    sub["grads"] = g_t
    adamw(ctx.group, sub, lr=side_lr(ctx.group, side), weight_decay=0.0,
          has_complex=any(torch.is_complex(t) for t in sub["params"]), found_inf=ctx.found_inf)


def _pair_grams(group: dict[str, Any], ids: list[int], kind: str, dt: torch.dtype) -> Tensor:
    """:data:`GramsOf` pair by pair (factors already in ``dt``)."""
    params: list[Tensor] = group["params"]
    if kind == "A":
        return torch.stack([gram(a_rows(params[i])) for i in ids])
    return torch.stack([gram(b_matrix(params[i]).mT) for i in ids])


def stack_grams(group: dict[str, Any], ids: list[int], kind: str, dt: torch.dtype) -> Tensor:
    """:data:`GramsOf` of the factors stacked in ``dt`` (one batched product; the stack dropped at once)."""
    return gram(stacked(group, ids, kind, dt)) if kind == "A" else gram(stacked(group, ids, kind, dt).mT)


def step_per_pair(ctx: StepContext, buckets: list[Bucket], plan: Plan) -> set[int]:
    """The coordinate step pair by pair: nothing is stacked; the Grams, coordinates' gradients and the map back
    are one small product per factor, the map back an ``addmm_`` on the parameter itself, while the frames and
    Adam stay batched (a pair's tensors stay in the cache from one product to the next; measured:
    benchmarks/RESULTS.md, section "On a CPU")."""
    lists, done = ctx.lists, set()
    decay = decoupled_decay(ctx)
    for steps in side_steps(ctx, parts(ctx.group, buckets, whole=True), plan, _pair_grams):
        for s in steps:
            pos = [ctx.position[i] for i in s.ids]
            like = lists["params"][pos[0]]
            matrix = a_rows if s.side == "A" else b_matrix
            g_t = [coordinate_gradient(L, matrix(lists["grads"][q]), s.side)
                   for L, q in zip(s.frame.L_inv.unbind(0), pos)]
            if like.dim() != 2:
                g_t = [g.view(like.shape) for g in g_t]
            change = torch.zeros((len(pos), *matrix(like).shape), dtype=like.dtype, device=like.device)
            _adam_change(ctx, s.side, pos, g_t, change)
            keep, gain = (torch.as_tensor(v, dtype=torch.float64).expand(len(pos), 1, 1).reshape(-1).tolist()
                          for v in keep_gain(side_lr(ctx.group, s.side, decay), s.scale, s.ramp))
            for q, delta, Mi, beta, alpha in zip(pos, change.unbind(0), s.frame.M.unbind(0), keep, gain):
                to_factors_(matrix(lists["params"][q]), Mi, delta, s.side, beta, alpha)
            done.update(pos)
    return done


def step_stacked(ctx: StepContext, buckets: list[Bucket], plan: Plan) -> set[int]:
    """The coordinate step on stacks, chunk by chunk (at most :data:`sdsopt.buckets.STACK_CHUNK_BYTES` of stacked
    factors) and factor kind by factor kind: the factors stacked (again after the Grams, so that only one chunk's
    stacks are alive at a time), one batched matmul for the coordinates' gradient, Adam's change, and the map
    back in one ``baddbmm_`` on the stack, rounded once to the parameters' dtype (measured:
    benchmarks/RESULTS.md, section "r > 64 on the GPU")."""
    lists, done = ctx.lists, set()
    decay = decoupled_decay(ctx)
    pieces = parts(ctx.group, buckets, whole=False)
    for part, steps in zip(pieces, side_steps(ctx, pieces, plan, stack_grams)):
        for s in steps:
            pos = [ctx.position[i] for i in s.ids]
            like = lists["params"][pos[0]]
            X = stacked(ctx.group, s.ids, s.side, part.dt)
            G = torch.stack([lists["grads"][q] for q in pos]).to(part.dt).view(X.shape)
            g_t = list(unstack(coordinate_gradient(s.frame.L_inv, G, s.side).to(like.dtype).contiguous(), like.shape))
            del G  # (fused Adam needs the params' layout: contiguous)
            change = torch.zeros(X.shape, dtype=like.dtype, device=like.device)
            _adam_change(ctx, s.side, pos, g_t, change)
            del g_t
            keep, gain = keep_gain(side_lr(ctx.group, s.side, decay), s.scale, s.ramp)
            M = s.frame.M
            if isinstance(keep, Tensor):
                X.mul_(keep)
                keep = 1.0
            if isinstance(gain, Tensor):
                M = M * gain
                gain = 1.0
            to_factors_(X, M, change.to(X.dtype), s.side, keep, gain)
            targets = [lists["params"][q] for q in pos]
            torch._foreach_copy_(targets, unstack(X.to(targets[0].dtype), targets[0].shape))
            del X, change  # spent: free them before the next factor's stacks
            done.update(pos)
    return done


def step_fused(ctx: StepContext, buckets: list[Bucket], plan: Plan) -> set[int]:
    """The coordinate step by the kernels of :mod:`sdsopt.fused`, per family of pairs of one rank and dtype: the
    Grams (four launches), the frames ``(L^{-1}, M)`` and re-balancing scales of all of them (one launch:
    :func:`sdsopt.fused.frames`), and the fused coordinate AdamW update (two launches)."""
    group, tables = ctx.group, ctx.tables
    params: list[Tensor] = group["params"]
    lr = group["lr"]
    moving = isinstance(lr, Tensor) or lr > 0  # lr = 0 (a scheduler) moves nothing, not even the balance
    done: set[int] = set()
    for fi, fam in enumerate(plan.bucketing.families(ctx.gi, group, buckets)):
        key = (ctx.gi, "sds", fi)
        device = params[fam.pairs[0][0]].device
        _, tol = algebra_precision(fam.dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
        K = fused.grams(tables, key, group, fam)
        both = None
        pairs_both = [a and b for a, b in zip(fam.has_a, fam.has_b)]  # re-balanced: both factors stepped
        if group["rebalance"] and moving and any(pairs_both):
            both = tables.constant((key, "both"), pairs_both, device, torch.int32)
        shifts = None  # μ_s = γ·lr·√min(m, n) per pair (step_shift), the same for both Grams of the pair
        if group["step_damping"] > 0 and moving:
            shifts = tables.constant((key, "roots"), fam.roots, device, torch.float32) * (group["step_damping"] * lr)
        G, M, scales = fused.frames(K, fam.k, tol, shifts, both)
        del K
        ramp = plan.ramp([ia for ia, _ in fam.pairs], G)
        if isinstance(ramp, float):  # (a fill, not a host-to-device copy)
            ramp = torch.full((fam.k,), ramp, dtype=torch.float32, device=device)
        elif ramp is not None:
            ramp = ramp.reshape(-1).float()
        done |= fused.adam(tables, key, group, fam, ctx.lists, ctx.position, gmaps=G, mmaps=M,
                           scales=scales, ramps=ramp, found_inf=ctx.found_inf)
    return done
