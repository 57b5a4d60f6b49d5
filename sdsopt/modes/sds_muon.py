"""Mode ``sds_muon``: the orthogonalised momentum of each coordinate gradient (Muon's step) in the ``sds``
coordinates, width-correct by construction, docs/math.md §8.

Per pair and step, for each factor with a gradient (row form, :mod:`sdsopt.muon`): the partner's frame (2.1), the
coordinate gradient (2.2), the stored momentum carried to the partner's new basis (8.1), the Nesterov mix (8.2),
its matrix sign (8.3), the step ``−lr·√(m/n)·msign`` (B: ``−b_lr_ratio·lr·√(m/n)·msign``, (8.4)) and the map back
with the step damping and decoupled decay of ``sds`` (2.6).  The Grams, frames, re-balance and ramp are mode
``sds``'s own (:func:`sdsopt.modes.sds_steps.side_steps`).

Choices the maths leaves open, made here:

* **No warm-up** (``warmup_steps`` must be 0; ``None`` resolves to 0): the lr is a spectral step size (8.4), 5-10x
  an Adam lr on SmolLM2, so plain AdamW steps at it would blow up; and the coordinates need none: ``B = 0`` factors
  as ``R = I``, its gradient ``gA = s·BᵀG`` is exactly 0, so ``A`` stays put (8.3) while ``B`` takes a unit
  step in ``A``'s row space.  Without a warm-up there is no re-split (2.4).
* **Momentum**: ``betas[0]`` with Nesterov's look-ahead (Muon's default); ``betas[1]``, ``eps`` are unused (no
  second moment); ``amsgrad`` is refused.  It lives in the factor's ``exp_avg`` in factor units (8.1), so its
  memory and sharding are AdamW's; ``exp_avg_sq`` stays zero.  ``muon_prev`` keeps the factor as it was at its
  last step, the partner's basis the momentum was formed in (exact transport: one r×r cross-Gram per factor and
  step, and anything that moved the factor in between, a re-balance or the user, is carried too).
* **Step damping** ``μ_s = step_damping·lr·√(m/n)`` (2.6): the frame's shift at the size of this mode's step.
* **Scale** ``√(m/n)`` for both paths (8.4): both change the same ``m × n`` weight.  Not Muon's Adam-matched
  ``0.2·√max(m, n)``: that ties the lr to the layer's shape, this one makes it transfer across shapes.
* FSDP2: three all-reduces of r×r partial sums per step (the Grams, the transport's cross-Grams, the momenta's Grams).
* The step's decisions are read on the host: with ``skip_nonfinite`` the flag is read every step (one
  synchronisation), and ``fused=True`` steps the pairs by these torch ops: no kernel (at r = 8 the mode cost an
  LLM run ~2-3 %: benchmarks/RESULTS.md, section 9).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from ..adam import side_lr
from ..buckets import Bucket, drop_positions, stacked
from ..distributed import local, process_group, reduce_parts
from ..linalg import gram
from ..muon import factor_units, momentum, msign, spectral_scale, transport
from .base import StepContext
from .sds import SDS
from .sds_steps import Plan, decoupled_decay, keep_gain, parts, side_steps, stack_grams

__all__ = ["SDSMuon", "step_muon"]


def spectral_shift(group: dict[str, Any], bucket: Bucket) -> float:
    """The step damping of mode ``sds_muon``, ``μ_s = γ·lr·√(m/n)`` (docs/math.md (8.4), (2.6))."""
    return group["step_damping"] * group["lr"] * spectral_scale(*bucket.layer)


def _rows(X: Tensor, side: str, k: int, shape: tuple[int, ...]) -> Tensor:
    """Tensors of a factor kind (natural layout, stacked ``[k, …]``; local shards under FSDP2, so only ``r`` is
    taken from the whole ``shape``) in row form: ``A`` ``[k, r, n]``, ``Bᵀ`` ``[k, r, m]``."""
    return X.reshape(k, shape[0], -1) if side == "A" else X.reshape(k, -1, shape[1]).mT


def _previous(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], ids: list[int], side: str,
              now: Tensor) -> Tensor:
    """The factors ``ids`` as they were at their last step (``muon_prev``) in row form, in ``now``'s dtype; the
    factors as they are now where none was kept (their first step, or a frozen factor, which does not move)."""
    params: list[Tensor] = group["params"]
    kept = [state.get(params[i], {}).get("muon_prev") for i in ids]
    if all(t is None for t in kept):
        return now
    shape = tuple(params[ids[0]].shape)
    X = torch.stack([local(params[i] if t is None else t) for i, t in zip(ids, kept)]).to(now.dtype)
    return _rows(X, side, len(ids), shape)


def _summed(partial: dict[Any, Tensor], owner: dict[Any, Tensor]) -> dict[Any, Tensor]:
    """``partial`` (r×r sums over local shards under FSDP2) summed over the process group of ``owner[key]``'s
    shards: one all-reduce per group and dtype for the whole step (:func:`sdsopt.distributed.reduce_parts`)."""
    return reduce_parts(partial, lambda key: (process_group(owner[key]), partial[key].dtype, partial[key].device))


def step_muon(ctx: StepContext, buckets: list[Bucket], plan: Plan) -> set[int]:
    """Mode ``sds_muon``'s step (docs/math.md (8.1)–(8.4), map back (2.6)) of the pairs of ``buckets``, torch ops
    on stacks; returns the positions stepped (to be taken out of ``ctx.lists``).  Under FSDP2 the step reduces
    three batches of r×r partial sums: the Grams (frames), the cross-Grams of the transport (8.1) and the
    momenta's Grams (8.3)."""
    group, lists, state = ctx.group, ctx.lists, ctx.state
    params: list[Tensor] = group["params"]
    beta, sign = group["betas"][0], (-1.0 if group["maximize"] else 1.0)
    pieces = parts(group, buckets, whole=False, shift=spectral_shift)
    work, cross, owner = [], {}, {}
    for j, (part, steps) in enumerate(zip(pieces, side_steps(ctx, pieces, plan, stack_grams))):
        b, dt = part.bucket, part.dt
        ids, shapes = {"A": b.a, "B": b.b}, {"A": tuple(b.a_shape), "B": tuple(b.b_shape)}
        now = {"A": stacked(group, b.a, "A", dt), "B": stacked(group, b.b, "B", dt).mT}
        for s in steps:
            partner = "B" if s.side == "A" else "A"
            pos = [ctx.position[i] for i in s.ids]
            before = _previous(state, group, ids[partner], partner, now[partner])
            cross[(j, s.side)] = now[partner] @ before.mT
            owner[(j, s.side)] = params[ids[partner][0]]
            work.append((j, part, s, pos, now, shapes[s.side]))
    cross = _summed(cross, owner)
    grams, moved = {}, []
    for j, part, s, pos, now, shape in work:  # (8.1), (8.2), the stored momentum
        k, L_inv = len(pos), s.frame.L_inv
        g = _rows(torch.stack([lists["grads"][q] for q in pos]).to(part.dt), s.side, k, shape)
        N = _rows(torch.stack([lists["exp_avgs"][q] for q in pos]).to(part.dt), s.side, k, shape)
        M, Y = momentum(transport(L_inv, cross[(j, s.side)], N), L_inv @ g * sign, beta)
        stored = factor_units(L_inv, M)
        stored = (stored if s.side == "A" else stored.mT).contiguous()
        targets = [lists["exp_avgs"][q] for q in pos]
        torch._foreach_copy_(targets, [t.view(targets[0].shape) for t in stored.unbind(0)])
        grams[(j, s.side)], owner[(j, s.side)] = gram(Y), params[s.ids[0]]
        moved.append((Y, j, part, s, pos, now))
    grams = _summed(grams, owner)
    for _, _, _, s, _, _ in moved:  # (8.1): the factor as the partner's next transport needs it
        for i in s.ids:
            pstate = state[params[i]]
            if "muon_prev" not in pstate:
                pstate["muon_prev"] = torch.empty_like(params[i], memory_format=torch.preserve_format)
        torch._foreach_copy_([local(state[params[i]]["muon_prev"]) for i in s.ids], [local(params[i]) for i in s.ids])
    decay = decoupled_decay(ctx)
    done: set[int] = set()
    for Y, j, part, s, pos, now in moved:  # (8.3), (8.4), the map back (2.6)
        u = msign(Y, grams[(j, s.side)], part.key[0]) * -spectral_scale(*part.bucket.layer)
        keep, gain = keep_gain(side_lr(group, s.side, decay), s.scale, s.ramp)
        M_map = s.frame.M * (gain * side_lr(group, s.side))
        X = now["A"] if s.side == "A" else now["B"].mT
        if isinstance(keep, Tensor):
            X.mul_(keep)
            keep = 1.0
        if s.side == "A":
            X.baddbmm_(M_map, u, beta=keep)
        else:
            X.baddbmm_(u.mT, M_map.mT, beta=keep)
        targets = [lists["params"][q] for q in pos]
        torch._foreach_copy_(targets, [t.view(targets[0].shape) for t in X.to(targets[0].dtype).unbind(0)])
        torch._foreach_add_([lists["state_steps"][q] for q in pos], 1.0)
        done.update(pos)
    return done


