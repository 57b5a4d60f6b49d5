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
from typing import Any

import torch
from torch import Tensor

from ..buckets import Bucket, drop_positions, stacked_factors
from ..coordinates import resplit_maps
from ..distributed import local, process_group, reduce_parts
from ..linalg import algebra_precision, gram
from .base import MapBack, Mode, StepContext
from .sds_steps import Plan, step_coordinates

__all__ = ["SDS"]


class SDS(Mode):
    """``sds``: Adam on the coordinates of the factors in their orthonormal bases (docs/math.md (2.1)–(2.6)), after a
    per-pair warm-up of plain AdamW steps that ends with the re-split (2.4) and a reset of the pair's state."""

    name = "sds"
    routes = ("cholesky",)
    state_keys = ("sds_warmup",)
    sigma_note = " (its singular values live in the r×r core R_B·R_Aᵀ and move through both coordinates)"

    def __init__(self) -> None:
        super().__init__()
        self._settled: dict[int, tuple[int, int]] = {}  # groups past every pair's warm-up and ramp

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
        """Mode ``sds``: Adam on the coordinates (2.2) of every pair past its warm-up, and the map back, each bucket
        by its route (:func:`sdsopt.modes.sds_steps.step_coordinates`); the pairs stepped are taken out of
        ``ctx.lists``."""
        buckets = [b for b in self._buckets(ctx) if b.phase]
        plan = Plan(ramp=lambda ids_a, like: self._ramp(ctx.state, ctx.group, ids_a, like), bucketing=self.bucketing)
        drop_positions(ctx.lists, step_coordinates(ctx, buckets, plan))

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
        # re-split would depend on that arbitrary choice (a rounding-sized perturbation of the gradients moves the
        # parameters visibly within a few steps), so such pairs keep their factors
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
