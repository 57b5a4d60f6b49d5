"""The modes of :class:`sdsopt.SDSAdamW`, one object each, in front of the same torch AdamW update.

In the spirit of optax's gradient transformations, a mode says what it needs from the pairs' Grams
(:attr:`Mode.grams`), what state it keeps beyond AdamW's (:attr:`Mode.state`), whether its step needs a host
decision (:meth:`Mode.host_decision`, read by ``skip_nonfinite``), and what it does around Adam:
:meth:`Mode.before` rewrites the step's parameter and gradient lists in place and returns the function to run
after Adam.  An A/B between two modes changes exactly this object; Adam, pairing, validation and state live in
:class:`sdsopt.SDSAdamW`.

* ``lora`` — :class:`Plain`: nothing before or after Adam.
* ``sds`` — :class:`Coordinates`: before, the factors become their coordinates ``Ã = R_B A``, ``B̃ = B R_Aᵀ``
  with their gradients (2.2); after, Adam's change is mapped back and the pair re-balanced, the warm-up
  counted, and a pair that ends its warm-up re-split (2.4).
* ``sds_polar``, ``scaled`` — :class:`Rewrite`: before, the gradients are rewritten (equation R of
  :mod:`sdsopt.rewrite`); after, the singular-value channel's correction (2.8).
* ``svd_oracle`` — :class:`Captured`: before, Adam on the full ``BA`` and the pair leaves Adam's lists; after,
  the oracle's re-factorisation is copied in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import fused
from .coordinates import (
    balance_scales,
    coordinates,
    factor_map,
    lower_inverse,
    resplit_maps,
    to_coordinates,
    to_factors,
)
from .distributed import is_dtensor, local, process_group, reduce_parts
from .linalg import algebra_precision, cholesky_lower, finite_or_zero, gram, spectrum
from .pairing import a_rows, b_matrix, param_label
from .rewrite import preconditioner, resolve_route, sigma_correction, sigma_split, svd_refactor

if TYPE_CHECKING:
    from .optim import SDSAdamW

__all__ = ["MODE_OBJECTS", "Captured", "Coordinates", "Mode", "Plain", "Rewrite", "StepContext", "mode_of"]


@dataclass
class Bucket:
    """LoRA pairs of one param group that share shapes, dtypes, device and which factors have grads."""

    a_shape: torch.Size
    b_shape: torch.Size
    has_a: bool
    has_b: bool
    coordinates: bool = False  # mode sds: past the warm-up, Adam runs in the bases' coordinates
    a: list[int] = field(default_factory=list)  # indices of the A factors in the group's params
    b: list[int] = field(default_factory=list)


def _map_back(side: str, L: Tensor, M: Tensor, X: Tensor, after: Tensor, targets: list[Tensor],
              scale: Tensor | None, ramp: float | Tensor | None) -> None:
    """Mode ``sds``: write into ``targets`` the factors ``X`` (one bucket's, one kind, float32 or better) moved by
    the mapped change ``M (after − before)`` of their coordinates (MATH 2.2), then re-balanced by ``scale``
    (``[k, 1, 1]``, ``rebalance=True``); ``ramp`` scales the change (the first coordinate steps).

    ``after`` is the buffer Adam updated (the coordinates ``coordinates(L, X)`` in the parameter's dtype before
    Adam); the starting coordinates ``before`` are recomputed here from ``X`` and ``L`` (the same product, so the
    same numbers: keeping a copy through Adam would hold one more buffer the size of the factors).  ``X`` and
    ``after`` are updated in place and are spent afterwards.
    """
    before = coordinates(L, X, side).to(after.dtype).to(X.dtype)
    delta = to_factors(M, after.to(X.dtype).sub_(before), side)
    if ramp is not None:
        delta.mul_(ramp)
    new = X.add_(delta)
    if scale is not None:
        new.mul_(scale)
    torch._foreach_copy_(targets, _unstack(new.to(targets[0].dtype), targets[0].shape))


def _unstack(stacked: Tensor, shape: torch.Size) -> list[Tensor] | tuple[Tensor, ...]:
    """The slices of ``stacked`` along dim 0 as tensors of ``shape``: one ``unbind`` (views, no copy), and a
    view per slice only where the shapes differ (conv factors).  Per-slice indexing would cost one dispatched
    op per parameter and step, the bulk of a step's host time at hundreds of pairs."""
    parts = stacked.unbind(0)
    return parts if parts[0].shape == shape else [t.view(shape) for t in parts]


def split_fused(group: dict[str, Any], buckets: list[Bucket]) -> tuple[list[Bucket], list[Bucket]]:
    """``(kernel buckets, torch buckets)``: with ``fused=True`` the buckets the Triton kernels step
    (:mod:`sdsopt.fused`: CUDA, float32/bf16/fp16 factors of rank ≤ 64 with float32 algebra, not FSDP2 shards)."""
    if not group["fused"] or group["linalg_dtype"] not in (None, torch.float32):
        return [], buckets
    params: list[Tensor] = group["params"]
    kernel: list[Bucket] = []
    rest: list[Bucket] = []
    for b in buckets:
        A, B = params[b.a[0]], params[b.b[0]]
        ok = (fused.available(A) and fused.supported(A.dtype, A.shape[0]) and A.dtype == B.dtype
              and not (is_dtensor(A) or is_dtensor(B)))
        (kernel if ok else rest).append(b)
    return kernel, rest


def _families(opt: SDSAdamW, gi: int, group: dict[str, Any], buckets: list[Bucket]) -> list[fused.Family]:
    """:func:`sdsopt.fused.families` of the group's kernel buckets, cached while the buckets are the same."""
    cached = opt._bucket_cache.get(("families", gi))
    if cached is not None and len(cached[0]) == len(buckets) and all(a is b for a, b in zip(cached[0], buckets)):
        return cached[1]
    out = fused.families(group, buckets)
    opt._bucket_cache[("families", gi)] = (list(buckets), out)
    return out


def _drop(lists: dict[str, list[Tensor]], done: set[int]) -> None:
    """Take the positions ``done`` (stepped by the mode) out of the lists of the common Adam call."""
    if done and len(done) == len(lists["params"]):  # every parameter of the group was a stepped factor
        for key in lists:
            lists[key] = []
    elif done:
        for key, values in lists.items():
            if values:
                lists[key] = [v for q, v in enumerate(values) if q not in done]


def stacked_factors(group: dict[str, Any], ids_a: list[int], ids_b: list[int], dt: torch.dtype
             ) -> tuple[Tensor, Tensor]:
    """The pairs' factors stacked in ``dt``, natural layout: ``A`` ``[k, r, n]``, ``B`` ``[k, m, r]``
    (local shards under FSDP2)."""
    params: list[Tensor] = group["params"]
    A = torch.stack([local(params[i]) for i in ids_a]).to(dt)
    B = torch.stack([local(params[i]) for i in ids_b]).to(dt)
    return A.view(len(ids_a), A.shape[1], -1), B.view(len(ids_b), B.shape[1], B.shape[2])


class Frame(NamedTuple):
    """A batch of pairs' bases for one side (MATH 2.1, 2.5): the partner's Gram ``K``, the lower Cholesky factor
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


@dataclass
class StepContext:
    """One param group's step: its optimizer, index, group dict, ``position`` (param index → slot in the
    lists) and the lists handed to Adam (``params``, ``grads``, moments, ``state_steps``), plus the device-side
    skip flag of ``skip_nonfinite`` (``None`` when the host decides)."""

    opt: SDSAdamW
    gi: int
    group: dict[str, Any]
    position: dict[int, int]
    lists: dict[str, list[Tensor]]
    found_inf: Tensor | None = None


def _nothing() -> None:
    return None


class Mode:
    """The interface.  ``grams``: what the mode needs from the pairs' Grams (``"none"``, ``"cholesky"``,
    ``"spectral"`` or ``"captured"``: the full gradient from recorded layer inputs); ``state``: per-parameter
    state keys it adds to AdamW's."""

    grams: str = "none"
    state: tuple[str, ...] = ()

    def host_decision(self, opt: SDSAdamW, group: dict[str, Any]) -> bool:
        """Does this group's step need a decision read on the host (so ``skip_nonfinite`` must read its flag)?"""
        return False

    def before(self, ctx: StepContext) -> Callable[[], None]:
        """Rewrite ``ctx.lists`` for the common Adam call (a mode may step some of them itself and take them out:
        ``sds``); return what to do after that call."""
        return _nothing


