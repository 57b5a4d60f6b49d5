"""The fused step of ``SDSAdamW(..., fused=True)`` on CUDA: LoRA pairs stepped by the Triton kernels of
:mod:`sdsopt.kernels`, on the parameters' own storage.

Per param group and step, the pairs a mode hands over (mode ``sds``: those past their warm-up; ``scaled``,
``sds_polar`` without the σ channel: all) are grouped into *families* of one rank and dtype, whatever their
shapes.  A family steps in

1. two Gram launches (all ``A`` factors, all ``B`` factors: :func:`grams`), into one ``[2k, r, r]`` float32
   batch ``K = [K_A; K_B]``;
2. the mode's r×r algebra on that batch, batched over every pair of the family (a handful of torch calls:
   Cholesky, triangular inverse, ...);
3. one step-count increment (``_foreach_add_``, as torch's fused AdamW) and two Adam launches
   (:func:`adam`), each over every factor of one kind.

Nothing is stacked or copied: the kernels read each tensor through an int64 entry table of data pointers
(:class:`Tables`, rebuilt only when a pointer changes), so the extra memory of the step is the r×r batches.
Nothing reads a value on the host either, so with ``fused=True`` and pairs past ``sds``'s warm-up and ramp a
whole training step can be captured in a CUDA graph.

Map-index convention: in ``K``, pair ``q`` (of ``k``) has ``K_A`` at ``q`` and ``K_B`` at ``k + q``; an ``A``
factor is stepped with the maps of its partner's Gram (index ``k + q``), a ``B`` factor with those at ``q``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    from . import kernels
except ImportError:  # CPU-only installs: the step keeps its torch path
    triton = None

__all__ = ["MAX_RANK", "Family", "Tables", "adam", "available", "families", "grams", "supported"]


def available(t: Tensor) -> bool:
    """Can the kernels step tensors like ``t``?  On CUDA with Triton installed (and on the CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1``, which the tests use to check the kernels without a GPU)."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@dataclass
class Family:
    """Pairs ``(ia, ib)`` (indices into the group's params) of one rank and dtype; ``has_a``/``has_b`` per pair."""

    r: int
    dtype: torch.dtype
    pairs: list[tuple[int, int]] = field(default_factory=list)
    has_a: list[bool] = field(default_factory=list)
    has_b: list[bool] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.pairs)


def families(group: dict[str, Any], buckets: Sequence[Any]) -> list[Family]:
    """The buckets' pairs (:class:`sdsopt.modes.Bucket`) grouped by rank and dtype."""
    params: list[Tensor] = group["params"]
    out: dict[tuple[int, torch.dtype], Family] = {}
    for bucket in buckets:
        r, dtype = bucket.a_shape[0], params[bucket.a[0]].dtype
        fam = out.setdefault((r, dtype), Family(r, dtype))
        fam.pairs += list(zip(bucket.a, bucket.b))
        fam.has_a += [bucket.has_a] * len(bucket.a)
        fam.has_b += [bucket.has_b] * len(bucket.a)
    return list(out.values())


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 128
"""Largest rank the kernels take: a program holds r×r maps and r-row tiles on chip (larger r: the torch path)."""


def supported(dtype: torch.dtype, r: int) -> bool:
    """Factors the kernels take: float32/bf16/fp16 (float64 ones keep the torch path, whose algebra is float64)
    of rank ≤ :data:`MAX_RANK`."""
    return dtype in _DTYPES and r <= MAX_RANK


