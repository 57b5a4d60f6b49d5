"""docs/math.md §4 properties P1–P6 and P8 of the rewrite, against float64 SVD references (tests/svd_reference.py)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from svd_reference import (
    lora_grads,
    make_factor,
    orthonormal,
    polar,
    range_svd,
    scaled_reference,
    sds_reference,
    sigma_split_reference,
)
from sdsopt import rewrite_pair
from sdsopt.modes import MODE_CLASSES
from sdsopt.linalg import (
    default_rank_tol,
    finite_or_zero,
    gram,
    inv_sqrt,
    inv_sqrt_newton_schulz,
    spectral_matrix,
    spectrum,
)
from sdsopt.spectral import sigma_correction, sigma_split

F64 = torch.float64


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm().item()
    return (x - ref).norm().item() / scale if scale > 0 else x.norm().item()


@st.composite
def lora_case(draw, max_kappa: float = 1e6, min_kappa: float = 1.0):
    """A pair (A, B), a full gradient G and a scale s: shapes, ranks, scales and conditioning drawn."""
    m = draw(st.integers(1, 12))
    n = draw(st.integers(1, 12))
    r = draw(st.one_of(st.just(1), st.integers(1, min(m, n)), st.integers(min(m, n), 14)))
    log_kappa = draw(st.floats(math.log10(min_kappa), math.log10(max_kappa)))
    scale_a = 10 ** draw(st.floats(-4, 4))
    scale_b = 10 ** draw(st.floats(-4, 4))
    s = 10 ** draw(st.floats(-4, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    A = make_factor(r, n, 10**log_kappa, scale_a, gen)
    B = make_factor(m, r, 10 ** (log_kappa / 2), scale_b, gen)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    return A, B, G, s, 10**log_kappa


def tolerance(kappa: float) -> float:
    """Float64 Gram route: eigenvalue errors ~ ε·λ_max, i.e. relative ε·κ² on the weakest direction."""
    return 1e-9 + 200 * torch.finfo(F64).eps * kappa**2


@given(lora_case())
def test_sds_matches_svd_reference(case):
    """(2.2): the Gram/eigh route equals s·Ω_Bᵀ·G and s·G·Ω_Aᵀ computed from G and SVDs."""
    A, B, G, s, kappa = case
    gA, gB = lora_grads(A, B, G, s)
    new_a, new_b = rewrite_pair(A, B, gA, gB, mode="sds_polar")
    ref_a, ref_b = sds_reference(A, B, G, s)
    assert rel_err(new_a, ref_a) <= tolerance(kappa)
    assert rel_err(new_b, ref_b) <= tolerance(kappa)


@given(lora_case(), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_p1_scale_invariance(case, log_c, seed):
    """P1: (cA, B/c) gives the same rewritten gradients as (A, B)."""
    A, B, G, s, kappa = case
    c = 10**log_c
    base = rewrite_pair(A, B, *lora_grads(A, B, G, s), mode="sds_polar")
    scaled = rewrite_pair(c * A, B / c, *lora_grads(c * A, B / c, G, s), mode="sds_polar")
    for x, y in zip(scaled, base):
        assert rel_err(x, y) <= tolerance(kappa)


@given(lora_case(), st.integers(0, 2**31 - 1))
def test_p2_rotation_equivariance(case, seed):
    """P2: (OA, BOᵀ) gives (O g̃A, g̃B Oᵀ) for orthogonal O."""
    A, B, G, s, kappa = case
    O = orthonormal(A.shape[0], A.shape[0], torch.Generator().manual_seed(seed))
    new_a, new_b = rewrite_pair(A, B, *lora_grads(A, B, G, s), mode="sds_polar")
    rot_a, rot_b = rewrite_pair(O @ A, B @ O.T, *lora_grads(O @ A, B @ O.T, G, s), mode="sds_polar")
    assert rel_err(rot_a, O @ new_a) <= tolerance(kappa)
    assert rel_err(rot_b, new_b @ O.T) <= tolerance(kappa)


@given(lora_case())
def test_p3_isotropy(case):
    """P3: singular values of g̃B equal those of s·G·V_A (no Σ_A), likewise g̃A and s·U_Bᵀ·G."""
    A, B, G, s, kappa = case
    new_a, new_b = rewrite_pair(A, B, *lora_grads(A, B, G, s), mode="sds_polar")
    _, _, Vh_a = range_svd(A)
    U_b, _, _ = range_svd(B)
    expect_b = torch.linalg.svdvals(s * G @ Vh_a.T)
    expect_a = torch.linalg.svdvals(s * U_b.T @ G)
    got_b, got_a = torch.linalg.svdvals(new_b), torch.linalg.svdvals(new_a)
    for got, expect in ((got_b, expect_b), (got_a, expect_a)):
        k = expect.numel()
        assert rel_err(got[:k], expect) <= tolerance(kappa)
        if got.numel() > k:  # beyond the range: nothing
            assert got[k:].abs().max().item() <= tolerance(kappa) * max(expect.max().item(), 1e-300)


@given(st.integers(1, 10), st.integers(1, 10), st.integers(1, 10), st.floats(-4, 4), st.integers(0, 2**31 - 1))
def test_p4_reduction_orthonormal(m, n, r, log_s, seed):
    """P4: with A Aᵀ = I and Bᵀ B = I, sds equals lora."""
    r = min(r, m, n)
    gen = torch.Generator().manual_seed(seed)
    A, B = orthonormal(n, r, gen).T, orthonormal(m, r, gen)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    gA, gB = lora_grads(A, B, G, 10**log_s)
    new_a, new_b = rewrite_pair(A, B, gA, gB, mode="sds_polar")
    assert rel_err(new_a, gA) <= 1e-12 and rel_err(new_b, gB) <= 1e-12


@given(lora_case(max_kappa=1e3), st.integers(0, 2**31 - 1), st.floats(-2, 2))
def test_p5_scaled_first_order_update_invariant(case, seed, log_cond_m):
    """P5: for `scaled`, g̃B A + B g̃A is invariant under (MA, BM⁻¹), M invertible (δ → 0 limit, full rank)."""
    A, B, G, s, kappa = case
    r = A.shape[0]
    if r > min(A.shape[1], B.shape[0]):
        return  # (K + δI)^{-1} ≈ K^{-1} needs both Grams invertible
    gen = torch.Generator().manual_seed(seed)
    M = orthonormal(r, r, gen) @ torch.diag(10 ** torch.linspace(0, log_cond_m, r, dtype=F64)) @ orthonormal(r, r, gen).T
    delta = 1e-30
    def update(A_, B_):
        ga, gb = rewrite_pair(A_, B_, *lora_grads(A_, B_, G, s), mode="scaled", damping=delta)
        return gb @ A_ + B_ @ ga
    base = update(A, B)
    moved = update(M @ A, B @ torch.linalg.inv(M))
    assert rel_err(moved, base) <= 1e-6 * kappa**2 * 10 ** (2 * abs(log_cond_m)) + 1e-9


@given(lora_case(max_kappa=1e3), st.floats(-8, -1))
def test_scaled_matches_linear_solve(case, log_delta):
    """`scaled`: (K + δI)^{-1} applied by eigh equals a direct linear solve."""
    A, B, G, s, kappa = case
    delta = 10**log_delta * (A.norm().item() ** 2 + B.norm().item() ** 2 + 1e-30)
    new_a, new_b = rewrite_pair(A, B, *lora_grads(A, B, G, s), mode="scaled", damping=delta)
    ref_a, ref_b = scaled_reference(A, B, G, s, delta)
    assert rel_err(new_a, ref_a) <= 1e-8 and rel_err(new_b, ref_b) <= 1e-8


@given(lora_case(max_kappa=1e3))
def test_p6_routes_agree(case):
    """P6: eigh and Newton–Schulz routes agree with the SVD reference.

    Newton–Schulz is a damped root: bias O(δ/λ̂_min) = O(δ·r·κ²) on weak directions, rounding O(ε/δ);
    δ = 1e-11 in float64.
    """
    A, B, G, s, kappa = case
    gA, gB = lora_grads(A, B, G, s)
    ref_a, ref_b = sds_reference(A, B, G, s)
    ns_a, ns_b = rewrite_pair(A, B, gA, gB, route="newton_schulz", mode="sds_polar")
    eig_a, eig_b = rewrite_pair(A, B, gA, gB, route="eigh", mode="sds_polar")
    r = A.shape[0]
    tol = 1e-5 + 1e-11 * r * kappa**2
    assert rel_err(ns_a, ref_a) <= tol and rel_err(ns_b, ref_b) <= tol
    assert rel_err(ns_a, eig_a) <= tol and rel_err(ns_b, eig_b) <= tol


@given(st.integers(1, 8), st.integers(1, 4), st.integers(0, 12), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]))
def test_p6_routes_agree_near_singular(k, extra_r, extra_p, seed, dtype):
    """Exactly rank-deficient Grams (rank k < r, range condition number 10): the routes agree.

    A factor's gradient is ``(other factor)ᵀ · (…)``, so in row form it lies in the column space of
    the other factor ``X``: the test draws ``G = X H``.  Off the range the eigh route passes nothing
    and the Newton–Schulz route (damped root) only rounding noise amplified by at most ``δ^{-1/2}``.
    """
    gen = torch.Generator().manual_seed(seed)
    r, p = k + extra_r, k + extra_p
    sigma = 10 ** -torch.linspace(0, 1, k, dtype=F64)
    X = (orthonormal(r, k, gen) @ torch.diag(sigma) @ orthonormal(p, k, gen).T).to(dtype)
    G = (X.double() @ torch.randn(p, 5, dtype=F64, generator=gen)).to(dtype)
    spec = spectrum(gram(X[None]), rank_tol=default_rank_tol(dtype))
    P_eigh = spectral_matrix(spec, inv_sqrt(spec))[0]
    P_ns, residual = inv_sqrt_newton_schulz(gram(X[None]), rank_tol=default_rank_tol(dtype, "newton_schulz"))
    ref = polar(X.double().T).T  # Ω such that P·X = Ω (on the range)
    assert (residual < 1e-3).all()
    assert int(spec.in_range.sum()) == k
    tol = 5e-3 if dtype == torch.float32 else 1e-7
    for P in (P_eigh, P_ns[0]):
        assert torch.isfinite(P).all()
        assert rel_err((P @ X).double(), ref) <= tol
        assert rel_err((P @ G).double(), (P_eigh @ G).double()) <= tol


# every route each rewriting mode takes (the optimizer refuses the others, and so does rewrite_pair)
MODE_ROUTES = [(mode, route) for mode in ("sds_polar", "scaled") for route in MODE_CLASSES[mode].routes]


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1),
       st.sampled_from(MODE_ROUTES), st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_p8_zero_b_start(m, n, r, seed, mode_route, dtype):
    """P8: B = 0 (PEFT's init): everything finite, g̃A = 0, g̃B = s·G·Ω_Aᵀ (isotropic)."""
    mode, route = mode_route
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, dtype=F64, generator=gen)
    B = torch.zeros(m, r, dtype=F64)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    gA, gB = lora_grads(A, B, G, 2.0)
    new_a, new_b = rewrite_pair(A.to(dtype), B.to(dtype), gA.to(dtype), gB.to(dtype), mode=mode, route=route)
    assert new_a.dtype == dtype and new_b.dtype == dtype
    assert torch.isfinite(new_a).all() and torch.isfinite(new_b).all()
    assert (new_a == 0).all()
    if mode == "sds_polar" and dtype in (torch.float32, torch.float64):
        # Newton–Schulz in float64 with r > n (rank-deficient K_A): measured 3e-7 (damped root, δ = 1e-11)
        tol = 1e-3 if dtype == torch.float32 else (1e-7 if route == "eigh" else 1e-6)
        assert rel_err(new_b.double(), 2.0 * G @ polar(A).T) <= tol