class SDSMuon(SDS):
    """``sds_muon``: the orthogonalised Nesterov momentum of each coordinate gradient, scaled to the layer's
    spectral size (docs/math.md §8), in the coordinates, frames, re-balance and ramp of mode ``sds``."""

    name = "sds_muon"
    state_keys = ("sds_warmup", "muon_prev")
    coordinates_at_once = True

    @classmethod
    def validate(cls, group: dict[str, Any]) -> str | None:
        if group["warmup_steps"]:
            return (f"warmup_steps={group['warmup_steps']} does not apply to mode='sds_muon': it steps in "
                    "coordinates from the first step, and its lr is a spectral step size (docs/math.md (8.4)) that "
                    "plain AdamW warm-up steps would take far too large; pass warmup_steps=0 (or leave it None)")
        if group["amsgrad"]:
            return ("amsgrad=True does not apply to mode='sds_muon': it keeps no second moment (its step is the "
                    "orthogonalised momentum, docs/math.md (8.3)); pass amsgrad=False")
        return None

    def host_decision(self, group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]]) -> bool:
        return True

    def _step_coordinates(self, ctx: StepContext) -> None:
        """Every pair with a gradient by :func:`step_muon` (all are in coordinates: no warm-up)."""
        buckets = [b for b in self._buckets(ctx) if b.phase]
        plan = Plan(ramp=lambda ids_a, like: self._ramp(ctx.state, ctx.group, ids_a, like), bucketing=self.bucketing)
        drop_positions(ctx.lists, step_muon(ctx, buckets, plan))