def _tl_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class Tables:
    """The int64 entry tables of the kernels (:data:`sdsopt.kernels.FIELDS` columns), cached per key and rebuilt
    (one host-to-device copy) only when a data pointer changes, e.g. when gradients are re-allocated."""

    def __init__(self) -> None:
        self._cache: dict[Any, tuple[tuple[tuple[int, ...], ...], Tensor]] = {}

    def get(self, key: Any, rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
        rows_t = tuple(rows)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == rows_t:
            return hit[1]
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        self._cache[key] = (rows_t, table)
        return table

    def constant(self, key: Any, values: list[Any], device: torch.device, dtype: torch.dtype) -> Tensor:
        """A device tensor of host ``values`` (per-pair constants of a family), cached as the tables are."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == tuple(values):
            return hit[1]
        out = torch.tensor(values, dtype=dtype, device=device)
        self._cache[key] = (tuple(values), out)
        return out


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _blocks(r: int) -> tuple[int, int, int]:
    """``(RP, BP, warps)``: r padded to a power of two ≥ 16 (``tl.dot``'s minimum), the column block (a tile of
    at most 4096 float32 per operand) and the warps per program."""
    rp = max(16, triton.next_power_of_2(r))
    return rp, max(16, min(128, 4096 // rp)), 4 if rp <= 32 else 8


def _precision(device: torch.device) -> str:
    return "tf32x3" if device.type == "cuda" else "ieee"


def grams(tables: Tables, key: Any, group: dict[str, Any], fam: Family) -> Tensor:
    """``K = [K_A; K_B]`` ``[2k, r, r]`` float32 for the family's pairs: two launches, one program per factor."""
    params: list[Tensor] = group["params"]
    device = params[fam.pairs[0][0]].device
    K = torch.empty(2 * fam.k, fam.r, fam.r, dtype=torch.float32, device=device)
    rp, bp, warps = _blocks(fam.r)
    for side, trans in ((0, False), (1, True)):
        rows = []
        for q, pair in enumerate(fam.pairs):
            x = params[pair[side]]
            rows.append((x.data_ptr(), 0, 0, 0, 0, 0, x.numel() // fam.r, q))
        table = tables.get((key, "gram", side), rows, device)
        kernels.gram_kernel[(fam.k,)](table, K[side * fam.k:], fam.r, TRANS=trans, RP=rp, BP=bp,
                                      DT=_tl_dtype(fam.dtype),
                                      PREC=_precision(device), num_warps=warps)
    return K


def adam(tables: Tables, key: Any, group: dict[str, Any], fam: Family, lists: dict[str, list[Tensor]],
         position: dict[int, int], *, gmaps: Tensor, fmaps: Tensor | None, scales: Tensor | None,
         ramps: Tensor | None, found_inf: Tensor | None) -> set[int]:
    """The Adam step of every factor of the family that has a gradient (module docstring, step 3), with maps
    ``gmaps`` (``G``) and ``fmaps`` (``F``; ``None``: a rewrite mode) ``[2k, r, r]`` float32, re-balancing
    ``scales`` ``[2k]`` (indexed as the maps) and ``ramps`` ``[k]``.  Returns the positions stepped (to be taken
    out of ``lists``)."""
    params: list[Tensor] = group["params"]
    device = params[fam.pairs[0][0]].device
    gmaps = gmaps.contiguous()  # row-major r×r (no copy unless a solver returned column-major batches)
    fmaps = None if fmaps is None else fmaps.contiguous()
    rp, bp, warps = _blocks(fam.r)
    amsgrad = group["amsgrad"]
    beta1, beta2 = group["betas"]
    launches, steps, done = [], [], set()
    for side, trans, present in ((0, False, fam.has_a), (1, True, fam.has_b)):
        rows, longest = [], 0
        for q, (pair, has) in enumerate(zip(fam.pairs, present)):
            if not has:
                continue
            pos = position[pair[side]]
            x = lists["params"][pos]
            g = lists["grads"][pos]
            if g.dtype != x.dtype or not (x.is_contiguous() and g.is_contiguous()):
                raise RuntimeError(f"SDSAdamW fused step: {tuple(x.shape)} factor with a {g.dtype} or strided "
                                   "gradient; pass fused=False for this model.")
            p = x.numel() // fam.r
            rows.append((x.data_ptr(), g.data_ptr(), lists["exp_avgs"][pos].data_ptr(),
                         lists["exp_avg_sqs"][pos].data_ptr(),
                         _ptr(lists["max_exp_avg_sqs"][pos] if amsgrad else None),
                         lists["state_steps"][pos].data_ptr(), p, q))
            steps.append(lists["state_steps"][pos])
            done.add(pos)
            longest = max(longest, p)
        if rows:
            launches.append((side, trans, tables.get((key, "adam", side), rows, device), len(rows), longest))
    if not steps:
        return done
    torch._foreach_add_(steps, 1)
    lr = group["lr"]
    for side, trans, table, n, longest in launches:
        grid = (n, triton.cdiv(longest, bp))
        kernels.adam_kernel[grid](
            table, gmaps[(1 - side) * fam.k:], gmaps if fmaps is None else fmaps[(1 - side) * fam.k:],
            gmaps if scales is None else scales[(1 - side) * fam.k:], gmaps if ramps is None else ramps,
            lr if isinstance(lr, Tensor) else gmaps, gmaps if found_inf is None else found_inf,
            fam.r, 0.0 if isinstance(lr, Tensor) else float(lr), beta1, beta2, group["eps"],
            group["weight_decay"],
            TRANS=trans, COORD=fmaps is not None, HAS_SCALE=scales is not None, HAS_RAMP=ramps is not None,
            HAS_FOUND_INF=found_inf is not None, LR_TENSOR=isinstance(lr, Tensor), AMSGRAD=amsgrad,
            MAXIMIZE=group["maximize"], RP=rp, BP=bp, DT=_tl_dtype(fam.dtype), PREC=_precision(device),
            num_warps=warps)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    return done
