"""sdsopt.products: the exact TF32 split, the three-pass products' accuracy (TF32 passes emulated on the CPU by
rounding their operands to TF32, and for real on CUDA), and which products a factor batch takes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdsopt.linalg import float32_matmul
from sdsopt.products import IEEE, TF32X3, TF32X3_MIN_RANK, for_factors, gram_x3, matmul_x3, tf32_split

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 tensor cores need CUDA")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a TF32 pass reads it (10 explicit mantissa bits; truncation, the worse of the two roundings)."""
    return tf32_split(x)[0]


@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
def test_the_split_is_exact_and_its_high_part_is_tf32(seed, scale):
    x = torch.randn(257, generator=torch.Generator().manual_seed(seed)) * scale
    h, lo = tf32_split(x)
    assert torch.equal(h + lo, x)
    assert torch.all(h.view(torch.int32) & 0x1FFF == 0)  # 13 low mantissa bits clear: a TF32 number
    assert torch.all(lo.abs() <= x.abs() * 2.0**-10)


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 300))
def test_three_tf32_passes_are_float32_accurate_where_one_is_not(seed, r, p):
    """The module's error bound, on TF32-rounded operands (what each tensor-core pass reads), accumulated in
    float64 so that only the operands' rounding is measured: three passes ≤ 3·2⁻²⁰ of ``|a||b|``, one pass ~2⁻¹¹."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, p, generator=gen), torch.randn(p, r, generator=gen)
    ah, al = tf32_split(a)
    bh, bl = tf32_split(b)
    ref = a.double() @ b.double()
    passes = [(ah, bh), (ah, _tf32(bl)), (_tf32(al), bh)]
    three = sum(x.double() @ y.double() for x, y in passes)
    bound = 3 * 2.0**-20 * (a.double().abs() @ b.double().abs())
    assert torch.all((three - ref).abs() <= bound)
    if r * p >= 64:  # (enough products that one pass's rounding shows)
        assert _rel(_tf32(a).double() @ _tf32(b).double(), ref) > 2.0**-14


@pytest.mark.parametrize("k,r,p", [(1, 3, 5), (4, 16, 40), (2, 130, 64)])
def test_the_products_match_float64_on_this_device(k, r, p):
    """On the CPU the passes are IEEE (no TF32 there); on CUDA inside the TF32 passes: float32-level either way."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(k * r * p)
    X, G = torch.randn(k, r, p, generator=gen), torch.randn(k, r, p, generator=gen)
    L = torch.randn(k, r, r, generator=gen)
    X, G, L = X.to(device), G.to(device), L.to(device)
    assert _rel(gram_x3(X), X.double() @ X.double().mT) < 1e-6
    assert _rel(matmul_x3(L, G), L.double() @ G.double()) < 1e-6
    out = TF32X3.add_(X.clone(), L, G, beta=0.5, alpha=-2.0)
    assert _rel(out, 0.5 * X.double() - 2.0 * (L.double() @ G.double())) < 1e-6
    assert torch.equal(IEEE.gram(X), X @ X.mT)


@cuda
def test_tf32x3_on_cuda_is_float32_accurate_and_tf32_alone_is_not():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 256, 2048, generator=gen).cuda(), torch.randn(8, 2048, 256, generator=gen).cuda()
    ref = a.double() @ b.double()
    with float32_matmul("high"):
        assert _rel(a @ b, ref) > 1e-4  # TF32 engaged: the check below is not IEEE in disguise
    before = torch.get_float32_matmul_precision()
    assert _rel(matmul_x3(a, b), ref) < 2e-6
    assert torch.get_float32_matmul_precision() == before  # the passes' TF32 flag restored


def test_which_products_a_batch_takes():
    X = torch.zeros(2, 4, 4)
    assert for_factors(X, TF32X3_MIN_RANK) is IEEE  # the CPU: IEEE at any rank
    assert for_factors(X.double(), TF32X3_MIN_RANK) is IEEE
    if torch.cuda.is_available():
        assert for_factors(X.cuda(), TF32X3_MIN_RANK) is TF32X3
        assert for_factors(X.cuda(), TF32X3_MIN_RANK - 1) is IEEE
        assert for_factors(X.cuda().double(), TF32X3_MIN_RANK) is IEEE
