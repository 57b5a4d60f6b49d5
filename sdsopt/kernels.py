"""Triton kernels of the fused coordinate AdamW step (``SDSAdamW(..., fused=True)`` on CUDA).

Only imported when Triton is (:mod:`sdsopt.fused` decides and launches).  The kernels read the LoRA factors
where they live, through an int64 *entry table* (one row of :data:`FIELDS` per factor: data pointers of the
parameter, its gradient, Adam's moments and step count, its length ``p`` and the index of its r×r maps), so
that nothing is stacked or copied: extra memory is the r×r maps.

Every factor is seen in row form (:mod:`sdsopt.linalg`): ``X`` is ``r × p``; ``A`` (``r × n``, row-major) is
``X`` itself (``TRANS=False``), ``B`` (``m × r``, row-major) is ``X = Bᵀ`` read as ``p × r`` tiles
(``TRANS=True``), so both layouts load contiguous memory.

:func:`gram_kernel` — ``X Xᵀ`` (docs/math.md (2.1)) over one *work item* (a factor's columns ``c0 … c1``) per program,
float32 partial sums, which :func:`gram_sum_kernel` adds in a fixed order (deterministic: no atomics); above
r = 64 in ``TM × TM`` tiles, a program per tile on and above the diagonal, mirrored by the sum.

:func:`frames_kernel` — the r×r algebra of mode ``sds`` in one launch: per pair, both Grams' Cholesky factors,
their inverses ``G = L^{-1}``, the maps back ``M`` and the re-balancing scale (mode ``scaled``: its
preconditioners ``(K + δI)^{-1}``).

:func:`adam_kernel` — one work item per program, in blocks of ``BLOCK_P`` columns (rows of ``B``), its r×r maps
loaded once.  Work items (an int64 ``[n, 3]`` table: entry, first and last column) cut every factor into chunks of
about equal length, so programs are balanced whatever the factors' shapes.  With the factor's map
``G`` (``r × r``) the gradient enters Adam as ``g̃ = G g``; Adam's moments update in place and give the
direction ``û = m̂ / (√v̂ + ε)`` (torch's AdamW: ``m̂ = m/(1−β₁ᵗ)``, ``√v̂ = √v/√(1−β₂ᵗ)``, amsgrad on ``v``);
then, with weight decay ``λ``, learning rate ``η``, the optional ramp ``ρ`` and re-balancing scale ``c``:

* ``COORD=True`` (mode ``sds``, docs/math.md (2.2)): ``G = L^{-1}`` of the partner's frame ``L Lᵀ = K + μI`` and the
  map back ``M = F L^{-T}`` with the filter ``F = (K + μ_s I)(K + μI)^{-1}`` (:func:`frames_kernel`).  Adam's
  change of the coordinates ``X̃ = Lᵀ X`` (never formed), ``−η û``, maps back by ``M``, and the decoupled
  decay acts on the factor (it commutes with the map, (2.6)), as on the torch path::

      X ← c·(X + ρ·ΔX),   ΔX = −η·(M û + λX)

* ``COORD=False`` (modes ``scaled``, ``sds_polar``: docs/math.md (3.1)): ``G = P(K_other)``
  and the update is AdamW's on the factor, ``X ← X − η(û + λX)``.

Above r = 64 a program cannot hold the r×r maps (:data:`sdsopt.fused.HELD_RANK`); the same update runs as two
matrix-product passes of :func:`pass_kernel` (``g̃ = G g`` and the moments; then ``M û`` from the stored moments
and the update).  A one-pass kernel that read the maps in row tiles for every column block was measured slower
(benchmarks/RESULTS.md, section 3.4) and is not kept.

Arithmetic is float32 in registers whatever the parameter dtype; the moments are stored in the parameter's
dtype, as torch's AdamW keeps them.  Matrix products accumulate in float32; their operands' precision is
:func:`sdsopt.fused.launch`'s choice per dtype (float32 factors: ``tf32x3``, float32 accuracy; 16-bit factors: their
Grams from the 16-bit values exactly; the products with the maps at ``tf32x3`` for every dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["FIELDS", "adam_kernel", "frames_kernel", "gram_kernel", "gram_sum_kernel", "pass_kernel"]

FIELDS = 8
"""Entry-table columns: parameter, gradient, exp_avg, exp_avg_sq, max_exp_avg_sq, step (data pointers; the Gram
table keeps its first work item and their count in the gradient's and exp_avg's columns), ``p``, the pair's index
``q`` in its family (maps, scales and ramps are read at ``q``)."""


@triton.jit
def _block(start, stop, p, row0, r: tl.constexpr, TRANS: tl.constexpr, RT: tl.constexpr, BP: tl.constexpr):
    """Offsets and mask of rows ``row0 … row0+RT`` and columns ``start … min(start+BP, stop)`` of a row-form
    ``r × p`` factor: ``[RT, BP]`` for ``A``, ``[BP, RT]`` (rows of ``B``) for ``TRANS``.  Where ``RT`` divides
    ``r`` (a compile-time fact; callers then visit no rows past ``r``) the mask is constant along the rank axis,
    so that ``B``'s rows load as vectors."""
    i = row0 + tl.arange(0, RT)
    c = start + tl.arange(0, BP)
    if TRANS:
        offs = c[:, None] * r + i[None, :]
        if r % RT == 0:
            mask = tl.broadcast_to(c[:, None] < stop, (BP, RT))
        else:
            mask = (c[:, None] < stop) & (i[None, :] < r)
    else:
        offs = i[:, None] * p + c[None, :]
        if r % RT == 0:
            mask = tl.broadcast_to(c[None, :] < stop, (RT, BP))
        else:
            mask = (i[:, None] < r) & (c[None, :] < stop)
    return offs, mask


