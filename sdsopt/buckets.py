"""Mode-neutral batching of LoRA pairs: pairs of one param group with equal shapes, dtypes, device and gradient
presence form a :class:`Bucket`, stepped by batched ops; buckets of one rank and dtype form the fused kernels'
families (:func:`sdsopt.fused.families`).  Also the stacking helpers every batched mode uses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import fused
from .adam import AdamLists
from .distributed import is_dtensor, local

__all__ = ["STACK_CHUNK_BYTES", "Bucket", "Bucketing", "chunks", "drop_positions", "fused_bucket", "split_fused", "stacked",
           "stacked_factors", "unstack"]

STACK_CHUNK_BYTES = 2**30
"""Most bytes of one :func:`chunks` piece's stacked factors (both kinds, in the algebra's dtype): a mode's torch
path stacks a piece, not a whole bucket, so its extra memory stays bounded at any rank and model size."""


@dataclass
class Bucket:
    """LoRA pairs of one param group that share shapes, dtypes, device, which factors have grads and the mode's
    phase (``sds``: past the warm-up, in coordinates)."""

    a_shape: torch.Size
    b_shape: torch.Size
    has_a: bool
    has_b: bool
    phase: bool = False
    a: list[int] = field(default_factory=list)  # indices of the A factors in the group's params
    b: list[int] = field(default_factory=list)

    @property
    def layer(self) -> tuple[int, int]:
        """``(m, n)``: the outputs and inputs of the pairs' layer, from the whole factors' shapes (also under FSDP2,
        where the factors are local shards and every rank must take the same step)."""
        return self.b_shape[0], math.prod(self.a_shape[1:])


class Bucketing:
    """One mode's buckets and fused families per param group, cached while the pairs with gradients and their
    phases stay the same (the per-pair loop then runs only when that changes)."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[Any, ...]] = {}
        self._families: dict[int, tuple[list[Bucket], list[fused.Family]]] = {}

    def buckets(self, gi: int, group: dict[str, Any], position: dict[int, int],
                phases: Sequence[bool] | None = None) -> list[Bucket]:
        """The buckets of group ``gi``'s pairs with a gradient (``position``: param index → slot in the step's
        lists); ``phases``: per pair, the mode's phase (``None``: all False)."""
        pairs = group["lora_pairs"]
        phases = phases if phases is not None else (False,) * len(pairs)
        key = tuple((ia in position, ib in position, ph) for (ia, ib), ph in zip(pairs, phases))
        cached = self._buckets.get(gi)
        if cached is not None and cached[0] == key and cached[1] is pairs:
            return cached[2]
        params: list[Tensor] = group["params"]
        found: dict[tuple[Any, ...], Bucket] = {}
        for (ia, ib), (has_a, has_b, phase) in zip(pairs, key):
            if not (has_a or has_b):
                continue
            A, B = params[ia], params[ib]
            k = (A.shape, B.shape, A.dtype, B.dtype, A.device, has_a, has_b, phase)
            bucket = found.setdefault(k, Bucket(a_shape=A.shape, b_shape=B.shape, has_a=has_a, has_b=has_b,
                                                 phase=phase))
            bucket.a.append(ia)
            bucket.b.append(ib)
        buckets = list(found.values())
        self._buckets[gi] = (key, pairs, buckets)
        return buckets

    def families(self, gi: int, group: dict[str, Any], buckets: list[Bucket]) -> list[fused.Family]:
        """:func:`sdsopt.fused.families` of the group's kernel buckets, cached while the buckets are the same."""
        cached = self._families.get(gi)
        if cached is not None and len(cached[0]) == len(buckets) and all(a is b for a, b in zip(cached[0], buckets)):
            return cached[1]
        out = fused.families(group, buckets)
        self._families[gi] = (list(buckets), out)
        return out


def fused_bucket(group: dict[str, Any], bucket: Bucket) -> bool:
    """Do the Triton kernels of :mod:`sdsopt.fused` step ``bucket`` (``fused=True``: CUDA, float32/bf16/fp16
    factors of rank ≤ :func:`sdsopt.fused.max_rank` with float32 algebra, not FSDP2 shards)?"""
    if not group["fused"] or group["linalg_dtype"] not in (None, torch.float32):
        return False
    A, B = group["params"][bucket.a[0]], group["params"][bucket.b[0]]
    return (fused.available(A) and fused.supported(A.dtype, A.shape[0]) and A.dtype == B.dtype
            and not (is_dtensor(A) or is_dtensor(B)))


def split_fused(group: dict[str, Any], buckets: list[Bucket]) -> tuple[list[Bucket], list[Bucket]]:
    """``(kernel buckets, torch buckets)``: with ``fused=True`` the buckets the Triton kernels step
    (:func:`fused_bucket`)."""
    kernel: list[Bucket] = []
    rest: list[Bucket] = []
    for b in buckets:
        (kernel if fused_bucket(group, b) else rest).append(b)
    return kernel, rest


def drop_positions(lists: AdamLists, done: set[int]) -> None:
    """Take the positions ``done`` (stepped by the mode itself) out of the lists of the common Adam call."""
    if done and len(done) == len(lists["params"]):  # every parameter of the group was a stepped factor
        for key in lists:
            lists[key] = []
    elif done:
        for key, values in lists.items():
            if values:
                lists[key] = [v for q, v in enumerate(values) if q not in done]


def chunks(bucket: Bucket, dt: torch.dtype) -> list[Bucket]:
    """``bucket`` as consecutive runs of its pairs whose factors, stacked in ``dt``, hold at most
    :data:`STACK_CHUNK_BYTES` (at least one pair each; the bucket itself when it fits): a torch path that
    stacks one run at a time keeps its extra memory bounded, while its launches grow only with the bytes
    stepped, not with the pair count."""
    per_pair = (math.prod(bucket.a_shape) + math.prod(bucket.b_shape)) * dt.itemsize
    size = max(1, STACK_CHUNK_BYTES // per_pair)
    if len(bucket.a) <= size:
        return [bucket]
    return [replace(bucket, a=bucket.a[i:i + size], b=bucket.b[i:i + size]) for i in range(0, len(bucket.a), size)]


def stacked(group: dict[str, Any], ids: list[int], side: str, dt: torch.dtype) -> Tensor:
    """The factors ``ids`` of one kind stacked in ``dt``, natural layout: ``A`` ``[k, r, n]`` (``side='A'``),
    ``B`` ``[k, m, r]`` (``side='B'``; local shards under FSDP2)."""
    params: list[Tensor] = group["params"]
    X = torch.stack([local(params[i]) for i in ids]).to(dt)
    return X.view(len(ids), X.shape[1], -1) if side == "A" else X.view(len(ids), X.shape[1], X.shape[2])


def stacked_factors(group: dict[str, Any], ids_a: list[int], ids_b: list[int], dt: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
    """:func:`stacked` for both kinds: ``(A [k, r, n], B [k, m, r])``."""
    return stacked(group, ids_a, "A", dt), stacked(group, ids_b, "B", dt)


def unstack(stacked: Tensor, shape: torch.Size) -> list[Tensor] | tuple[Tensor, ...]:
    """The slices of ``stacked`` along dim 0 as tensors of ``shape``: one ``unbind`` (views, no copy), and a
    view per slice only where the shapes differ (conv factors).  Per-slice indexing would cost one dispatched
    op per parameter and step, the bulk of a step's host time at hundreds of pairs."""
    parts = stacked.unbind(0)
    return parts if parts[0].shape == shape else [t.view(shape) for t in parts]