def test_degenerate_factors_stay_finite():
    """A = 0, B = 0, rank 1, r > min(m, n), tiny and huge float32 entries: finite, never raises."""
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.zeros(3, 5), torch.zeros(4, 3)),
        (torch.ones(1, 5), torch.ones(4, 1)),
        (torch.randn(8, 2, generator=gen), torch.randn(3, 8, generator=gen)),
        (torch.randn(3, 5, generator=gen) * 1e-30, torch.randn(4, 3, generator=gen) * 1e-30),
        (torch.randn(3, 5, generator=gen) * 1e30, torch.randn(4, 3, generator=gen) * 1e30),
        (torch.full((3, 5), 1e-45), torch.full((4, 3), 1e-45)),  # subnormal
    ]
    for A, B in cases:
        gA, gB = torch.randn(A.shape, generator=gen), torch.randn(B.shape, generator=gen)
        for mode, route in MODE_ROUTES:
            new_a, new_b = rewrite_pair(A, B, gA, gB, mode=mode, route=route)
            assert torch.isfinite(new_a).all() and torch.isfinite(new_b).all(), (A.abs().max(), mode, route)


def test_non_finite_factor_is_rank_zero_not_error():
    """A NaN/Inf factor does not make eigh raise: its partner's gradient is zeroed."""
    A = torch.randn(3, 5)
    B = torch.randn(4, 3)
    B[0, 0] = float("nan")
    new_a, new_b = rewrite_pair(A, B, torch.randn(3, 5), torch.randn(4, 3), mode="sds_polar")
    assert (new_a == 0).all() and torch.isfinite(new_b).all()