class Plain(Mode):
    """``lora``: plain AdamW on the factors (the identity transformation)."""


class Coordinates(Mode):
    """``sds``: Adam on the coordinates of the factors in their orthonormal bases (MATH 2.1–2.5), after a
    per-pair warm-up of plain AdamW steps that ends with the re-split (2.4) and a reset of the pair's state."""

    grams = "cholesky"
    state = ("sds_warmup",)

    def host_decision(self, opt: SDSAdamW, group: dict[str, Any]) -> bool:
        return not self.settled(opt, group) and any(self.counting(opt, group, ia) for ia, _ in group["lora_pairs"])

    @staticmethod
    def settled(opt: SDSAdamW, group: dict[str, Any]) -> bool:
        """Mode ``sds``: has every pair of the group finished its warm-up and ramp?  (Then nothing is counted on
        the host any more: the per-pair loops of the step are skipped.)  Recorded by :meth:`_advance` with the
        group's ``warmup_steps`` and ``coordinate_ramp``, so changing them re-opens the count."""
        return opt._settled.get(id(group)) == (group["warmup_steps"], group["coordinate_ramp"])

    def before(self, ctx: StepContext) -> Callable[[], None]:
        """Step every pair past its warm-up here, bucket by bucket (:meth:`_step_coordinates`), and take those
        factors out of ``ctx.lists``: the common Adam call then updates the rest (warm-up pairs, other parameters)."""
        self._step_coordinates(ctx)
        return lambda: self._advance(ctx.opt, ctx.group, ctx.position)

    @staticmethod
    def in_coordinates(opt: SDSAdamW, group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: has the pair whose A factor is ``group['params'][ia]`` finished its warm-up?"""
        return opt.state.get(group["params"][ia], {}).get("sds_warmup", 0) >= group["warmup_steps"]

    def counting(self, opt: SDSAdamW, group: dict[str, Any], ia: int) -> bool:
        """Mode ``sds``: is the pair's step count still read on the host (warm-up or coordinate ramp)?"""
        count = opt.state.get(group["params"][ia], {}).get("sds_warmup", 0)
        return count < group["warmup_steps"] + max(group["coordinate_ramp"] - 1, 0)

    def _ramp(self, opt: SDSAdamW, group: dict[str, Any], ids_a: list[int], like: Tensor) -> float | Tensor | None:
        """The factors ``min(1, (n − warmup_steps + 1)/coordinate_ramp)`` of pairs at count ``n`` (``[k, 1, 1]``
        if they differ), or ``None`` once every pair of the bucket is past its ramp."""
        ramp, start = group["coordinate_ramp"], group["warmup_steps"]
        if ramp <= 1 or self.settled(opt, group):
            return None
        c = [min(1.0, (opt.state[group["params"][i]].get("sds_warmup", 0) - start + 1) / ramp) for i in ids_a]
        if all(v == 1.0 for v in c):
            return None
        if all(v == c[0] for v in c):
            return c[0]
        return torch.tensor(c, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _step_coordinates(self, ctx: StepContext) -> None:
        """Mode ``sds``: Adam on the coordinates (2.2) of every pair past its warm-up, and the map back: with
        ``fused=True`` on CUDA by the Triton kernels (:meth:`_step_fused`), else by torch ops
        (:meth:`_step_torch`); the pairs stepped are taken out of ``ctx.lists``."""
        buckets = [b for b in ctx.opt._buckets(ctx.gi, ctx.group, ctx.position) if b.coordinates]
        kernel, rest = split_fused(ctx.group, buckets)
        done = self._step_fused(ctx, kernel) if kernel else set()
        if rest:
            done |= self._step_torch(ctx, rest)
        _drop(ctx.lists, done)

    def _step_fused(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """:meth:`_step_coordinates` by the kernels of :mod:`sdsopt.fused`, per family of pairs of one rank and
        dtype: the Grams (four launches), the frames ``(L^{-1}, F)`` and re-balancing scales of all of them (one
        launch: :func:`sdsopt.fused.frames`), and the fused coordinate AdamW update (two launches).  Returns the
        positions stepped."""
        opt, group = ctx.opt, ctx.group
        params: list[Tensor] = group["params"]
        lr = group["lr"]
        done: set[int] = set()
        for fi, fam in enumerate(_families(opt, ctx.gi, group, buckets)):
            key = (ctx.gi, "sds", fi)
            device = params[fam.pairs[0][0]].device
            _, tol = algebra_precision(fam.dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
            K = fused.grams(opt._tables, key, group, fam)
            both = None
            pairs_both = [a and b for a, b in zip(fam.has_a, fam.has_b)]  # re-balanced: both factors stepped
            # lr = 0 (a scheduler) moves nothing, not even the balance (a Tensor lr: decided in the kernel)
            if group["rebalance"] and (isinstance(lr, Tensor) or lr > 0) and any(pairs_both):
                both = opt._tables.constant((key, "both"), pairs_both, device, torch.int32)
            # μ_s = γ·lr·√min(m, n) per pair (see the class docstring), the same for both Grams of the pair
            shifts = None
            if group["step_damping"] > 0 and (isinstance(lr, Tensor) or lr > 0):
                roots = opt._tables.constant((key, "roots"), fam.roots, device, torch.float32)
                shifts = roots * (group["step_damping"] * lr)
            G, F, scales = fused.frames(K, fam.k, tol, shifts, both)
            del K
            ramp = self._ramp(opt, group, [ia for ia, _ in fam.pairs], G)
            if isinstance(ramp, float):  # (a fill, not a host-to-device copy)
                ramp = torch.full((fam.k,), ramp, dtype=torch.float32, device=device)
            elif ramp is not None:
                ramp = ramp.reshape(-1).float()
            done |= fused.adam(opt._tables, key, group, fam, ctx.lists, ctx.position, gmaps=G, fmaps=F,
                               scales=scales, ramps=ramp, found_inf=ctx.found_inf)
        return done

    def _step_torch(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """:meth:`_step_coordinates` by torch ops; returns the positions stepped.

        First, per shape bucket: one stack of each factor and one batched Gram; then all r×r frames of the step at
        once (:func:`_frames`).  Then bucket by bucket and factor by factor: two batched matmuls (coordinates and
        their gradient), torch's Adam (``opt._adam``, the group's kernel) on the coordinates with the factors'
        moments, and the map back (:func:`_map_back`), so that only one bucket's coordinates and
        their gradients are alive at a time (Adam is elementwise: one call per bucket updates every tensor as
        one call for all would).
        """
        opt, group, position, lists = ctx.opt, ctx.group, ctx.position, ctx.lists
        requests: list[tuple[Tensor, Any, float, float]] = []
        work = []
        for bucket in buckets:
            params: list[Tensor] = group["params"]
            dt, tol = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"], "cholesky")
            A, B = stacked_factors(group, bucket.a, bucket.b, dt)
            # the step damping μ_s = γ·lr·√min(m, n) (see the class docstring), from the whole factors'
            # shapes: under FSDP2 A and B are local shards, and every rank must take the same step
            m, n = bucket.b_shape[0], math.prod(bucket.a_shape[1:])
            shift = group["step_damping"] * group["lr"] * math.sqrt(min(m, n))
            sides = []
            if bucket.has_a:  # Ã needs R_B
                sides.append(("A", A, bucket.a, len(requests)))
                requests.append((gram(B.mT), process_group(params[bucket.b[0]]), tol, shift))
            if bucket.has_b:  # B̃ needs R_A
                sides.append(("B", B, bucket.b, len(requests)))
                requests.append((gram(A), process_group(params[bucket.a[0]]), tol, shift))
            work.append((sides, bucket.a))
        frames = _frames(requests)
        done: set[int] = set()
        while work:
            sides, a_ids = work.pop(0)  # the bucket's factor stacks are released with it
            scales = {}
            if group["rebalance"] and group["lr"] > 0 and len(sides) == 2:  # lr = 0 (a scheduler) moves nothing
                (_, _, _, j_a), (_, _, _, j_b) = sides  # side A's request holds K_B, side B's holds K_A
                scales = dict(zip("AB", balance_scales(K_A=frames[j_b].K, K_B=frames[j_a].K)))
                if ctx.found_inf is not None:  # a step skipped on the device leaves the factors as they are
                    scales = {k: torch.where(ctx.found_inf > 0, torch.ones_like(c), c) for k, c in scales.items()}
            for side, X, ids, j in sides:
                pos = [position[i] for i in ids]
                like = lists["params"][pos[0]]
                G = torch.stack([lists["grads"][q] for q in pos]).to(X.dtype).view(X.shape)
                frame = frames[j]
                X_t, g_t = to_coordinates(frame.L, frame.L_inv, X, G, side)
                del G
                adam_view = X_t.to(like.dtype)  # Adam updates it in place; _map_back recomputes the start
                g_t = g_t.to(like.dtype).contiguous()  # fused Adam needs the params' layout
                sub = {key: [lists[key][q] for q in pos] if lists[key] else []
                       for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")}
                sub["params"] = list(_unstack(adam_view, like.shape))
                sub["grads"] = list(_unstack(g_t, like.shape))
                opt._adam(group, sub, lr=group["lr"], weight_decay=group["weight_decay"],
                          has_complex=any(torch.is_complex(t) for t in sub["params"]), found_inf=ctx.found_inf)
                del sub, g_t
                _map_back(side, frame.L, frame.M, X, adam_view, [lists["params"][q] for q in pos],
                          scales.get(side), self._ramp(opt, group, a_ids, X))
                del X_t, adam_view  # spent: free them before the next factor's stacks
                done.update(pos)
        return done

    def _advance(self, opt: SDSAdamW, group: dict[str, Any], position: dict[int, int]) -> None:
        """Mode ``sds`` after Adam: count the pair's steps (warm-up, then the coordinate ramp); pairs that just
        finished the warm-up are re-split (2.4) (if ``resplit``) and their Adam state reset, so that their moments
        start in coordinates."""
        if self.settled(opt, group):
            return
        params: list[Tensor] = group["params"]
        finished: list[tuple[int, int]] = []
        counting = False
        for ia, ib in group["lora_pairs"]:
            if not self.counting(opt, group, ia):
                continue
            counting = True
            if not (ia in position or ib in position):
                continue
            count = opt.state[params[ia]].get("sds_warmup", 0)
            for i in (ia, ib):
                opt.state[params[i]]["sds_warmup"] = count + 1
            if count + 1 == group["warmup_steps"]:
                finished.append((ia, ib))
        if not counting:
            opt._settled[id(group)] = (group["warmup_steps"], group["coordinate_ramp"])
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
            self._resplit(opt, group, splittable)
        for pair in finished:
            for i in pair:
                state = opt.state[params[i]]
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                    if key in state:
                        state[key].zero_()

    def _resplit(self, opt: SDSAdamW, group: dict[str, Any], pairs: list[tuple[int, int]]) -> None:
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


class Rewrite(Mode):
    """``sds_polar`` and ``scaled``: Adam on the plain factors with rewritten gradients
    (:func:`sdsopt.rewrite.rewrite_pair`'s equation R), and ``sds_polar``'s singular-value channel (2.8)."""

    grams = "spectral"
    state = ("sigma_exp_avg", "sigma_exp_avg_sq", "sigma_max_exp_avg_sq")

    def host_decision(self, opt: SDSAdamW, group: dict[str, Any]) -> bool:
        return bool(group["decouple_sigma"])  # the channel's own Adam runs outside the fused kernel

    def before(self, ctx: StepContext) -> Callable[[], None]:
        """Rewrite the paired gradients in ``ctx.lists`` for the common Adam call (:meth:`_rewrite`); with
        ``fused=True`` on CUDA and no σ channel, step the pairs instead by the fused kernels
        (:meth:`_step_fused`: the rewrite in registers in front of the same AdamW update) and take them out."""
        buckets = ctx.opt._buckets(ctx.gi, ctx.group, ctx.position)
        kernel, rest = split_fused(ctx.group, buckets) if not ctx.group["decouple_sigma"] else ([], buckets)
        corrections = self._rewrite(ctx.opt, ctx.gi, ctx.group, rest, ctx.position, ctx.lists) if rest else []
        if kernel:
            _drop(ctx.lists, self._step_fused(ctx, kernel))

        def after() -> None:
            if corrections:
                targets, deltas = zip(*corrections)
                torch._foreach_add_(list(targets), list(deltas))

        return after

    @staticmethod
    def _route(gi: int, group: dict[str, Any], param: Tensor) -> tuple[str, torch.dtype, float]:
        """``(route, algebra dtype, τ)`` of the pairs of ``param``'s dtype and device; refuses a Newton–Schulz
        damping too small to converge."""
        route = resolve_route(group["route"], param.device, group["mode"])
        dt, tol = algebra_precision(param.dtype, group["linalg_dtype"], group["rank_tol"], route)
        if route == "newton_schulz" and tol < 64 * torch.finfo(dt).eps:
            raise ValueError(
                f"SDSAdamW param group {gi}: rank_tol={tol} is below 64·eps of {dt}, too small a damping for "
                "the Newton–Schulz route to converge; raise rank_tol, pass linalg_dtype=torch.float64, "
                "or use route='eigh'.")
        return route, dt, tol

    def _step_fused(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """Equation R and AdamW by the kernels of :mod:`sdsopt.fused`, per family of pairs of one rank and dtype:
        the Grams (two launches), ``P`` of all of them (one batched call), the fused update (two launches).
        Returns the positions stepped."""
        opt, group = ctx.opt, ctx.group
        done: set[int] = set()
        for fi, fam in enumerate(_families(opt, ctx.gi, group, buckets)):
            key = (ctx.gi, "rewrite", fi)
            route, _, tol = self._route(ctx.gi, group, group["params"][fam.pairs[0][0]])
            K = fused.grams(opt._tables, key, group, fam)
            if group["mode"] == "scaled" and route == "cholesky":  # one launch for all of them
                P = fused.inverses(K, fam.k, tol, group["damping"])
            else:
                P = preconditioner(finite_or_zero(K), mode=group["mode"], route=route, rank_tol=tol,
                                   damping=group["damping"])
            del K
            done |= fused.adam(opt._tables, key, group, fam, ctx.lists, ctx.position, gmaps=P, fmaps=None,
                               scales=None, ramps=None, found_inf=ctx.found_inf)
        return done

    def _rewrite(
        self, opt: SDSAdamW, gi: int, group: dict[str, Any], buckets: list[Bucket], position: dict[int, int],
        lists: dict[str, list[Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Replace the paired grads of ``buckets`` in ``lists['grads']`` by their rewrite (equation R of
        :mod:`sdsopt.rewrite`).

        In phases, so that the number of kernel launches and host synchronisations does not grow
        with the number of pairs: (1) per bucket of equal shapes, one stack of each factor kind and
        one batched Gram; (2) all Grams of equal size, over all buckets, in *one* all-reduce (FSDP2
        shards only) and *one* eigh or Newton–Schulz call; (3) per bucket and gradient kind, one
        stack and one bmm with ``P``; (4)-(5) with the singular-value channel, its r×r products
        (one more all-reduce per size under FSDP2) and split; the output slices are handed to Adam
        as the rewritten gradients.  Returns the singular-value corrections ``(param, delta)``
        (local shards under FSDP2) to add after the AdamW update.
        """
        params: list[Tensor] = group["params"]
        sigma = group["decouple_sigma"]
        kw = dict(mode=group["mode"], damping=group["damping"])

        # (1) factor stacks (row form, MATH 2.1) and Grams
        work = []
        pending: dict[tuple[Any, ...], list[tuple[int, str, Tensor]]] = defaultdict(list)
        for bucket in buckets:
            k, r = len(bucket.a), bucket.a_shape[0]
            route, dt, tol = self._route(gi, group, params[bucket.a[0]])
            # local shards under FSDP2 (A along n, B along m): Grams are then partial sums, reduced in (2)
            A = torch.stack([local(params[i]) for i in bucket.a]).to(dt).view(k, r, -1)
            B = torch.stack([local(params[i]) for i in bucket.b]).to(dt).view(k, -1, r)
            rows = {"A": A, "B": B.transpose(1, 2)}
            groups = {"A": process_group(params[bucket.a[0]]), "B": process_group(params[bucket.b[0]])}
            needed = {"B"} if bucket.has_a else set()  # g̃A needs P(K_B)
            needed |= {"A"} if bucket.has_b else set()  # g̃B needs P(K_A)
            if sigma:
                needed |= {s for s, present in (("A", bucket.has_a), ("B", bucket.has_b)) if present}
            for side in sorted(needed):
                pending[(r, dt, tol, B.device, route, groups[side])].append((len(work), side, gram(rows[side])))
            work.append((bucket, dt, rows, {}, {}, groups))

        # (2) one all-reduce of all Grams (sharded factors only), one spectral computation per Gram size
        grams = reduce_parts({key: torch.cat([K for _, _, K in items]) for key, items in pending.items()},
                         lambda key: (key[5], key[1], key[3]))
        for key, items in pending.items():
            tol, route = key[2], key[4]
            K = finite_or_zero(grams[key])
            need_spec = route == "eigh" or sigma
            spec = spectrum(K, tol) if need_spec else None
            P = preconditioner(K, route=route, rank_tol=tol, spec_other=spec, **kw)
            start = 0
            for w, side, Kw in items:
                stop = start + Kw.shape[0]
                work[w][3][side] = P[start:stop]
                if spec is not None:
                    work[w][4][side] = spec.select(slice(start, stop))
                start = stop

        # (3) the rewrite (R), in row form for the singular-value channel
        rewritten = []
        for bucket, dt, rows, P, spec, groups in work:
            k, r = len(bucket.a), bucket.a_shape[0]
            for side, other, ids, present in (("A", "B", bucket.a, bucket.has_a), ("B", "A", bucket.b, bucket.has_b)):
                if not present:
                    continue
                pos = [position[i] for i in ids]
                G = torch.stack([lists["grads"][q] for q in pos]).to(dt)
                new = P[other] @ G.view(k, r, -1) if side == "A" else (G.view(k, -1, r) @ P[other]).transpose(1, 2)
                rewritten.append((side, ids, pos, new, rows[side], spec.get(side), groups[side]))

        # (4) the singular-value channel's r×r G̃ Xᵀ, summed over shards in one all-reduce
        GXt: dict[int, Tensor] = {}
        if sigma:
            GXt = reduce_parts({j: new @ X.transpose(1, 2) for j, (_, _, _, new, X, _, _) in enumerate(rewritten)},
                           lambda j: (rewritten[j][6], rewritten[j][4].dtype, rewritten[j][4].device))

        # (5) the channel's split (2.3) and Adam on σ (2.4), then the hand-over to Adam
        corrections: list[tuple[Tensor, Tensor]] = []
        for j, (side, ids, pos, new, X, spec_x, _) in enumerate(rewritten):
            if sigma:
                g_sigma, new = sigma_split(spec_x, X, new, GXt[j])
                steps = self._sigma_adam(opt, group, [params[i] for i in ids], g_sigma, lists, pos)
                delta = sigma_correction(spec_x, X, steps)
                delta = delta if side == "A" else delta.transpose(1, 2)
                targets = [lists["params"][q] for q in pos]
                corrections += [(p, d.reshape(p.shape).to(p.dtype)) for p, d in zip(targets, delta)]
            like = lists["params"][pos[0]]
            new = new if side == "A" else new.transpose(1, 2)
            new = new.to(like.dtype).reshape(len(ids), *like.shape)  # views when 2-D (Linear, embedding)
            for q, g in zip(pos, new.unbind(0)):
                lists["grads"][q] = g
        return corrections

    def _sigma_adam(self, opt: SDSAdamW, group: dict[str, Any], factors: list[Tensor], g_sigma: Tensor,
                    lists: dict[str, list[Tensor]], pos: list[int]) -> Tensor:
        """Adam on the singular-value gradients ``gσ`` (2.4); returns the signed steps ``[k, r]``.

        Uses torch's functional Adam on a zero buffer: after the call the buffer holds
        ``−lr·sigma_lr_ratio·Adam(gσ)`` (no weight decay), in the factor's dtype.
        """
        dtype = factors[0].dtype
        buf = torch.zeros(g_sigma.shape, dtype=dtype, device=g_sigma.device)
        sub: dict[str, list[Tensor]] = defaultdict(list)
        for p, row, g, q in zip(factors, buf.unbind(0), g_sigma.to(dtype).unbind(0), pos):
            state = opt.state[p]
            if "sigma_exp_avg" not in state:
                state["sigma_exp_avg"] = torch.zeros_like(row)
                state["sigma_exp_avg_sq"] = torch.zeros_like(row)
            if group["amsgrad"] and "sigma_max_exp_avg_sq" not in state:
                state["sigma_max_exp_avg_sq"] = torch.zeros_like(row)
            sub["params"].append(row)
            sub["grads"].append(g)
            sub["exp_avgs"].append(state["sigma_exp_avg"])
            sub["exp_avg_sqs"].append(state["sigma_exp_avg_sq"])
            if group["amsgrad"]:
                sub["max_exp_avg_sqs"].append(state["sigma_max_exp_avg_sq"])
            sub["state_steps"].append(lists["state_steps"][q].clone())
        opt._adam({**group, "foreach": None, "fused": None}, sub,
                   lr=float(group["lr"]) * group["sigma_lr_ratio"], weight_decay=0.0)  # (σ channel: read on the host)
        return buf.to(g_sigma.dtype)


class Captured(Mode):
    """``svd_oracle``: Adam on the full product with the true gradient, which needs the layers' recorded inputs
    (:meth:`sdsopt.SDSAdamW.attach`)."""

    grams = "captured"
    state = ("oracle_exp_avg", "oracle_exp_avg_sq")

    def host_decision(self, opt: SDSAdamW, group: dict[str, Any]) -> bool:
        return True

    def before(self, ctx: StepContext) -> Callable[[], None]:
        replaced = self._rewrite(ctx.opt, ctx.gi, ctx.group, ctx.position, ctx.lists)

        def after() -> None:
            for p, value in replaced:
                p.copy_(value.reshape(p.shape))

        return after

    def _rewrite(
        self, opt: SDSAdamW, gi: int, group: dict[str, Any], position: dict[int, int], lists: dict[str, list[Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """``svd_oracle``: Adam on the full ``W = BA`` with the true ``G`` (state ``oracle_exp_avg``/
        ``oracle_exp_avg_sq`` on A's state, m×n); returns the new factors, which are copied in after the step
        instead of an Adam update of A and B.  A research mode for ablations on small models: one pair at a
        time, in float32 or better.
        """
        mode, capture = group["mode"], opt._capture
        params: list[Tensor] = group["params"]
        if any(process_group(p) is not None or local(p) is not p for p in params):
            raise ValueError(
                f"SDSAdamW mode={mode!r} (full matrices) cannot run on sharded (FSDP2) factors; "
                "use mode 'sds', 'sds_polar', 'scaled' or 'lora'."
            )
        if capture is None:
            raise RuntimeError(
                f"SDSAdamW mode={mode!r} needs the LoRA layers' inputs: call opt.attach(model) once before training."
            )
        replaced: list[tuple[Tensor, Tensor]] = []
        drop: set[int] = set()
        for ia, ib in group["lora_pairs"]:
            if ia not in position or ib not in position:
                continue
            A, B = params[ia], params[ib]
            dt, _ = algebra_precision(A.dtype, group["linalg_dtype"], None)
            Am, Bm = a_rows(A).to(dt), b_matrix(B).to(dt)
            m, n, r = Bm.shape[0], Am.shape[1], Am.shape[0]
            if m * n > group["oracle_max_numel"] or r > min(m, n):
                raise ValueError(
                    f"SDSAdamW mode='svd_oracle': pair {param_label(group, ia, gi)} is {m}×{n} with r={r}; the oracle "
                    f"forms m×n matrices (limit oracle_max_numel={group['oracle_max_numel']}) and needs r ≤ min(m, n). "
                    "Raise oracle_max_numel for a larger model, or use another mode."
                )
            state = opt.state[A]
            W = (Bm @ Am).to(A.dtype)
            if "oracle_exp_avg" not in state:
                state["oracle_exp_avg"] = torch.zeros_like(W)
                state["oracle_exp_avg_sq"] = torch.zeros_like(W)
            sub = {"params": [W], "grads": [capture.full(A, B, dt).to(A.dtype)],
                   "exp_avgs": [state["oracle_exp_avg"]], "exp_avg_sqs": [state["oracle_exp_avg_sq"]],
                   "max_exp_avg_sqs": [], "state_steps": [lists["state_steps"][position[ia]].clone()]}
            opt._adam({**group, "amsgrad": False, "foreach": False, "fused": False}, sub,
                       lr=group["lr"], weight_decay=group["weight_decay"])
            new_a, new_b = svd_refactor(W.to(dt), Am, Bm)
            replaced += [(A, new_a.to(A.dtype)), (B, new_b.to(B.dtype))]
            drop |= {position[ia], position[ib]}
            for p in (A, B):
                opt.state[p]["step"] += 1
        if drop:
            for key, values in lists.items():
                if len(values) == len(lists["params"]) and key != "params":
                    lists[key] = [v for q, v in enumerate(values) if q not in drop]
            lists["params"] = [v for q, v in enumerate(lists["params"]) if q not in drop]
        return replaced


MODE_OBJECTS: dict[str, Mode] = {"lora": Plain(), "sds": Coordinates(), "sds_polar": Rewrite(), "scaled": Rewrite(),
                                 "svd_oracle": Captured()}


def mode_of(group: dict[str, Any]) -> Mode:
    """The mode object of a param group."""
    return MODE_OBJECTS[group["mode"]]
