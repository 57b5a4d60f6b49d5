"""The fused step of ``SDSAdamW(..., fused=True)`` on CUDA: LoRA pairs stepped by the Triton kernels of
:mod:`sdsopt.kernels`, on the parameters' own storage.

Per param group and step, the pairs a mode hands over (mode ``sds``: those past their warm-up; ``scaled``,
``sds_polar`` without the σ channel: all) are grouped into *families* of one rank and dtype, whatever their
shapes.  A family steps in

1. per factor kind (all ``A`` factors, all ``B`` factors) a Gram launch over work items and an ordered sum of its
   partial sums (:func:`grams`), into one ``[2k, r, r]`` float32 batch ``K = [K_A; K_B]``;
2. the mode's r×r algebra on that batch, batched over every pair of the family: mode ``sds`` one launch
   (:func:`frames`: Cholesky factors, their inverses, the maps back, the re-balancing scales);
   ``scaled`` one launch too (:func:`inverses`); ``sds_polar`` its preconditioner by torch calls
   (:func:`sdsopt.spectral.preconditioner`);
3. one step-count increment (``_foreach_add_``, as torch's fused AdamW) and two Adam launches
   (:func:`adam`), each over every factor of one kind.

Nothing is stacked or copied: the kernels read each tensor through an int64 entry table of data pointers and a
table of work items (:class:`Tables`, rebuilt only when a pointer changes), so the extra memory of the step is
the r×r batches (and the Gram's partial sums, one r×r per work item).
Nothing reads a value on the host either, so with ``fused=True`` and pairs past ``sds``'s warm-up and ramp a
whole training step can be captured in a CUDA graph.

Map-index convention: in ``K``, pair ``q`` (of ``k``) has ``K_A`` at ``q`` and ``K_B`` at ``k + q``; an ``A``
factor is stepped with the maps of its partner's Gram (index ``k + q``), a ``B`` factor with those at ``q``.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .adam import side_lr
from .coordinates import balance_scales, factor_map, lower_inverse
from .linalg import cholesky_lower, finite_or_zero
from .spectral import damped_inverse, preconditioner

try:
    import triton
    import triton.language as tl

    from . import kernels
except ImportError:  # CPU-only installs: the step keeps its torch path
    triton = None

__all__ = ["HELD_RANK", "MAX_RANK", "Family", "Launch", "Tables", "adam", "available", "families", "frames", "grams",
           "inverses", "launch", "max_rank", "supported", "vector_width"]

GRAM_CHUNK = 2048
"""Columns per work item of the Gram kernel (its partial sums: one r×r float32 per item)."""
ADAM_CHUNK = 8
"""Column blocks per work item of the Adam kernel (its r×r maps are loaded once per item)."""


def available(t: Tensor) -> bool:
    """Can the kernels step tensors like ``t``?  On CUDA with Triton installed (and on the CPU under Triton's
    interpreter, ``TRITON_INTERPRET=1``, which the tests use to check the kernels without a GPU), unless the
    environment sets ``SDSOPT_KERNELS=0`` (``fused=True`` then takes the torch-ops step: for A/B runs and
    bisecting)."""
    if triton is None or os.environ.get("SDSOPT_KERNELS", "1") == "0":
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
    roots: list[float] = field(default_factory=list)  # √min(m, n) per pair (mode sds's step damping)

    @property
    def k(self) -> int:
        return len(self.pairs)


def families(group: dict[str, Any], buckets: Sequence[Any]) -> list[Family]:
    """The buckets' pairs (:class:`sdsopt.buckets.Bucket`) grouped by rank and dtype."""
    params: list[Tensor] = group["params"]
    out: dict[tuple[int, torch.dtype], Family] = {}
    for bucket in buckets:
        r, dtype = bucket.a_shape[0], params[bucket.a[0]].dtype
        fam = out.setdefault((r, dtype), Family(r, dtype))
        fam.pairs += list(zip(bucket.a, bucket.b))
        fam.has_a += [bucket.has_a] * len(bucket.a)
        fam.has_b += [bucket.has_b] * len(bucket.a)
        fam.roots += [math.sqrt(min(bucket.layer))] * len(bucket.a)
    return list(out.values())


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 256
"""Largest rank the kernels take (:func:`max_rank`: the largest they are given).  Up to :data:`HELD_RANK` an Adam
program holds the r×r maps in registers; above it (three r×r float32 maps and their TF32 splits would ask for
400 KB of on-chip memory at r = 128, beyond an H100's 227 KB) the step makes two matrix-product passes
(:func:`sdsopt.kernels.pass_kernel`), the Grams are computed in tiles and the frames by batched torch calls
(:func:`frames`).  Larger ranks (not measured) keep the torch path."""
HELD_RANK = 64
"""Largest rank whose r×r maps a program holds (:func:`sdsopt.kernels.adam_kernel`,
:func:`sdsopt.kernels.frames_kernel`)."""


