"""What modes ``sds_polar`` and ``scaled`` share: Adam on the plain factors with gradients rewritten by one r×r
map of the partner's Gram, docs/math.md (3.1), and the singular-value channel (3.2)–(3.3) (``decouple_sigma``).

Choices made here: ``gσ``, the ``U, V`` of (3.2) and the correction (3.3) all use the factor *before* the step;
weight decay (decoupled, as AdamW) acts on the parameter, the correction is added after the AdamW update,
undecayed.  The channel's moments are kept in the parameter's dtype (so checkpoints round-trip exactly under
``Optimizer.load_state_dict``'s dtype policy) and share the parameter's step count.  With repeated singular
values the split (3.2) depends on the eigenbasis the solver returns (``diag(Uᵀ G V)`` is not invariant inside
an eigenspace).  A non-finite factor is treated as rank 0 (its partner's gradient is zeroed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from .. import fused
from ..adam import AdamLists, adamw
from ..buckets import Bucket, chunks, drop_positions, split_fused, stacked
from ..distributed import process_group, reduce_parts
from ..linalg import Spectrum, algebra_precision, finite_or_zero, gram, spectrum
from ..spectral import preconditioner, sigma_correction, sigma_split
from .base import MapBack, Mode, StepContext

__all__ = ["Preconditioned"]


class Preconditioned(Mode):
    """Adam on the plain factors with the gradients rewritten by (3.1), ``g̃A = P(K_B)·gA``, ``g̃B = gB·P(K_A)``,
    and the optional singular-value channel (3.2)–(3.3).  A subclass chooses ``P``: :meth:`preconditioner`."""

    state_keys = ("sigma_exp_avg", "sigma_exp_avg_sq", "sigma_max_exp_avg_sq")

    def preconditioner(self, K: Tensor, route: str, tol: float, group: dict[str, Any],
                       spec: Spectrum | None = None) -> Tensor:
        """``P(K)`` of (3.1) for a batch of Grams ``K`` ``[k, r, r]`` that passed :func:`finite_or_zero`."""
        return preconditioner(K, mode=self.name, route=route, rank_tol=tol, damping=group["damping"],
                              spec_other=spec)

    def fused_preconditioner(self, K: Tensor, k: int, route: str, tol: float, group: dict[str, Any]) -> Tensor:
        """:meth:`preconditioner` for the Grams of a fused family (``K`` from :func:`sdsopt.fused.grams`)."""
        return self.preconditioner(finite_or_zero(K), route, tol, group)

    @classmethod
    def validate(cls, group: dict[str, Any]) -> str | None:
        return None  # the singular-value channel (decouple_sigma) is defined here

    def host_decision(self, group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]]) -> bool:
        return bool(group["decouple_sigma"])  # the channel's own Adam runs outside the fused kernel

    def transform(self, ctx: StepContext) -> MapBack:
        """Rewrite the paired gradients in ``ctx.lists`` for the common Adam call (:meth:`_rewrite`); with
        ``fused=True`` on CUDA and no σ channel, step the pairs instead by the fused kernels
        (:meth:`_step_fused`: the rewrite in registers in front of the same AdamW update) and take them out."""
        buckets = self.bucketing.buckets(ctx.gi, ctx.group, ctx.position)
        kernel, rest = split_fused(ctx.group, buckets) if not ctx.group["decouple_sigma"] else ([], buckets)
        corrections = self._rewrite(ctx, rest) if rest else []
        if kernel:
            drop_positions(ctx.lists, self._step_fused(ctx, kernel))

        def after() -> None:
            if corrections:
                targets, deltas = zip(*corrections)
                torch._foreach_add_(list(targets), list(deltas))

        return after

    def _route(self, gi: int, group: dict[str, Any], param: Tensor) -> tuple[str, torch.dtype, float]:
        """``(route, algebra dtype, τ)`` of the pairs of ``param``'s dtype and device; refuses a Newton–Schulz
        damping too small to converge."""
        route = self.resolve_route(group["route"], param.device)
        dt, tol = algebra_precision(param.dtype, group["linalg_dtype"], group["rank_tol"], route)
        if route == "newton_schulz" and tol < 64 * torch.finfo(dt).eps:
            raise ValueError(
                f"SDSAdamW param group {gi}: rank_tol={tol} is below 64·eps of {dt}, too small a damping for "
                "the Newton–Schulz route to converge; raise rank_tol, pass linalg_dtype=torch.float64, "
                "or use route='eigh'.")
        return route, dt, tol

    def _step_fused(self, ctx: StepContext, buckets: list[Bucket]) -> set[int]:
        """(3.1) and AdamW by the kernels of :mod:`sdsopt.fused`, per family of pairs of one rank and dtype:
        the Grams (two launches), ``P`` of all of them (one batched call), the fused update (two launches).
        Returns the positions stepped."""
        group = ctx.group
        done: set[int] = set()
        for fi, fam in enumerate(self.bucketing.families(ctx.gi, group, buckets)):
            key = (ctx.gi, "rewrite", fi)
            route, _, tol = self._route(ctx.gi, group, group["params"][fam.pairs[0][0]])
            K = fused.grams(ctx.tables, key, group, fam)
            P = self.fused_preconditioner(K, fam.k, route, tol, group)
            del K
            done |= fused.adam(ctx.tables, key, group, fam, ctx.lists, ctx.position, gmaps=P, mmaps=None,
                               scales=None, ramps=None, found_inf=ctx.found_inf)
        return done

    def _rewrite(self, ctx: StepContext, buckets: list[Bucket]) -> list[tuple[Tensor, Tensor]]:
        """Replace the paired grads of ``buckets`` in ``lists['grads']`` by their rewrite (3.1).

        In phases, so that the number of kernel launches and host synchronisations does not grow
        with the number of pairs: (1) per bucket of equal shapes, in chunks of bounded bytes
        (:func:`sdsopt.buckets.chunks`), one stack of each factor kind needed and one batched Gram,
        the stacks kept only for the singular-value channel; (2) all Grams of equal size, over all
        buckets, in *one* all-reduce (FSDP2 shards only) and *one* eigh or Newton–Schulz call; (3) per
        chunk and gradient kind, one stack and one bmm with ``P``; (4)-(5) with the singular-value
        channel, its r×r products (one more all-reduce per size under FSDP2) and split; the output
        slices are handed to Adam as the rewritten gradients.  Returns the singular-value corrections ``(param, delta)``
        (local shards under FSDP2) to add after the AdamW update.
        """
        state, gi, group, position, lists = ctx.state, ctx.gi, ctx.group, ctx.position, ctx.lists
        params: list[Tensor] = group["params"]
        sigma = group["decouple_sigma"]

        # (1) factor stacks (row form: A as is, B as Bᵀ) and Grams, per chunk of a bucket
        work = []
        pending: dict[tuple[Any, ...], list[tuple[int, str, Tensor]]] = defaultdict(list)
        for bucket in buckets:
            r = bucket.a_shape[0]
            route, dt, tol = self._route(gi, group, params[bucket.a[0]])
            groups = {"A": process_group(params[bucket.a[0]]), "B": process_group(params[bucket.b[0]])}
            needed = {"B"} if bucket.has_a else set()  # g̃A needs P(K_B)
            needed |= {"A"} if bucket.has_b else set()  # g̃B needs P(K_A)
            if sigma:
                needed |= {s for s, present in (("A", bucket.has_a), ("B", bucket.has_b)) if present}
            for part in chunks(bucket, dt):
                # local shards under FSDP2 (A along n, B along m): Grams are then partial sums, reduced in (2)
                rows = {side: stacked(group, part.a, "A", dt) if side == "A"
                        else stacked(group, part.b, "B", dt).transpose(1, 2) for side in sorted(needed)}
                for side in sorted(needed):
                    pending[(r, dt, tol, rows[side].device, route, groups[side])].append(
                        (len(work), side, gram(rows[side])))
                work.append((part, dt, rows if sigma else {}, {}, {}, groups))

        # (2) one all-reduce of all Grams (sharded factors only), one spectral computation per Gram size
        grams = reduce_parts({key: torch.cat([K for _, _, K in items]) for key, items in pending.items()},
                         lambda key: (key[5], key[1], key[3]))
        for key, items in pending.items():
            tol, route = key[2], key[4]
            K = finite_or_zero(grams[key])
            need_spec = route == "eigh" or sigma
            spec = spectrum(K, tol) if need_spec else None
            P = self.preconditioner(K, route, tol, group, spec)
            start = 0
            for w, side, Kw in items:
                stop = start + Kw.shape[0]
                work[w][3][side] = P[start:stop]
                if spec is not None:
                    work[w][4][side] = spec.select(slice(start, stop))
                start = stop

        # (3) the rewrite (3.1), in row form for the singular-value channel
        rewritten = []
        for bucket, dt, rows, P, spec, groups in work:
            k, r = len(bucket.a), bucket.a_shape[0]
            for side, other, ids, present in (("A", "B", bucket.a, bucket.has_a), ("B", "A", bucket.b, bucket.has_b)):
                if not present:
                    continue
                pos = [position[i] for i in ids]
                G = torch.stack([lists["grads"][q] for q in pos]).to(dt)
                new = P[other] @ G.view(k, r, -1) if side == "A" else (G.view(k, -1, r) @ P[other]).transpose(1, 2)
                rewritten.append((side, ids, pos, new, rows.get(side), spec.get(side), groups[side]))

        # (4) the singular-value channel's r×r G̃ Xᵀ, summed over shards in one all-reduce
        GXt: dict[int, Tensor] = {}
        if sigma:
            GXt = reduce_parts({j: new @ X.transpose(1, 2) for j, (_, _, _, new, X, _, _) in enumerate(rewritten)},
                           lambda j: (rewritten[j][6], rewritten[j][4].dtype, rewritten[j][4].device))

        # (5) the channel's split (3.2) and Adam on σ, its correction (3.3), then the hand-over to Adam
        corrections: list[tuple[Tensor, Tensor]] = []
        for j, (side, ids, pos, new, X, spec_x, _) in enumerate(rewritten):
            if sigma:
                g_sigma, new = sigma_split(spec_x, X, new, GXt[j])
                steps = self._sigma_adam(state, group, [params[i] for i in ids], g_sigma, lists, pos)
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

    @staticmethod
    def _sigma_adam(state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], factors: list[Tensor],
                    g_sigma: Tensor, lists: AdamLists, pos: list[int]) -> Tensor:
        """Adam on the singular-value gradients ``gσ`` (3.2); returns the signed steps ``[k, r]``.

        Uses torch's functional Adam on a zero buffer: after the call the buffer holds
        ``−lr·sigma_lr_ratio·Adam(gσ)`` (no weight decay), in the factor's dtype.
        """
        dtype = factors[0].dtype
        buf = torch.zeros(g_sigma.shape, dtype=dtype, device=g_sigma.device)
        sub: dict[str, list[Tensor]] = defaultdict(list)
        for p, row, g, q in zip(factors, buf.unbind(0), g_sigma.to(dtype).unbind(0), pos):
            pstate = state[p]
            if "sigma_exp_avg" not in pstate:
                pstate["sigma_exp_avg"] = torch.zeros_like(row)
                pstate["sigma_exp_avg_sq"] = torch.zeros_like(row)
            if group["amsgrad"] and "sigma_max_exp_avg_sq" not in pstate:
                pstate["sigma_max_exp_avg_sq"] = torch.zeros_like(row)
            sub["params"].append(row)
            sub["grads"].append(g)
            sub["exp_avgs"].append(pstate["sigma_exp_avg"])
            sub["exp_avg_sqs"].append(pstate["sigma_exp_avg_sq"])
            if group["amsgrad"]:
                sub["max_exp_avg_sqs"].append(pstate["sigma_max_exp_avg_sq"])
            sub["state_steps"].append(lists["state_steps"][q].clone())
        adamw({**group, "foreach": None, "fused": None}, sub,
              lr=float(group["lr"]) * group["sigma_lr_ratio"], weight_decay=0.0)  # (σ channel: read on the host)
        return buf.to(g_sigma.dtype)