@given(lora_case(max_kappa=1e4, min_kappa=10.0), st.booleans())
def test_sigma_split_matches_svd(case, use_b):
    """(2.3): gσ = diag(Uᵀ G V); the basis part has no singular-value component; (2.4) = U diag(Δσ) Vᵀ.

    Distinct singular values (κ ≥ 10): with repeated ones the split depends on the eigenbasis chosen.
    """
    A, B, G, s, kappa = case
    gA, gB = lora_grads(A, B, G, s)
    X, g = (B.T, gB.T) if use_b else (A, gA)  # row form
    spec = spectrum(gram(X[None]), rank_tol=1e-14)
    g_sigma, basis = sigma_split(spec, X[None], g[None])
    ref_sigma, ref_basis, U, Vh = sigma_split_reference(X, g)
    # the package orders σ ascending; the reference descending, and signs of U/V pair up within each
    got = g_sigma[0][spec.in_range[0]].flip(0)
    tol = 1e-9 + 1e-13 * kappa**2
    assert rel_err(got, ref_sigma) <= tol + 1e-12 * g.norm().item() / max(ref_sigma.norm().item(), 1e-300)
    assert rel_err(basis[0], ref_basis) <= tol + 1e-12
    step = torch.randn(g_sigma.shape, dtype=F64)
    corr = sigma_correction(spec, X[None], step)[0]
    ref_corr = U @ torch.diag(step[0][spec.in_range[0]].flip(0)) @ Vh
    assert rel_err(corr, ref_corr) <= tol



