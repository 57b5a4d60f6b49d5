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
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import fused
from ..adam import AdamLists, adamw
from ..buckets import Bucket, chunks, drop_positions, split_fused, stacked
from ..distributed import process_group, reduce_parts
from ..gram_batch import GramRequest, solve_grams
from ..linalg import Spectrum, algebra_precision, finite_or_zero, gram, spectrum
from ..spectral import preconditioner, sigma_correction, sigma_split
from .base import MapBack, Mode, StepContext

__all__ = ["Preconditioned"]


class Chunk(NamedTuple):
    """Pairs of one bucket rewritten together, in the algebra's dtype ``dt``: the factor kinds whose Gram's maps
    are needed (the partners of the kinds with gradients; both, with the singular-value channel), their row-form
    stacks (kept for the channel only) and process groups."""

    bucket: Bucket
    dt: torch.dtype
    needed: tuple[str, ...]
    rows: dict[str, Tensor]
    groups: dict[str, Any]


class Maps(NamedTuple):
    """A factor kind's maps from its Gram: ``P`` of (3.1) and the spectrum (``None`` where no one needs it)."""

    P: Tensor
    spec: Spectrum | None


class Rewritten(NamedTuple):
    """One factor kind of a chunk after (3.1): its indices in the group's params and positions in the step's lists,
    the rewritten gradient in row form, and for the singular-value channel the factors' row form, their spectrum
    and process group."""

    side: str
    ids: list[int]
    pos: list[int]
    grad: Tensor
    rows: Tensor | None
    spec: Spectrum | None
    group: Any


