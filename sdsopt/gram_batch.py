"""The step's Gram batch: every r×r Gram a mode needs in one step, summed over its process group in one
all-reduce, factorised in one batched call per kind and split back to the requests (docs/math.md (2.1), (3.1)).

Requests that share an r, dtype, device, process group and the mode's ``key`` (τ, the step shift, the route) are
one batch, so neither the collectives (FSDP2 shards: the Grams of local shards are partial sums) nor the
factorisation's launches grow with the pair count or the number of shape buckets.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from .distributed import reduce_parts

__all__ = ["GramRequest", "solve_grams"]

Solved = TypeVar("Solved", bound=tuple)


class GramRequest(NamedTuple):
    """Grams ``K`` ``[k, r, r]`` (partial sums under FSDP2) to be summed over ``group`` (``None``: whole factors)
    and factorised with the mode's ``key`` (what else one factorisation must share: τ, the step shift, the route)."""

    K: Tensor
    group: Any
    key: Hashable


def _rows(value: Any, start: int, stop: int) -> Any:
    """Batch items ``start:stop`` of a solved batch: a Tensor, ``None`` or a NamedTuple of them (views)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[start:stop]
    return type(value)(*(_rows(v, start, stop) for v in value))


def solve_grams(requests: list[GramRequest], solve: Callable[[Hashable, Tensor], Solved]) -> list[Solved]:
    """``solve(key, K)`` of every batch of ``requests``, ``K`` the batch's Grams stacked and summed over their
    process group (one all-reduce per group, dtype and device), split back: one NamedTuple per request, its
    tensors the request's rows (views of the batch's)."""
    pending: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for j, req in enumerate(requests):
        pending[(req.K.shape[-1], req.K.dtype, req.K.device, req.group, req.key)].append(j)
    summed = reduce_parts({batch: torch.cat([requests[j].K for j in js]) for batch, js in pending.items()},
                          lambda batch: (batch[3], batch[1], batch[2]))
    out: list[Any] = [None] * len(requests)
    for batch, js in pending.items():
        solved = solve(batch[4], summed[batch])
        start = 0
        for j in js:
            stop = start + requests[j].K.shape[0]
            out[j] = _rows(solved, start, stop)
            start = stop
    return out