@given(st.integers(1, 24), st.integers(0, 6), st.floats(-30, 30), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]))
def test_newton_schulz_converges_without_a_runtime_check(r, deficiency, log_scale, seed, dtype):
    """The fixed iteration count converges for any finite PSD Gram (rank-deficient, zero, any scale)."""
    gen = torch.Generator().manual_seed(seed)
    k = max(r - deficiency, 0)
    X = torch.randn(r, k, dtype=F64, generator=gen) @ torch.randn(k, 7, dtype=F64, generator=gen) * 10**log_scale
    K = finite_or_zero(gram(X.to(dtype)[None]))
    P, residual = inv_sqrt_newton_schulz(K, default_rank_tol(dtype, "newton_schulz"))
    assert torch.isfinite(P).all()
    assert residual.item() <= (1e-4 if dtype == torch.float32 else 1e-10) or K.abs().max() == 0


def test_newton_schulz_rejects_a_damping_too_small_to_converge():
    import pytest
    from torch import nn

    from sdsopt import SDSAdamW

    A, B = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(3, 2))
    opt = SDSAdamW([("x.lora_A.a.weight", A), ("x.lora_B.a.weight", B)], mode="sds_polar", route="newton_schulz", rank_tol=1e-9)
    A.grad, B.grad = torch.randn_like(A), torch.randn_like(B)
    with pytest.raises(ValueError, match="rank_tol=1e-09 is below 64·eps of torch.float32"):
        opt.step()