def max_rank() -> int:
    """The largest rank ``fused=True`` steps by the kernels: :data:`MAX_RANK`, or less where the environment sets
    ``SDSOPT_KERNELS_MAX_RANK`` (e.g. 64: ranks above it take the torch path, for A/B runs and bisecting)."""
    value = os.environ.get("SDSOPT_KERNELS_MAX_RANK")
    if value is None:
        return MAX_RANK
    if not value.isdigit() or not 1 <= int(value) <= MAX_RANK:
        raise ValueError(f"SDSOPT_KERNELS_MAX_RANK={value!r}: expected a rank from 1 to {MAX_RANK} (e.g. 64), the "
                         f"largest rank the fused kernels step; unset it for the default {MAX_RANK}")
    return int(value)


def supported(dtype: torch.dtype, r: int) -> bool:
    """Factors the kernels take: float32/bf16/fp16 (float64 ones keep the torch path, whose algebra is float64)
    of rank ≤ :func:`max_rank`."""
    return dtype in _DTYPES and r <= max_rank()


def _tl_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class Tables:
    """The kernels' int64 entry tables (:data:`sdsopt.kernels.FIELDS` columns) and work items, cached per key.

    A table is rebuilt (one host-to-device copy) only when the parameters' or gradients' data pointers change
    (gradients re-allocated by ``zero_grad(set_to_none=True)`` usually get the same blocks back) or the state
    tensors are other objects (``load_state_dict``); the cache holds those objects, so an identity cannot be
    reused by a new tensor while its table is cached.  Layout (contiguity) is checked when a table is built.
    """

    def __init__(self) -> None:
        self._cache: dict[Any, tuple[Any, ...]] = {}
        self.memo: dict[Any, SideLists] = {}  # per family and side: its positions in the step's lists

    def get(self, key: Any, ptrs: tuple[int, ...], objs: list[Tensor], build: Any,
            device: torch.device) -> tuple[Tensor, Tensor, int, int]:
        """``(table, items, item count, vec)`` for ``key``: cached while the data pointers ``ptrs`` are equal and
        the tensors ``objs`` (state) are the same objects, else from ``build() -> (rows, items, vec)`` (``vec``:
        :func:`vector_width`)."""
        hit = self._cache.get(key)
        if (hit is not None and hit[0] == ptrs and len(hit[1]) == len(objs)
                and all(map(operator.is_, hit[1], objs))):
            return hit[2]
        rows, items, vec = build()
        value = (_to_device(rows, torch.int64, device), _to_device(items, torch.int64, device), len(items), vec)
        self._cache[key] = (ptrs, objs, value)
        return value

    def constant(self, key: Any, values: list[Any], device: torch.device, dtype: torch.dtype) -> Tensor:
        """A device tensor of host ``values`` (per-pair constants of a family), cached as the tables are."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == tuple(values):
            return hit[1]
        out = _to_device(values, dtype, device)
        self._cache[key] = (tuple(values), out)
        return out


def _to_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values on ``device`` without a synchronising copy (pinned memory, ``non_blocking``; the caching host
    allocator keeps the buffer until the copy is done), so that no step waits for the device."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


@dataclass(frozen=True)
class Launch:
    """Launch settings of the kernels for one rank: ``rp`` (r padded to a power of two ≥ 16, ``tl.dot``'s
    minimum), per kernel the column block, warps, software-pipelining stages and matmul precision (``tf32x3``:
    three TF32 tensor-core passes, float32 accuracy; ``tf32``: one; ``native``: 16-bit operands; ``ieee``: float32
    FMAs)."""

    rp: int
    adam_bp: int
    adam_warps: int
    adam_stages: int
    gram_bp: int
    gram_warps: int
    gram_stages: int
    precision: str  # the Adam kernel's products with the r×r maps (g̃ = G g and the map back)
    gram_precision: str
    gram_tile: int  # rows and columns of the Gram tile a program computes (= rp up to HELD_RANK)
    adam_tm: int  # two passes: rows of the factor per program (= rp up to HELD_RANK)
    adam_kt: int  # two passes: columns of the maps per product (= rp up to HELD_RANK: the maps held whole)

    @property
    def two_pass(self) -> bool:
        """Does the Adam step run as two matrix-product passes (:func:`sdsopt.kernels.pass_kernel`) instead of
        one program holding the maps (:func:`sdsopt.kernels.adam_kernel`)?"""
        return self.adam_kt < self.rp


def _padded(r: int) -> int:
    """r padded to a power of two ≥ 16 (``tl.dot``'s smallest operand), the kernels' tile height."""
    return max(16, triton.next_power_of_2(r))


def launch(r: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Launch:
    """The launch settings of the kernels for rank ``r`` (measured: ``benchmarks/kernel_blocks.py``,
    benchmarks/RESULTS.md, section "How fast is the step?"), and the matmul precisions of :mod:`sdsopt.kernels`:

    * the Adam kernel's products with the r×r maps, every dtype: ``tf32x3`` (float32 accuracy, as the torch
      path's algebra).  16-bit or TF32 operands would round the filter ``F``, whose entries are O(1) while the
      partner's weak directions make ``Gᵀû`` large, so the step's error would grow with the partner's
      conditioning (measured: benchmarks/RESULTS.md, section "Precision of the fused step for 16-bit factors");
    * the Grams: float32 factors ``tf32x3``; 16-bit factors ``native`` (16-bit operands: the products of their
      values are exact in float32; float32 accumulation);
    * on the CPU (Triton's interpreter, the tests): ``ieee`` (float32 FMAs) throughout.

    Above :data:`HELD_RANK` (r = 65–256) the Gram is computed in 64 × 64 tiles (those on and above the diagonal:
    the r ≤ 64 kernel's register budget per program) and the Adam step runs as two passes over tiles of 128 rows ×
    64 columns, 32 of the maps' columns per product, 8 warps, 2 stages (measured on an H100 against a one-pass
    kernel and the torch path: benchmarks/RESULTS.md, section 3.4).
    """
    rp = _padded(r)
    if device.type != "cuda":
        products = gram = "ieee"
    else:
        products = "tf32x3"
        gram = "tf32x3" if dtype == torch.float32 else "native"
    if rp <= HELD_RANK:
        return Launch(rp=rp, adam_bp=max(16, min(64, 2048 // rp)), adam_warps=4, adam_stages=1, gram_bp=64,
                      gram_warps=4, gram_stages=2, precision=products, gram_precision=gram, gram_tile=rp, adam_tm=rp,
                      adam_kt=rp)
    return Launch(rp=rp, adam_bp=64, adam_warps=8, adam_stages=2, gram_bp=64, gram_warps=4, gram_stages=2,
                  precision=products, gram_precision=gram, gram_tile=64, adam_tm=128, adam_kt=32)


def vector_width(tensors: list[Tensor], lengths: list[int], r: int, trans: bool) -> int:
    """The kernels' ``VEC`` for a table of these factors: elements per 16 bytes where every data pointer is 16-byte
    aligned and every length ``p`` (and for ``B``, read in rows of ``r``, the rank) is a multiple of it, so that
    tiles load and store as 16-byte vectors; else 1 (no promise).  Work-item bounds are multiples of the chunks
    (:data:`GRAM_CHUNK`, ``ADAM_CHUNK × BLOCK_P``, multiples of 16) or ``p``."""
    vec = 16 // tensors[0].element_size()
    ok = (all(t.data_ptr() % 16 == 0 for t in tensors) and all(p % vec == 0 for p in lengths)
          and (not trans or r % vec == 0))
    return vec if ok else 1


def _chunks(lengths: list[int], chunk: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """Work items ``(entry, c0, c1)`` of at most ``chunk`` columns, and per entry ``(first item, count)``."""
    items, spans = [], []
    for j, p in enumerate(lengths):
        spans.append((len(items), max(1, -(-p // chunk))))
        items += [(j, c, min(c + chunk, p)) for c in range(0, p, chunk)] or [(j, 0, 0)]
    return spans, items


def grams(tables: Tables, key: Any, group: dict[str, Any], fam: Family) -> Tensor:
    """``K = [K_A; K_B]`` ``[2k, r, r]`` float32 for the family's pairs: per factor kind one launch over work
    items of :data:`GRAM_CHUNK` columns and the Gram's tiles (:attr:`Launch.gram_tile`; one up to
    :data:`HELD_RANK`), then one launch that adds each factor's partial sums, tile by tile."""
    params: list[Tensor] = group["params"]
    device = params[fam.pairs[0][0]].device
    K = torch.empty(2 * fam.k, fam.r, fam.r, dtype=torch.float32, device=device)
    cfg = launch(fam.r, device, fam.dtype)
    for side, trans in ((0, False), (1, True)):
        factors = [params[pair[side]] for pair in fam.pairs]
        ptrs = tuple(map(Tensor.data_ptr, factors))  # (map: no generator frame per tensor)

        def build(factors=factors, ptrs=ptrs):
            lengths = [x.numel() // fam.r for x in factors]
            spans, items = _chunks(lengths, GRAM_CHUNK)
            rows = [(ptr, first, count, 0, 0, 0, p, q)
                    for q, (ptr, (first, count), p) in enumerate(zip(ptrs, spans, lengths))]
            return rows, items, vector_width(factors, lengths, fam.r, trans)

        table, items, n, vec = tables.get((key, "gram", side), ptrs, [], build, device)
        tm = cfg.gram_tile
        nt = -(-fam.r // tm)
        ws = torch.empty(n, nt, nt, tm, tm, dtype=torch.float32, device=device)
        kernels.gram_kernel[(n, nt, nt)](table, items, ws, fam.r, NT=nt, TRANS=trans, TM=tm, BP=cfg.gram_bp,
                                         DT=_tl_dtype(fam.dtype), PREC=cfg.gram_precision, VEC=vec,
                                         num_warps=cfg.gram_warps, num_stages=cfg.gram_stages)
        kernels.gram_sum_kernel[(fam.k, nt, nt)](table, ws, K[side * fam.k:], fam.r, NT=nt, TM=tm, num_warps=4)
        del ws
    return K


def frames(K: Tensor, k: int, tol: float, shifts: Tensor | None, both: Tensor | None
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mode ``sds``'s maps for ``K = [K_A; K_B]`` (``[2k, r, r]`` float32): ``(G, M, scales)`` with ``G = L^{-1}``
    and the map back ``M`` of :func:`sdsopt.kernels.frames_kernel` (``L Lᵀ = K + (τ·trace K + μ_s)·I``,
    ``shifts``: ``μ_s`` per pair or ``None``), and the re-balancing scales ``[2k]`` of the pairs marked in
    ``both`` (``None``: none).  Up to :data:`HELD_RANK` one launch, one program per Gram (the torch ops it
    replaces cost ~40 launches of host time per step); above, where a program cannot hold an r×r matrix, the
    torch path's batched calls on the whole family at once (:func:`_frames_batched`: ~60 small launches)."""
    if _padded(K.shape[-1]) > HELD_RANK:
        return _frames_batched(K, k, tol, shifts, both)
    G, M = torch.empty_like(K), torch.empty_like(K)
    scales = torch.empty(2 * k, dtype=K.dtype, device=K.device) if both is not None else None
    _frames(K, G, M, k, tol, 0.0, shifts, both, scales, inverse=False)
    return G, M, scales


def _frames_batched(K: Tensor, k: int, tol: float, shifts: Tensor | None, both: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`frames` by :func:`sdsopt.linalg.cholesky_lower`, :func:`sdsopt.coordinates.lower_inverse`,
    :func:`sdsopt.coordinates.factor_map` and :func:`sdsopt.coordinates.balance_scales`, batched over the
    ``2k`` Grams (nothing read on the host)."""
    shift: Tensor | float = 0.0 if shifts is None else shifts.repeat(2).view(-1, 1, 1)
    G = lower_inverse(cholesky_lower(K, tol, shift=shift))
    M = factor_map(K, G, shift)
    if both is None:
        return G, M, None
    c, _ = balance_scales(K[:k], K[k:])
    c = torch.where(both.view(-1, 1, 1) != 0, c, 1.0).view(-1)
    return G, M, torch.cat([1.0 / c, c])


def inverses(K: Tensor, k: int, tol: float, damping: float) -> Tensor:
    """Mode ``scaled``'s preconditioners ``P = (K + (τ·trace K + δ)·I)^{-1}`` for ``K = [K_A; K_B]``, as
    :func:`sdsopt.spectral.preconditioner`'s Cholesky route computes them (``K = 0`` gives ``δ^{-1}·I``), in one
    launch (above :data:`HELD_RANK`: by that route's batched calls)."""
    if _padded(K.shape[-1]) > HELD_RANK:
        return preconditioner(finite_or_zero(K), f=damped_inverse, route="cholesky", rank_tol=tol, damping=damping)
    P = torch.empty_like(K)
    _frames(K, P, P, k, tol, damping, None, None, None, inverse=True)
    return P


def _frames(K: Tensor, G: Tensor, M: Tensor, k: int, tol: float, shift0: float, shifts: Tensor | None,
            both: Tensor | None, scales: Tensor | None, *, inverse: bool) -> None:
    rp = _padded(K.shape[-1])
    kernels.frames_kernel[(2 * k,)](K, G, M, K if scales is None else scales, K if shifts is None else shifts,
                                K if both is None else both, k, K.shape[-1], tol, shift0,
                                HAS_SHIFT=shifts is not None, HAS_SCALE=both is not None, INVERSE=inverse, RP=rp,
                                num_warps=1 if rp == 16 else 4)  # (measured: benchmarks/kernel_blocks.py)


class SideLists(NamedTuple):
    """One factor kind of a family in the step's lists, memoised while the position map is the same object:
    the pairs ``qs`` (of the family) with a gradient, their positions ``pos``, parameters and state lists
    (``exp_avgs``, ``exp_avg_sqs``, ``state_steps``, ``max_exp_avg_sqs``; the last empty without amsgrad)."""

    position: dict[int, int]
    family: Family
    amsgrad: bool
    qs: list[int]
    pos: list[int]
    params: list[Tensor]
    state: AdamState


class AdamState(NamedTuple):
    """The Adam state lists of one factor kind of a family, in the order of its pairs."""

    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]
    max_exp_avg_sqs: list[Tensor]


def _side_lists(lists: dict[str, list[Tensor]], position: dict[int, int], fam: Family, side: int,
                present: list[bool], amsgrad: bool) -> SideLists:
    """The :class:`SideLists` of factor kind ``side`` (0: A, 1: B) of ``fam``."""
    qs = [q for q, has in enumerate(present) if has]
    pos = [position[fam.pairs[q][side]] for q in qs]
    state = AdamState(*([lists[name][i] for i in pos] for name in ("exp_avgs", "exp_avg_sqs", "state_steps")),
                      [lists["max_exp_avg_sqs"][i] for i in pos] if amsgrad else [])
    return SideLists(position, fam, amsgrad, qs, pos, [lists["params"][i] for i in pos], state)


def adam(tables: Tables, key: Any, group: dict[str, Any], fam: Family, lists: dict[str, list[Tensor]],
         position: dict[int, int], *, gmaps: Tensor, mmaps: Tensor | None, scales: Tensor | None,
         ramps: Tensor | None, found_inf: Tensor | None) -> set[int]:
    """The Adam step of every factor of the family that has a gradient (module docstring, step 3), with maps
    ``gmaps`` (``G``) and ``mmaps`` (the maps back ``M``; ``None``: a rewrite mode) ``[2k, r, r]`` float32,
    re-balancing ``scales`` ``[2k]`` (indexed as the maps) and ``ramps`` ``[k]``.  Returns the positions stepped
    (to be taken out of ``lists``)."""
    params: list[Tensor] = group["params"]
    device = params[fam.pairs[0][0]].device
    gmaps = gmaps.contiguous()  # row-major r×r (no copy unless a solver returned column-major batches)
    mmaps = None if mmaps is None else mmaps.contiguous()
    cfg = launch(fam.r, device, fam.dtype)
    amsgrad = group["amsgrad"]
    beta1, beta2 = group["betas"]
    launches, steps, done = [], [], set()
    for side, trans, present in ((0, False, fam.has_a), (1, True, fam.has_b)):
        memo = tables.memo.get((key, "lists", side))
        if memo is None or memo.position is not position or memo.family is not fam or memo.amsgrad != amsgrad:
            memo = _side_lists(lists, position, fam, side, present, amsgrad)
            tables.memo[(key, "lists", side)] = memo
        qs, pos, x = memo.qs, memo.pos, memo.params  # the same position map: the same parameters and state tensors
        state = memo.state
        if not qs:
            continue
        g = [lists["grads"][i] for i in pos]
        ptrs = tuple(map(Tensor.data_ptr, x + g))

        def build(x=x, g=g, state=state, qs=qs):
            for xi, gi in zip(x, g):
                if gi.dtype != xi.dtype or gi.shape != xi.shape or not (xi.is_contiguous() and gi.is_contiguous()):
                    raise RuntimeError(f"SDSAdamW(fused=True): a {tuple(xi.shape)} LoRA factor has a {gi.dtype} "
                                       f"gradient of shape {tuple(gi.shape)} or a strided layout; the kernels need "
                                       "contiguous gradients of the parameter's dtype. Pass fused=False.")
            lengths = [t.numel() // fam.r for t in x]
            _, items = _chunks(lengths, ADAM_CHUNK * cfg.adam_bp)
            rows = [(xi.data_ptr(), gi.data_ptr(), mi.data_ptr(), vi.data_ptr(), wi.data_ptr() if amsgrad else 0,
                     si.data_ptr(), p, q)
                    for xi, gi, mi, vi, si, wi, p, q in zip(x, g, state.exp_avgs, state.exp_avg_sqs,
                                                            state.state_steps, state.max_exp_avg_sqs or x,
                                                            lengths, qs)]
            return rows, items, vector_width(x + g + state.exp_avgs + state.exp_avg_sqs + state.max_exp_avg_sqs,
                                             lengths, fam.r, trans)

        table, items, n, vec = tables.get((key, "adam", side), ptrs, [t for ts in state for t in ts], build, device)
        launches.append((side, trans, table, items, n, vec))
        steps += state.state_steps
        done.update(pos)
    if not steps:
        return done
    torch._foreach_add_(steps, 1)
    lr = group["lr"]
    if isinstance(lr, Tensor):  # read by the kernel on the device (float32), as torch's fused AdamW does
        lr = lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    for side, trans, table, items, n, vec in launches:
        lr_side = side_lr(group, "AB"[side], lr)
        other = (1 - side) * fam.k  # the partner's maps, scales
        lr_tensor = isinstance(lr_side, Tensor)
        tail = (gmaps if scales is None else scales[other:], gmaps if ramps is None else ramps,
                lr_side if lr_tensor else gmaps, gmaps if found_inf is None else found_inf, fam.r,
                0.0 if lr_tensor else float(lr_side), beta1, beta2, group["eps"], group["weight_decay"])
        flags = dict(TRANS=trans, COORD=mmaps is not None, HAS_SCALE=scales is not None, HAS_RAMP=ramps is not None,
                     HAS_FOUND_INF=found_inf is not None, LR_TENSOR=isinstance(lr, Tensor), AMSGRAD=amsgrad,
                     MAXIMIZE=group["maximize"], BP=cfg.adam_bp, DT=_tl_dtype(fam.dtype), PREC=cfg.precision,
                     VEC=vec, num_warps=cfg.adam_warps, num_stages=cfg.adam_stages)
        if not cfg.two_pass:
            kernels.adam_kernel[(n,)](table, items, gmaps[other:], gmaps if mmaps is None else mmaps[other:], *tail,
                                      RP=cfg.rp, **flags)
            continue
        # two passes (above HELD_RANK), each over (row tiles of adam_tm, work items): the coordinates' pass, and
        # with a map back the pass back
        grid = (-(-fam.r // cfg.adam_tm), n)
        kernels.pass_kernel[grid](table, items, gmaps[other:], *tail, BACK=False, TM=cfg.adam_tm, KC=cfg.adam_kt,
                                  **flags)
        if mmaps is not None:
            kernels.pass_kernel[grid](table, items, mmaps[other:], *tail, BACK=True, TM=cfg.adam_tm,
                                      KC=cfg.adam_kt, **flags)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    return done