class Preconditioned(Mode):
    """Adam on the plain factors with the gradients rewritten by (3.1), ``g̃A = P(K_B)·gA``, ``g̃B = gB·P(K_A)``,
    and the optional singular-value channel (3.2)–(3.3).  A subclass chooses ``P`` by its
    :attr:`spectral_function` and :attr:`routes`."""

    state_keys = ("sigma_exp_avg", "sigma_exp_avg_sq", "sigma_max_exp_avg_sq")
    sigma_channel = True
    spectral_function: Callable[[Spectrum, float], Tensor]  # f of (3.1): the eigenvalues of P, from K's spectrum

    def preconditioner(self, K: Tensor, route: str, tol: float, group: dict[str, Any],
                       spec: Spectrum | None = None) -> Tensor:
        """``P(K)`` of (3.1) for a batch of Grams ``K`` ``[k, r, r]`` that passed :func:`finite_or_zero`."""
        return preconditioner(K, f=self.spectral_function, route=route, rank_tol=tol, damping=group["damping"],
                              spec_other=spec)

    def fused_preconditioner(self, K: Tensor, k: int, route: str, tol: float, group: dict[str, Any]) -> Tensor:
        """:meth:`preconditioner` for the Grams of a fused family (``K`` from :func:`sdsopt.fused.grams`)."""
        return self.preconditioner(finite_or_zero(K), route, tol, group)

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

        In phases, so that the number of kernel launches and host synchronisations does not grow with the number
        of pairs: (1) per bucket of equal shapes, in chunks of bounded bytes (:func:`sdsopt.buckets.chunks`), one
        stack of each factor kind needed and one batched Gram (:meth:`_chunks`), the stacks kept only for the
        singular-value channel; (2) all Grams of one size in one batch (:func:`sdsopt.gram_batch.solve_grams`:
        one all-reduce under FSDP2, one eigh or Newton–Schulz call); (3) per chunk and gradient kind, one stack
        and one bmm with ``P`` (:meth:`_rewritten`); (4)-(5) with the singular-value channel, its r×r products
        (one more all-reduce per size under FSDP2) and split (:meth:`_sigma_channel`); the output slices are
        handed to Adam as the rewritten gradients.  Returns the singular-value corrections ``(param, delta)``
        (local shards under FSDP2) to add after the AdamW update.
        """
        group, sigma = ctx.group, ctx.group["decouple_sigma"]
        work, requests = self._chunks(ctx, buckets)
        solved = solve_grams(requests, lambda key, K: self._maps(key, K, group, sigma))
        maps = {(w, side): m for (w, side), m in zip(((w, side) for w, c in enumerate(work) for side in c.needed),
                                                        solved)}
        rewritten = self._rewritten(ctx, work, maps)
        corrections = self._sigma_channel(ctx, rewritten) if sigma else []
        for r in rewritten:
            like = ctx.lists["params"][r.pos[0]]
            new = r.grad if r.side == "A" else r.grad.transpose(1, 2)
            new = new.to(like.dtype).reshape(len(r.ids), *like.shape)  # views when 2-D (Linear, embedding)
            for q, g in zip(r.pos, new.unbind(0)):
                ctx.lists["grads"][q] = g
        return corrections

    def _chunks(self, ctx: StepContext, buckets: list[Bucket]) -> tuple[list[Chunk], list[GramRequest]]:
        """Phase (1) of :meth:`_rewrite`: the chunks of ``buckets`` and the requests for their partners' Grams
        (row form: A as is, B as Bᵀ; local shards under FSDP2, so that the Grams are partial sums), in the order
        of the chunks and of their :attr:`Chunk.needed`."""
        group, params = ctx.group, ctx.group["params"]
        work: list[Chunk] = []
        requests: list[GramRequest] = []
        for bucket in buckets:
            route, dt, tol = self._route(ctx.gi, group, params[bucket.a[0]])
            groups = {"A": process_group(params[bucket.a[0]]), "B": process_group(params[bucket.b[0]])}
            needed = {"B"} if bucket.has_a else set()  # g̃A needs P(K_B)
            needed |= {"A"} if bucket.has_b else set()  # g̃B needs P(K_A)
            if group["decouple_sigma"]:
                needed |= {s for s, present in (("A", bucket.has_a), ("B", bucket.has_b)) if present}
            for part in chunks(bucket, dt):
                rows = {side: stacked(group, part.a, "A", dt) if side == "A"
                        else stacked(group, part.b, "B", dt).transpose(1, 2) for side in sorted(needed)}
                requests += [GramRequest(gram(rows[side]), groups[side], (tol, route)) for side in sorted(needed)]
                work.append(Chunk(part, dt, tuple(sorted(needed)), rows if group["decouple_sigma"] else {}, groups))
        return work, requests

    def _maps(self, key: Hashable, K: Tensor, group: dict[str, Any], sigma: bool) -> Maps:
        """Phase (2) of :meth:`_rewrite` for one batch of Grams summed over their shards, ``key = (τ, route)``:
        ``P`` (3.1) and, where the route or the singular-value channel needs it, the spectrum."""
        tol, route = key
        K = finite_or_zero(K)
        spec = spectrum(K, tol) if route == "eigh" or sigma else None
        return Maps(self.preconditioner(K, route, tol, group, spec), spec)

    @staticmethod
    def _rewritten(ctx: StepContext, work: list[Chunk], maps: dict[tuple[int, str], Maps]) -> list[Rewritten]:
        """Phase (3) of :meth:`_rewrite`: per chunk and factor kind with gradients, (3.1) in row form."""
        out = []
        for w, c in enumerate(work):
            k, r = len(c.bucket.a), c.bucket.a_shape[0]
            for side, other, ids, present in (("A", "B", c.bucket.a, c.bucket.has_a),
                                              ("B", "A", c.bucket.b, c.bucket.has_b)):
                if not present:
                    continue
                pos = [ctx.position[i] for i in ids]
                G = torch.stack([ctx.lists["grads"][q] for q in pos]).to(c.dt)
                P = maps[(w, other)].P
                new = P @ G.view(k, r, -1) if side == "A" else (G.view(k, -1, r) @ P).transpose(1, 2)
                own = maps.get((w, side))
                out.append(Rewritten(side, ids, pos, new, c.rows.get(side), own.spec if own else None,
                                     c.groups[side]))
        return out

    def _sigma_channel(self, ctx: StepContext, rewritten: list[Rewritten]) -> list[tuple[Tensor, Tensor]]:
        """Phases (4)-(5) of :meth:`_rewrite`: the channel's r×r ``G̃ Xᵀ`` summed over shards in one all-reduce,
        its split (3.2) (the rewritten gradients replaced by their basis parts) and Adam on σ; returns the
        corrections (3.3) ``(param, delta)``."""
        GXt = reduce_parts({j: r.grad @ r.rows.transpose(1, 2) for j, r in enumerate(rewritten)},
                           lambda j: (rewritten[j].group, rewritten[j].rows.dtype, rewritten[j].rows.device))
        corrections: list[tuple[Tensor, Tensor]] = []
        for j, r in enumerate(rewritten):
            g_sigma, basis = sigma_split(r.spec, r.rows, r.grad, GXt[j])
            rewritten[j] = r._replace(grad=basis)
            steps = self._sigma_adam(ctx.state, ctx.group, [ctx.group["params"][i] for i in r.ids], g_sigma,
                                     ctx.lists, r.pos)
            delta = sigma_correction(r.spec, r.rows, steps)
            delta = delta if r.side == "A" else delta.transpose(1, 2)
            targets = [ctx.lists["params"][q] for q in r.pos]
            corrections += [(p, d.reshape(p.shape).to(p.dtype)) for p, d in zip(targets, delta)]
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
