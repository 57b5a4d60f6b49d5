"""Mode ``sds`` (the default): Adam in the coordinates of the factors' orthonormal bases, docs/math.md §2.

Before Adam, every pair past its warm-up becomes its coordinates ``Ã = R_B A``, ``B̃ = B R_Aᵀ`` with their
gradients (2.2) and is stepped here, bucket by bucket (torch ops) or family by family (the Triton kernels of
:mod:`sdsopt.fused` with ``fused=True`` on CUDA); after Adam, the pair's steps are counted and a pair that ends
its warm-up is re-split and its Adam state reset (2.4).  The geometry is :mod:`sdsopt.coordinates`.

Choices the maths leaves open, made here:

* The map back: torch's AdamW kernel (foreach/fused, so its semantics apply) steps a zero buffer in the
  parameter's dtype with the coordinates' gradients and moments: AdamW's update does not depend on the
  parameter's value apart from the decoupled weight decay, so the buffer ends holding Adam's *change* of the
  coordinates, exactly (the coordinates themselves are never formed).  The factor is updated by the mapped change
  and the decay, ``A ← A(1−ηλ) + M_B·ΔÃ`` (2.6; the decay commutes with the map), in float32 or better: a step
  that Adam leaves at zero leaves the factor bit-identical, and bf16/fp16 factors are rounded once per step as
  under AdamW.  Coordinate gradients are never stored between steps; the moments live in coordinates, in the
  factors' own ``exp_avg``/``exp_avg_sq`` (state stays AdamW-sized, plus the pair's count ``sds_warmup``).
* Rank deficiency (2.5): the Cholesky factors are of ``K + τ·trace(K)·I`` always (no data-dependent branch, no
  host synchronisation); ``K = 0`` gives ``R = I`` (a plain AdamW step), a failed factorisation an isotropic
  ``R``.  Any invertible ``R`` is an exact change of coordinates, so this changes how orthonormal ``Q`` is, never
  the gradient's correctness.
* LoRA-FA pairs (one factor frozen): only the trainable factor moves, in its coordinates; the warm-up count
  advances when either factor has a gradient.  Such pairs, and pairs with ``r > min(m, n)`` (whose core is
  rank-deficient, so the re-split's null-space basis would be set by rounding), are not re-split; their Adam
  state is still reset.
* A non-finite factor gives ``R = I``: its partner takes a plain AdamW step instead of a factorisation raising.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import MutableMapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import fused
from ..adam import adamw, side_lr
from ..buckets import Bucket, chunks, drop_positions, split_fused, stacked, stacked_factors, unstack
from ..coordinates import balance_scales, coordinate_gradient, factor_map, lower_inverse, resplit_maps, to_factors_
from ..distributed import is_dtensor, local, process_group, reduce_parts
from ..linalg import algebra_precision, cholesky_lower, gram
from ..pairing import a_rows, b_matrix
from .base import MapBack, Mode, StepContext

__all__ = ["SDS"]


def _keep_gain(decay: float | Tensor, scale: Tensor | None, ramp: float | Tensor | None
               ) -> tuple[float | Tensor, float | Tensor]:
    """The coefficients of the map back ``X ← keep·X + gain·M·ΔX̃`` (docs/math.md (2.6)): ``keep = c(1 − ρ·decay)``,
    ``gain = c·ρ`` with the decoupled weight decay ``decay = lr·weight_decay`` (it commutes with the map, (2.6)),
    the re-balancing scale ``c`` (``[k, 1, 1]``, ``rebalance=True``) and the ramp ``ρ`` (the first coordinate
    steps; it scales the decay too).  Python numbers where all three are, else Tensors."""
    c: float | Tensor = 1.0 if scale is None else scale
    rho: float | Tensor = 1.0 if ramp is None else ramp
    return c * (1.0 - rho * decay), c * rho


def _map_back(side: str, M: Tensor, X: Tensor, change: Tensor, targets: list[Tensor], decay: float | Tensor,
              scale: Tensor | None, ramp: float | Tensor | None) -> None:
    """Mode ``sds``: write into ``targets`` the factors ``X`` (one chunk's, one kind, float32 or better) moved by
    the mapped change of their coordinates, ``X ← keep·X + gain·M·change`` (:func:`_keep_gain`, (2.6)): one
    batched ``baddbmm_`` on ``X`` (:func:`sdsopt.coordinates.to_factors_`), rounded once to the parameters' dtype.

    ``change`` is Adam's change of the coordinates: the buffer, zero before, that Adam updated without weight
    decay (the update of AdamW does not depend on the parameter's value apart from the decay), so the
    coordinates themselves are never formed, and the change is exact in the parameter's dtype (no difference
    of two rounded coordinates: a step Adam leaves at zero, with ``keep = 1``, leaves the factor bit-identical).
    ``X`` is updated in place and is spent afterwards.
    """
    keep, gain = _keep_gain(decay, scale, ramp)
    if isinstance(keep, Tensor):
        X.mul_(keep)
        keep = 1.0
    if isinstance(gain, Tensor):
        M = M * gain
        gain = 1.0
    to_factors_(X, M, change.to(X.dtype), side, keep, gain)
    torch._foreach_copy_(targets, unstack(X.to(targets[0].dtype), targets[0].shape))


def _map_back_pairs(side: str, M: Tensor, targets: list[Tensor], change: Tensor, decay: float | Tensor,
                    scale: Tensor | None, ramp: float | Tensor | None) -> None:
    """:func:`_map_back` pair by pair, in place on the parameters ``targets`` (the CPU route of
    :meth:`SDS._step_torch`; ``change`` ``[k, …]`` in row form): one ``addmm_`` each, its coefficients read on
    the host (CPU tensors: no synchronisation to pay)."""
    k = len(targets)
    matrix = a_rows if side == "A" else b_matrix
    keep, gain = (torch.as_tensor(v, dtype=torch.float64).expand(k, 1, 1).reshape(-1).tolist()
                  for v in _keep_gain(decay, scale, ramp))
    for X, delta, Mi, beta, alpha in zip(targets, change.unbind(0), M.unbind(0), keep, gain):
        to_factors_(matrix(X), Mi, delta, side, beta, alpha)


PER_PAIR_MIN_NUMEL = 4096
"""Smallest factor (elements) of a bucket that takes the per-pair CPU route: below it one dispatched op per
factor costs more than the stacks save (2-core CPU, 8 layers × 7 pairs, per-pair / stacked step time: factors of
1024 elements 1.12, 2048: 1.01–1.08, 4096: 0.93–0.95, 8192: 0.82; 16 384 (``small``, r = 16): 0.70).  Not on
GPUs, where the step would be host-bound: on an H200 at r = 256 (llama7b shapes, 224 pairs) per pair took 54 ms
of host time against the stacked route's 45 ms step."""


def _per_pair_route(group: dict[str, Any], bucket: Bucket, dt: torch.dtype) -> bool:
    """Does the bucket take :meth:`SDS._step_torch`'s per-pair CPU route?  Factors on the CPU, in the algebra's
    dtype (no rounding to a 16-bit parameter dtype to defer), of at least :data:`PER_PAIR_MIN_NUMEL` elements,
    contiguous, not FSDP2 shards."""
    params: list[Tensor] = group["params"]
    A, B = params[bucket.a[0]], params[bucket.b[0]]
    return (A.device.type == "cpu" and A.dtype == dt and B.dtype == dt and not (is_dtensor(A) or is_dtensor(B))
            and min(A.numel(), B.numel()) >= PER_PAIR_MIN_NUMEL
            and all(params[i].is_contiguous() for i in bucket.a + bucket.b))


class Frame(NamedTuple):
    """A batch of pairs' bases for one side (docs/math.md (2.1), (2.6)): the partner's Gram ``K``, the lower Cholesky factor
    ``L`` of ``K + (τ·trace K + μ_s)·I`` (``R = Lᵀ``), ``L^{-1}`` and the map back ``M`` (:func:`factor_map`)."""

    K: Tensor
    L: Tensor
    L_inv: Tensor
    M: Tensor


def _frames(requests: list[tuple[Tensor, Any, float, float]]) -> list[Frame]:
    """The :class:`Frame` of every Gram batch of ``requests`` = ``(K, process group, τ, step shift μ_s)``,
    ``K`` summed over its process group.

    All Grams of a step that share an r, dtype, device, τ, step shift and process group go through *one*
    all-reduce (FSDP2 shards: the Grams of local shards are partial sums), *one* ``cholesky_ex`` call, one
    triangular inverse and one map, so neither the collectives nor the launches grow with the pair count or
    the number of shape buckets.
    """
    pending: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for j, (K, pg, tol, shift) in enumerate(requests):
        pending[(K.shape[-1], K.dtype, K.device, tol, pg, shift)].append(j)
    stacked = reduce_parts({key: torch.cat([requests[j][0] for j in js]) for key, js in pending.items()},
                           lambda key: (key[4], key[1], key[2]))
    out: list[Frame] = [Frame(*[torch.empty(0)] * 4)] * len(requests)
    for key, js in pending.items():
        sizes = [requests[j][0].shape[0] for j in js]
        K = stacked[key]
        L = cholesky_lower(K, key[3], shift=key[5])
        L_inv = lower_inverse(L)
        M = factor_map(K, L_inv, key[5])
        for j, parts in zip(js, zip(*(t.split(sizes) for t in (K, L, L_inv, M)))):
            out[j] = Frame(*parts)
    return out


class SDS(Mode):
    """``sds``: Adam on the coordinates of the factors in their orthonormal bases (docs/math.md (2.1)–(2.6)), after a
    per-pair warm-up of plain AdamW steps that ends with the re-split (2.4) and a reset of the pair's state."""

    name = "sds"
    routes = ("cholesky",)
    state_keys = ("sds_warmup",)

    def __init__(self) -> None:
        super().__init__()
        self._settled: dict[int, tuple[int, int]] = {}  # groups past every pair's warm-up and ramp

    @classmethod
    def validate(cls, group: dict[str, Any]) -> str | None:
        if group["decouple_sigma"]:
            return ("decouple_sigma=True is not defined for mode='sds' (its singular values live in the r×r core "
                    "R_B·R_Aᵀ and move through both coordinates); use mode='sds_polar' for the singular-value channel")
        return None

    def _buckets(self, ctx: StepContext) -> list[Bucket]:
        """The group's buckets, each pair's phase being whether it is past its warm-up (in coordinates)."""
        pairs = ctx.group["lora_pairs"]
        if self.settled(ctx.group):  # every pair in coordinates: no per-pair state lookups
            phases: list[bool] | tuple[bool, ...] = (True,) * len(pairs)
        else:
            phases = [self.in_coordinates(ctx.state, ctx.group, ia) for ia, _ in pairs]
        return self.bucketing.buckets(ctx.gi, ctx.group, ctx.position, phases)

    def host_decision(self, group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]]) -> bool:
        return not self.settled(group) and any(self.counting(state, group, ia) for ia, _ in group["lora_pairs"])

    def settled(self, group: dict[str, Any]) -> bool:
        """Mode ``sds``: has every pair of the group finished its warm-up and ramp?  (Then nothing is counted on
        the host any more: the per-pair loops of the step are skipped.)  Recorded by :meth:`_advance` with the
        group's ``warmup_steps`` and ``coordinate_ramp``, so changing them re-opens the count."""
        return self._settled.get(id(group)) == (group["warmup_steps"], group["coordinate_ramp"])

    def transform(self, ctx: StepContext) -> MapBack:
        """Step every pair past its warm-up here, bucket by bucket (:meth:`_step_coordinates`), and take those
        factors out of ``ctx.lists``: the common Adam call then updates the rest (warm-up pairs, other parameters)."""
        self._step_coordinates(ctx)
        return lambda: self._advance(ctx.state, ctx.group, ctx.position)

    @staticmethod
    def in_coordinates(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: has the pair whose A factor is ``group['params'][ia]`` finished its warm-up?"""
        return state.get(group["params"][ia], {}).get("sds_warmup", 0) >= group["warmup_steps"]

    @staticmethod
    def counting(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: is the pair's step count still read on the host (warm-up or coordinate ramp)?"""
        count = state.get(group["params"][ia], {}).get("sds_warmup", 0)
        return count < group["warmup_steps"] + max(group["coordinate_ramp"] - 1, 0)

    def _ramp(self, state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], ids_a: list[int],
              like: Tensor) -> float | Tensor | None:
        """The factors ``min(1, (n − warmup_steps + 1)/coordinate_ramp)`` of pairs at count ``n`` (``[k, 1, 1]``
        if they differ), or ``None`` once every pair of the bucket is past its ramp."""
        ramp, start = group["coordinate_ramp"], group["warmup_steps"]
        if ramp <= 1 or self.settled(group):
            return None
        c = [min(1.0, (state[group["params"][i]].get("sds_warmup", 0) - start + 1) / ramp) for i in ids_a]
        if all(v == 1.0 for v in c):
            return None
        if all(v == c[0] for v in c):
            return c[0]
        return torch.tensor(c, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _step_coordinates(self, ctx: StepContext) -> None:
        """Mode ``sds``: Adam on the coordinates (2.2) of every pair past its warm-up, and the map back: with
        ``fused=True`` on CUDA by the Triton kernels (:meth:`_step_fused`), else by torch ops
        (:meth:`_step_torch`); the pairs stepped are taken out of ``ctx.lists``."""
        buckets = [b for b in self._buckets(ctx) if b.phase]
        kernel, rest = split_fused(ctx.group, buckets)
        done = self._step_fused(ctx, kernel) if kernel else set()
        if rest:
            done |= self._step_torch(ctx, rest)
        drop_positions(ctx.lists, done)

    def _step_fused(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """:meth:`_step_coordinates` by the kernels of :mod:`sdsopt.fused`, per family of pairs of one rank and
        dtype: the Grams (four launches), the frames ``(L^{-1}, M)`` and re-balancing scales of all of them (one
        launch: :func:`sdsopt.fused.frames`), and the fused coordinate AdamW update (two launches).  Returns the
        positions stepped."""
        group, tables = ctx.group, ctx.tables
        params: list[Tensor] = group["params"]
        lr = group["lr"]
        done: set[int] = set()
        for fi, fam in enumerate(self.bucketing.families(ctx.gi, group, buckets)):
            key = (ctx.gi, "sds", fi)
            device = params[fam.pairs[0][0]].device
            _, tol = algebra_precision(fam.dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
            K = fused.grams(tables, key, group, fam)
            both = None
            pairs_both = [a and b for a, b in zip(fam.has_a, fam.has_b)]  # re-balanced: both factors stepped
            # lr = 0 (a scheduler) moves nothing, not even the balance (a Tensor lr: decided in the kernel)
            if group["rebalance"] and (isinstance(lr, Tensor) or lr > 0) and any(pairs_both):
                both = tables.constant((key, "both"), pairs_both, device, torch.int32)
            # μ_s = γ·lr·√min(m, n) per pair (see the class docstring), the same for both Grams of the pair
            shifts = None
            if group["step_damping"] > 0 and (isinstance(lr, Tensor) or lr > 0):
                roots = tables.constant((key, "roots"), fam.roots, device, torch.float32)
                shifts = roots * (group["step_damping"] * lr)
            G, M, scales = fused.frames(K, fam.k, tol, shifts, both)
            del K
            ramp = self._ramp(ctx.state, group, [ia for ia, _ in fam.pairs], G)
            if isinstance(ramp, float):  # (a fill, not a host-to-device copy)
                ramp = torch.full((fam.k,), ramp, dtype=torch.float32, device=device)
            elif ramp is not None:
                ramp = ramp.reshape(-1).float()
            done |= fused.adam(tables, key, group, fam, ctx.lists, ctx.position, gmaps=G, mmaps=M,
                               scales=scales, ramps=ramp, found_inf=ctx.found_inf)
        return done

    def _step_torch(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """:meth:`_step_coordinates` by torch ops; returns the positions stepped.

        First, per shape bucket, in chunks of at most :data:`sdsopt.buckets.STACK_CHUNK_BYTES` of stacked factors
        (:func:`sdsopt.buckets.chunks`): one stack of each factor kind and one batched Gram, the stacks dropped
        at once; then all r×r frames of the step together (:func:`_frames`).  Then chunk by chunk and factor by
        factor: the factor stacked again, one batched matmul (the coordinates' gradient), torch's Adam
        (:func:`sdsopt.adam.adamw`, the group's kernel) on a zero buffer with the factors' moments (the
        coordinates' change, see the module docstring) and the map back in one ``baddbmm_`` (:func:`_map_back`),
        so that only one chunk's buffers are alive at a time (Adam is elementwise: one call per chunk updates
        every tensor as one call for all would).  Stacking twice costs one more pass over the factors, which the
        one-product map back pays for; keeping every bucket's stacks from the Grams to the map back held 37–43 %
        more memory at the same step time (benchmarks/RESULTS.md, "r > 64 on the GPU": H200, llama7b shapes,
        r = 256 fp32 4.5 → 2.9 GB).

        On the CPU (:func:`_per_pair_route`) nothing is stacked: the Grams, coordinate gradients and the map back are
        one small product per factor, the map back an ``addmm_`` on the parameter itself (:func:`_map_back_pairs`),
        and the frames and Adam stay batched.  A stack is one more pass over memory, while a pair's tensors stay
        in the cache from one small product to the next (benchmarks/RESULTS.md, the CPU table: 2 cores,
        ``small`` shapes, r = 16: 10.5 → 6.9 ms).
        """
        group, position, lists = ctx.group, ctx.position, ctx.lists
        params: list[Tensor] = group["params"]
        requests: list[tuple[Tensor, Any, float, float]] = []
        work = []
        for bucket in buckets:
            dt, tol = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
            per_pair = _per_pair_route(group, bucket, dt)
            # the step damping μ_s = γ·lr·√min(m, n) (see the class docstring), from the whole factors'
            # shapes: under FSDP2 A and B are local shards, and every rank must take the same step
            m, n = bucket.b_shape[0], math.prod(bucket.a_shape[1:])
            shift = group["step_damping"] * group["lr"] * math.sqrt(min(m, n))
            for part in [bucket] if per_pair else chunks(bucket, dt):
                sides = []
                if part.has_a:  # Ã needs R_B
                    sides.append(("A", part.a, len(requests)))
                    K_B = (torch.stack([gram(b_matrix(params[i]).mT) for i in part.b]) if per_pair
                           else gram(stacked(group, part.b, "B", dt).mT))
                    requests.append((K_B, process_group(params[part.b[0]]), tol, shift))
                if part.has_b:  # B̃ needs R_A
                    sides.append(("B", part.b, len(requests)))
                    K_A = (torch.stack([gram(a_rows(params[i])) for i in part.a]) if per_pair
                           else gram(stacked(group, part.a, "A", dt)))
                    requests.append((K_A, process_group(params[part.a[0]]), tol, shift))
                work.append((sides, part.a, per_pair, dt))
        frames = _frames(requests)
        decay = group["lr"] * group["weight_decay"]  # AdamW's decoupled decay, on the factors (_map_back)
        if ctx.found_inf is not None and not (isinstance(decay, float) and decay == 0.0):
            decay = torch.where(ctx.found_inf > 0, 0.0, decay)  # a skipped step does not decay either
        done: set[int] = set()
        for sides, a_ids, per_pair, dt in work:
            scales = {}
            if group["rebalance"] and group["lr"] > 0 and len(sides) == 2:  # lr = 0 (a scheduler) moves nothing
                (_, _, j_a), (_, _, j_b) = sides  # side A's request holds K_B, side B's holds K_A
                scales = dict(zip("AB", balance_scales(K_A=frames[j_b].K, K_B=frames[j_a].K)))
                if ctx.found_inf is not None:  # a step skipped on the device leaves the factors as they are
                    scales = {k: torch.where(ctx.found_inf > 0, torch.ones_like(c), c) for k, c in scales.items()}
            ramp = self._ramp(ctx.state, group, a_ids, frames[sides[0][2]].K)
            for side, ids, j in sides:
                pos = [position[i] for i in ids]
                like = lists["params"][pos[0]]
                frame = frames[j]
                matrix = a_rows if side == "A" else b_matrix
                if per_pair:
                    g_t = [coordinate_gradient(L, matrix(lists["grads"][q]), side)
                           for L, q in zip(frame.L_inv.unbind(0), pos)]
                    if like.dim() != 2:
                        g_t = [g.view(like.shape) for g in g_t]
                    rows = (len(pos), *matrix(like).shape)
                else:
                    X = stacked(group, ids, side, dt)  # re-stacked: only one chunk's stacks are alive at a time
                    G = torch.stack([lists["grads"][q] for q in pos]).to(dt).view(X.shape)
                    stack = coordinate_gradient(frame.L_inv, G, side)
                    del G
                    stack = stack.to(like.dtype).contiguous()  # fused Adam needs the params' layout
                    g_t = list(unstack(stack, like.shape))
                    rows = X.shape
                change = torch.zeros(rows, dtype=like.dtype, device=like.device)  # Adam's change (_map_back)
                sub = {key: [lists[key][q] for q in pos] if lists[key] else []
                       for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")}
                sub["params"] = list(unstack(change, like.shape))
                sub["grads"] = g_t
                adamw(group, sub, lr=side_lr(group, side), weight_decay=0.0,
                      has_complex=any(torch.is_complex(t) for t in sub["params"]), found_inf=ctx.found_inf)
                del g_t
                targets = [lists["params"][q] for q in pos]
                side_decay = side_lr(group, side, decay)  # B's decay at b_lr_ratio·lr too (2.7)
                if per_pair:
                    _map_back_pairs(side, frame.M, targets, change, side_decay, scales.get(side), ramp)
                else:
                    _map_back(side, frame.M, X, change, targets, side_decay, scales.get(side), ramp)
                    del X
                del sub, change  # spent: free them before the next factor's stacks
                done.update(pos)
        return done

    def _advance(self, state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any],
                 position: dict[int, int]) -> None:
        """Mode ``sds`` after Adam: count the pair's steps (warm-up, then the coordinate ramp); pairs that just
        finished the warm-up are re-split (2.4) (if ``resplit``) and their Adam state reset, so that their moments
        start in coordinates."""
        if self.settled(group):
            return
        params: list[Tensor] = group["params"]
        finished: list[tuple[int, int]] = []
        counting = False
        for ia, ib in group["lora_pairs"]:
            if not self.counting(state, group, ia):
                continue
            counting = True
            if not (ia in position or ib in position):
                continue
            count = state[params[ia]].get("sds_warmup", 0)
            for i in (ia, ib):
                state[params[i]]["sds_warmup"] = count + 1
            if count + 1 == group["warmup_steps"]:
                finished.append((ia, ib))
        if not counting:
            self._settled[id(group)] = (group["warmup_steps"], group["coordinate_ramp"])
        if not finished:
            return
        # a frozen factor (LoRA-FA) is never rewritten; with r > min(m, n) the core R_B R_Aᵀ is rank-deficient by
        # construction, its SVD's null-space basis is whatever rounding makes it, and the coordinate steps after a
        # re-split would depend on that arbitrary choice (measured: a 1e-15 perturbation of the gradients moved the
        # parameters by 9e-5 after four steps), so such pairs keep their factors
        splittable = [(ia, ib) for ia, ib in finished
                      if params[ia].requires_grad and params[ib].requires_grad
                      and params[ia].shape[0] <= min(params[ib].shape[0], math.prod(params[ia].shape[1:]))]
        if group["resplit"] and splittable:
            self._resplit(group, splittable)
        for pair in finished:
            for i in pair:
                pstate = state[params[i]]
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                    if key in pstate:
                        pstate[key].zero_()

    def _resplit(self, group: dict[str, Any], pairs: list[tuple[int, int]]) -> None:
        """(2.4) for ``pairs``: ``B ← B·M_B``, ``A ← M_A·A`` with ``B'A' = BA`` (one batched SVD per shape;
        under FSDP2 one all-reduce of the Grams, on this one step of the pair's life)."""
        params: list[Tensor] = group["params"]
        by_shape: dict[tuple[Any, ...], list[tuple[int, int]]] = defaultdict(list)
        for ia, ib in pairs:
            A, B = params[ia], params[ib]
            by_shape[(A.shape, B.shape, A.dtype, B.dtype, A.device)].append((ia, ib))
        work, grams = [], {}
        for key, members in by_shape.items():
            ids_a, ids_b = [ia for ia, _ in members], [ib for _, ib in members]
            dt, tol = algebra_precision(key[2], group["linalg_dtype"], group["rank_tol"], "cholesky")
            A, B = stacked_factors(group, ids_a, ids_b, dt)
            grams[(key, "A")], grams[(key, "B")] = gram(A), gram(B.mT)
            work.append((key, ids_a, ids_b, A, B, tol))
        grams = reduce_parts(grams, lambda k: (process_group(params[by_shape[k[0]][0][0 if k[1] == "A" else 1]]),
                                           grams[k].dtype, grams[k].device))
        for key, ids_a, ids_b, A, B, tol in work:
            M_A, M_B = resplit_maps(grams[(key, "A")], grams[(key, "B")], tol)
            for ids, new in ((ids_a, M_A @ A), (ids_b, B @ M_B)):
                targets = [local(params[i]) for i in ids]
                torch._foreach_copy_(targets, [t.to(p.dtype).view(p.shape) for t, p in zip(new.unbind(0), targets)])