@triton.jit
def _entry(table, items, w, DT: tl.constexpr, VEC: tl.constexpr):
    """Work item ``w``'s entry row, its columns ``c0 … c1``, the factor's length ``p`` and its parameter's data
    pointer; ``VEC > 1`` promises the host's check that pointers are 16-byte aligned and ``p``, ``c0``, ``c1``
    multiples of ``VEC`` elements (so that tiles load and store as 16-byte vectors)."""
    j = tl.load(items + w * 3)
    c0 = tl.load(items + w * 3 + 1)
    c1 = tl.load(items + w * 3 + 2)
    row = table + j * 8
    p = tl.load(row + 6)
    if VEC > 1:
        c0 = tl.multiple_of(c0, VEC)
        c1 = tl.multiple_of(c1, VEC)
        p = tl.multiple_of(p, VEC)
    return row, c0, c1, p, _pointer(row, 0, DT, VEC)


@triton.jit
def _pointer(row, field, DT: tl.constexpr, VEC: tl.constexpr):
    """The data pointer in column ``field`` of an entry row (16-byte aligned where ``VEC > 1``)."""
    ptr = tl.load(row + field).to(tl.pointer_type(DT))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b``, float32 accumulation, at ``PREC``: a ``tl.dot`` input precision, or ``"native"``: both operands
    rounded to the factor's 16-bit dtype ``DT`` (bf16 tensor-core products)."""
    if PREC == "native":
        return tl.dot(a.to(DT), b.to(DT))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rows(x_ptr, start, stop, p, row0, r: tl.constexpr, TRANS: tl.constexpr, RT: tl.constexpr, BP: tl.constexpr):
    """Rows ``row0 … row0+RT`` of the row-form factor at columns ``start …`` as a float32 ``[RT, BP]`` tile."""
    offs, mask = _block(start, stop, p, row0, r, TRANS, RT, BP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TRANS:
        x = tl.trans(x)
    return x


@triton.jit
def _gram_diagonal(x_ptr, c0, c1, p, row0, r: tl.constexpr, TRANS: tl.constexpr, TM: tl.constexpr,
                   BP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``X_i X_iᵀ`` of rows ``row0 … row0+TM`` over columns ``c0 … c1``.  At ``tf32x3`` the symmetric product takes
    two tensor-core passes, not three: with ``X = H + L`` (``H`` the TF32 part, ``L = X − H`` exactly),
    ``X Xᵀ ≈ H Hᵀ + C + Cᵀ``, ``C = H Lᵀ`` (tf32x3's own three terms, its ``L Hᵀ`` being ``Cᵀ``), so ``C`` is summed
    over the blocks and transposed once."""
    acc = tl.zeros((TM, TM), dtype=tl.float32)
    if PREC == "tf32x3":
        cross = tl.zeros((TM, TM), dtype=tl.float32)
    for start in range(c0, c1, BP):
        x = _rows(x_ptr, start, c1, p, row0, r, TRANS, TM, BP)
        if PREC == "tf32x3":
            hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # the 10 leading mantissa bits
            acc += tl.dot(hi, tl.trans(hi), input_precision="tf32")
            cross += tl.dot(hi, tl.trans(x - hi), input_precision="tf32")
        else:
            acc += _mm(x, tl.trans(x), DT, PREC)
    if PREC == "tf32x3":
        acc += cross + tl.trans(cross)
    return acc


@triton.jit
def gram_kernel(table, items, ws, r: tl.constexpr, NT: tl.constexpr, TRANS: tl.constexpr, TM: tl.constexpr,
                BP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr):
    """``ws[w, ti, tj] = X_i X_jᵀ`` (``TM × TM`` float32; ``X_i``: rows ``ti·TM …`` of the factor) over work item
    ``w``'s columns, program ``(w, ti, tj)``: the Gram in ``NT × NT`` tiles (one where ``r ≤ TM``), of which the
    programs on and above the diagonal compute theirs (:func:`_gram_diagonal`; off the diagonal tf32x3's three
    passes) and the others return."""
    w = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    _, c0, c1, p, x_ptr = _entry(table, items, w, DT, VEC)
    if NT == 1:
        acc = _gram_diagonal(x_ptr, c0, c1, p, 0, r, TRANS, TM, BP, DT, PREC)
    else:
        if ti > tj:
            return
        if ti == tj:
            acc = _gram_diagonal(x_ptr, c0, c1, p, ti * TM, r, TRANS, TM, BP, DT, PREC)
        else:
            acc = tl.zeros((TM, TM), dtype=tl.float32)
            for start in range(c0, c1, BP):
                xi = _rows(x_ptr, start, c1, p, ti * TM, r, TRANS, TM, BP)
                xj = _rows(x_ptr, start, c1, p, tj * TM, r, TRANS, TM, BP)
                acc += _mm(xi, tl.trans(xj), DT, PREC)
    a = tl.arange(0, TM)
    tl.store(ws + ((w.to(tl.int64) * NT + ti) * NT + tj) * TM * TM + a[:, None] * TM + a[None, :], acc)


@triton.jit
def gram_sum_kernel(table, ws, out, r: tl.constexpr, NT: tl.constexpr, TM: tl.constexpr):
    """Tile ``(ti, tj)`` of ``out[j]`` (and, off the diagonal, its mirror ``(tj, ti)``) ``= Σ ws[w, ti, tj]`` over
    entry ``j``'s work items, in order (program ``(j, ti, tj)``, ``ti ≤ tj``; deterministic: no atomics)."""
    j = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:
        return
    first = tl.load(table + j * 8 + 1)
    count = tl.load(table + j * 8 + 2)
    a = tl.arange(0, TM)
    tile = (ti * NT + tj) * TM * TM + a[:, None] * TM + a[None, :]
    acc = tl.zeros((TM, TM), dtype=tl.float32)
    for t in range(count):
        acc += tl.load(ws + (first + t) * NT * NT * TM * TM + tile)
    rows = ti * TM + a
    cols = tj * TM + a
    inside = (rows[:, None] < r) & (cols[None, :] < r)
    base = out + j.to(tl.int64) * r * r
    tl.store(base + rows[:, None] * r + cols[None, :], acc, mask=inside)
    if ti != tj:
        tl.store(base + cols[None, :] * r + rows[:, None], acc, mask=inside)


@triton.jit
def _setup(table, items, w, gmaps, scales, ramps, lr_ptr, r: tl.constexpr, lr, beta1, beta2, HAS_SCALE: tl.constexpr,
           HAS_RAMP: tl.constexpr, LR_TENSOR: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr):
    """What an Adam program needs before its columns: the work item's columns, ``p``, the data pointers (parameter,
    gradient, moments, amsgrad's maximum), its maps' base offset ``q·r²``, the bias corrections ``1 − β₁ᵗ`` and
    ``√(1 − β₂ᵗ)``, the gain ``−η·ρ`` and the re-balancing scale ``c`` (1 without one)."""
    row, c0, c1, p, x_base = _entry(table, items, w, DT, VEC)
    g_base = _pointer(row, 1, DT, VEC)
    m_base = _pointer(row, 2, DT, VEC)
    v_base = _pointer(row, 3, DT, VEC)
    w_base = _pointer(row, 4, DT, VEC)
    step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
    q = tl.load(row + 7)
    bias1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    root2 = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
    if LR_TENSOR:
        lr = tl.load(lr_ptr)
    gain = -lr
    if HAS_RAMP:
        gain = gain * tl.load(ramps + q)
    scale = gain * 0.0 + 1.0
    if HAS_SCALE:
        scale = tl.load(scales + q)
        if LR_TENSOR:  # lr = 0 moves nothing, not even the balance (a float lr decides this on the host)
            scale = tl.where(lr > 0, scale, 1.0)
    return c0, c1, p, x_base, g_base, m_base, v_base, w_base, q * r * r, bias1, root2, gain, scale


@triton.jit
def _direction(g, m, v, m_ptr, v_ptr, w_ptr, offs, mask, beta1, beta2, bias1, root2, eps, AMSGRAD: tl.constexpr,
               DT: tl.constexpr):
    """Adam on the coordinate gradient ``g`` (float32) with the loaded moments ``m``, ``v``: the new moments (and
    amsgrad's maximum) stored in place, the direction ``û = m̂ / (√v̂ + ε)`` returned."""
    m = beta1 * m.to(tl.float32) + (1.0 - beta1) * g
    v = beta2 * v.to(tl.float32) + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m.to(DT), mask=mask)
    tl.store(v_ptr + offs, v.to(DT), mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(w_ptr + offs, v.to(DT), mask=mask)
    return (m / bias1) / (tl.sqrt(v) / root2 + eps)


@triton.jit
def _update(x, d, gain, weight_decay, scale, HAS_SCALE: tl.constexpr):
    """``c·(X + ρ·(−η)(d + λX))``: the step ``d`` (``M û`` or ``û``) with decoupled decay, float32."""
    x = x.to(tl.float32)
    x = x + gain * (d + weight_decay * x)
    if HAS_SCALE:
        x = x * scale
    return x


@triton.jit
def adam_kernel(table, items, gmaps, mmaps, scales, ramps, lr_ptr, found_inf, r: tl.constexpr, lr, beta1, beta2,
                eps, weight_decay, TRANS: tl.constexpr, COORD: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_RAMP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LR_TENSOR: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, RP: tl.constexpr, BP: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, VEC: tl.constexpr):
    """Work item ``w`` (program ``w``): the update of the module docstring on its columns, ``BP`` at a time, the
    r×r maps held in registers (``r ≤ 64``)."""
    w = tl.program_id(0)
    if HAS_FOUND_INF:
        if tl.load(found_inf) > 0:  # torch's fused AdamW: a step with non-finite gradients changes nothing
            return
    c0, c1, p, x_base, g_base, m_base, v_base, w_base, base, bias1, root2, gain, scale = _setup(
        table, items, w, gmaps, scales, ramps, lr_ptr, r, lr, beta1, beta2, HAS_SCALE, HAS_RAMP, LR_TENSOR, DT, VEC)
    i = tl.arange(0, RP)
    r_mask = (i[:, None] < r) & (i[None, :] < r)
    G = tl.load(gmaps + base + i[:, None] * r + i[None, :], mask=r_mask, other=0.0)
    if COORD:
        M = tl.load(mmaps + base + i[:, None] * r + i[None, :], mask=r_mask, other=0.0)
    for start in range(c0, c1, BP):
        offs, mask = _block(start, c1, p, 0, r, TRANS, RP, BP)
        g = tl.load(g_base + offs, mask=mask, other=0.0)
        m = tl.load(m_base + offs, mask=mask, other=0.0)
        v = tl.load(v_base + offs, mask=mask, other=0.0)
        x = tl.load(x_base + offs, mask=mask, other=0.0)
        g = g.to(tl.float32)
        if MAXIMIZE:
            g = -g
        if TRANS:  # row form X = Bᵀ: g̃ᵀ = gᵀ Gᵀ
            g = _mm(g, tl.trans(G), DT, PREC)
        else:
            g = _mm(G, g, DT, PREC)
        u = _direction(g, m, v, m_base, v_base, w_base, offs, mask, beta1, beta2, bias1, root2, eps, AMSGRAD, DT)
        if COORD:  # the map back M û (B's rows: û Mᵀ)
            if TRANS:
                u = _mm(u, tl.trans(M), DT, PREC)
            else:
                u = _mm(M, u, DT, PREC)
        tl.store(x_base + offs, _update(x, u, gain, weight_decay, scale, HAS_SCALE).to(DT), mask=mask)


@triton.jit
def pass_kernel(table, items, maps, scales, ramps, lr_ptr, found_inf, r: tl.constexpr, lr, beta1, beta2, eps,
                weight_decay, BACK: tl.constexpr, TRANS: tl.constexpr, COORD: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_RAMP: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LR_TENSOR: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, TM: tl.constexpr, BP: tl.constexpr, KC: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr, VEC: tl.constexpr):
    """One pass of the two-pass Adam step (ranks above 64), program ``(t, w)``: rows ``t·TM …`` of work item ``w``,
    ``BP`` columns at a time, as a matrix-product tile over ``KC``-wide slices of the map (its ``[TM, BP]``
    accumulator is all it holds).

    * ``BACK=False`` (first pass, ``maps = G``): ``g̃ = G[rows, :] g``, then Adam's moments of those rows in place;
      without ``COORD`` (no map back) the rows of the factor step here too.
    * ``BACK=True`` (second pass, ``maps = M``): ``ΔX = M[rows, :] û``, the direction ``û = m̂ / (√v̂ + ε)``
      recomputed from the moments the first pass stored (amsgrad: their maximum), then the update of the module
      docstring on those rows."""
    t = tl.program_id(0)
    w = tl.program_id(1)
    if HAS_FOUND_INF:
        if tl.load(found_inf) > 0:  # torch's fused AdamW: a step with non-finite gradients changes nothing
            return
    c0, c1, p, x_base, g_base, m_base, v_base, w_base, base, bias1, root2, gain, scale = _setup(
        table, items, w, maps, scales, ramps, lr_ptr, r, lr, beta1, beta2, HAS_SCALE, HAS_RAMP, LR_TENSOR, DT, VEC)
    for start in range(c0, c1, BP):
        if TRANS:
            acc = tl.zeros((BP, TM), dtype=tl.float32)
        else:
            acc = tl.zeros((TM, BP), dtype=tl.float32)
        for k0 in range(0, r, KC):
            koffs, kmask = _block(start, c1, p, k0, r, TRANS, KC, BP)
            if BACK:
                m = tl.load(m_base + koffs, mask=kmask, other=0.0).to(tl.float32)
                v = tl.load((w_base if AMSGRAD else v_base) + koffs, mask=kmask, other=0.0).to(tl.float32)
                b = (m / bias1) / (tl.sqrt(v) / root2 + eps)
            else:
                b = tl.load(g_base + koffs, mask=kmask, other=0.0).to(tl.float32)
                if MAXIMIZE:
                    b = -b
            i = t * TM + tl.arange(0, TM)
            k = k0 + tl.arange(0, KC)
            slice = tl.load(maps + base + i[:, None] * r + k[None, :], mask=(i[:, None] < r) & (k[None, :] < r),
                            other=0.0)  # [TM, KC]
            if TRANS:  # row form X = Bᵀ: (S b)ᵀ = bᵀ Sᵀ
                acc += _mm(b, tl.trans(slice), DT, PREC)
            else:
                acc += _mm(slice, b, DT, PREC)
        offs, mask = _block(start, c1, p, t * TM, r, TRANS, TM, BP)
        if BACK:
            x = tl.load(x_base + offs, mask=mask, other=0.0)
            tl.store(x_base + offs, _update(x, acc, gain, weight_decay, scale, HAS_SCALE).to(DT), mask=mask)
        else:
            m = tl.load(m_base + offs, mask=mask, other=0.0)
            v = tl.load(v_base + offs, mask=mask, other=0.0)
            u = _direction(acc, m, v, m_base, v_base, w_base, offs, mask, beta1, beta2, bias1, root2, eps, AMSGRAD,
                           DT)
            if not COORD:
                x = tl.load(x_base + offs, mask=mask, other=0.0)
                tl.store(x_base + offs, _update(x, u, gain, weight_decay, scale, HAS_SCALE).to(DT), mask=mask)


@triton.jit
def _gram(K_ptr, r: tl.constexpr, RP: tl.constexpr):
    """A Gram, ``[RP, RP]`` with zero padding (all zero if an entry is not finite), and its trace."""
    rows = tl.arange(0, RP)[:, None]
    cols = tl.arange(0, RP)[None, :]
    K = tl.load(K_ptr + rows * r + cols, mask=(rows < r) & (cols < r), other=0.0)
    total = tl.sum(tl.sum(K, axis=1), axis=0)
    finite = (total == total) & (tl.abs(total) < float("inf"))
    K = tl.where(finite, K, 0.0)
    return K, tl.sum(tl.sum(tl.where(rows == cols, K, 0.0), axis=1), axis=0)


@triton.jit
def _frame(K_ptr, G_ptr, M_ptr, r: tl.constexpr, tol, shift, RP: tl.constexpr, INVERSE: tl.constexpr):
    """One Gram's frame, as :func:`sdsopt.linalg.cholesky_lower` and :func:`sdsopt.coordinates.factor_map` give it
    (tests/test_fused.py checks them against each other): ``L Lᵀ = K + μI``, ``μ = τ·trace K + μ_s``, by an
    unblocked Cholesky in float32; ``G = L^{-1}`` by forward substitution; the map back ``M = F Gᵀ`` with
    ``F = (K + μ_s I) Gᵀ G``; the fallbacks ``K = 0`` or non-finite → ``G = M = I``, a failed factorisation →
    ``L = √((trace K + μ_s)/r)·I``, ``F = I``.  ``INVERSE`` (mode ``scaled``, :func:`sdsopt.spectral.preconditioner`):
    store ``(K + μI)^{-1} = Gᵀ G`` at ``G_ptr`` instead, ``K = 0`` factored as ``√μ_s·I`` (no identity fallback).
    Returns the (finite) trace."""
    rows = tl.arange(0, RP)[:, None]
    cols = tl.arange(0, RP)[None, :]
    inside = (rows < r) & (cols < r)
    eye = tl.where(rows == cols, 1.0, 0.0)
    K, t = _gram(K_ptr, r, RP)
    tiny = 1.1754943508222875e-38
    if INVERSE:
        empty = t != t  # (False: K + δI is positive definite for K = 0)
    else:
        empty = t <= tiny
    A = K + (tol * t + shift) * tl.where(inside, eye, 0.0) + tl.where(inside, 0.0, eye)  # padding: identity
    L = tl.zeros((RP, RP), dtype=tl.float32)
    failed = t != t  # False
    for j in range(RP):
        col = tl.sum(tl.where(cols == j, A, 0.0), axis=1)  # A[:, j]
        d = tl.sum(tl.where(tl.arange(0, RP) == j, col, 0.0), axis=0)
        failed = failed | (d <= 0.0) | (d != d)
        root = tl.sqrt(tl.maximum(d, tiny))
        lj = tl.where(tl.arange(0, RP) > j, col / root, 0.0) + tl.where(tl.arange(0, RP) == j, root, 0.0)
        L = L + tl.where(cols == j, lj[:, None], 0.0)
        A = A - lj[:, None] * lj[None, :]
    X = tl.zeros((RP, RP), dtype=tl.float32)  # L^{-1}, row by row
    for i in range(RP):
        row = tl.sum(tl.where(rows == i, L, 0.0), axis=0)  # L[i, :]
        d = tl.sum(tl.where(tl.arange(0, RP) == i, row, 0.0), axis=0)
        below = tl.where(tl.arange(0, RP) < i, row, 0.0)
        acc = tl.sum(below[:, None] * X, axis=0)
        x = (tl.where(tl.arange(0, RP) == i, 1.0, 0.0) - acc) / d
        X = tl.where(rows == i, x[None, :], X)
    failed = failed | (tl.sum(tl.sum(tl.where(X == X, 0.0, 1.0), axis=1), axis=0) > 0)
    scale = tl.sqrt(tl.maximum((t + shift) / r, tiny))
    X = tl.where(empty, eye, tl.where(failed, eye / scale, X))
    XtX = tl.dot(tl.trans(X), X, input_precision="ieee")  # (K + μI)^{-1}
    if INVERSE:
        tl.store(G_ptr + rows * r + cols, XtX, mask=inside)
    else:
        # F = (K + μ_s I)(K + μI)^{-1} = (K + μ_s I) Gᵀ G: no cancellation in the partner's null directions, where
        # the equal I − τ·trace K·Gᵀ G would subtract two numbers near 1
        F = tl.where(empty | failed, eye, tl.dot(K + shift * eye, XtX, input_precision="ieee"))
        tl.store(G_ptr + rows * r + cols, X, mask=inside)
        tl.store(M_ptr + rows * r + cols, tl.dot(F, tl.trans(X), input_precision="ieee"), mask=inside)
    return t


@triton.jit
def frames_kernel(K, G, M, scales, shifts, both, k, r: tl.constexpr, tol, shift0, HAS_SHIFT: tl.constexpr,
                  HAS_SCALE: tl.constexpr, INVERSE: tl.constexpr, RP: tl.constexpr):
    """Gram ``j`` of ``K = [K_A; K_B]`` (program ``j`` of ``2k``; pair ``q = j mod k``): its frame with the
    absolute shift ``shift0`` (+ ``shifts[q]``), and with ``HAS_SCALE`` the re-balancing scale
    (:func:`sdsopt.coordinates.balance_scales`) where ``both[q]``, from both traces of the pair:
    ``scales[q] = 1/c`` (for ``B``, which steps with ``K_A``'s maps), ``scales[k + q] = c``."""
    j = tl.program_id(0)
    q = j % k
    shift = shift0
    if HAS_SHIFT:
        shift = shift + tl.load(shifts + q)
    rr = r * r
    at = j.to(tl.int64) * rr
    t = _frame(K + at, G + at, M + at, r, tol, shift, RP, INVERSE)
    if HAS_SCALE:
        tiny = 1.1754943508222875e-38
        _, t_other = _gram(K + ((j + k) % (2 * k)).to(tl.int64) * rr, r, RP)
        is_a = j < k
        t_a = tl.where(is_a, t, t_other)
        t_b = tl.where(is_a, t_other, t)
        ok = (t_a > tiny) & (t_b > tiny) & (tl.load(both + q) != 0)
        c = tl.where(ok, tl.sqrt(tl.sqrt(t_b / tl.where(ok, t_a, 1.0))), 1.0)
        tl.store(scales + j, tl.where(is_a, 1.0 / c, c))
