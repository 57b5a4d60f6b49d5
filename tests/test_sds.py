"""Mode ``sds`` (docs/math.md §2, (2.1)–(2.6)): Adam in the bases' coordinates, against float64 references.

Properties P1, P3, P4, P7 (warm-up), P8, P9 (against the paper's layer), P10 (re-split) and P11 (against
``scaled`` and the closed form), plus rank-deficient and ill-conditioned factors, bf16, and the errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from svd_reference import lora_grads, make_factor, orthonormal
from sdsopt import SDSAdamW, rewrite_pair
from sdsopt.coordinates import resplit_maps
from sdsopt.reference import PaperSDSLayers
from sdsopt.lab.tasks.lora import LoraLinear

F64 = torch.float64


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def layer_with(A: torch.Tensor, B: torch.Tensor, alpha: float | None = None) -> LoraLinear:
    """A LoRA layer (float64) whose factors are ``A`` (r×n) and ``B`` (m×r)."""
    r, n = A.shape
    torch.manual_seed(0)  # the frozen base weight
    layer = LoraLinear(nn.Linear(n, B.shape[0], bias=False, dtype=F64), r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def product(layer: LoraLinear) -> torch.Tensor:
    A, B = factors(layer)
    return (layer.scaling * B @ A).detach().clone()


def run(layer: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
        after=None) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
        if after is not None:
            after(opt)
        out.append(product(layer) if isinstance(layer, LoraLinear) else None)
    return out


@st.composite
def pair_case(draw, max_kappa: float = 1e2):
    m, n = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    kappa = 10 ** draw(st.floats(0, math.log10(max_kappa)))
    gen = torch.Generator().manual_seed(seed)
    A = make_factor(r, n, kappa, 10 ** draw(st.floats(-1, 1)), gen)
    B = make_factor(m, r, kappa, 10 ** draw(st.floats(-1, 1)), gen)
    x = torch.randn(16, n, dtype=F64, generator=gen)
    y = torch.randn(16, m, dtype=F64, generator=gen)
    return A, B, x, y


# ----------------------------------------------------------------------------- P1, P3, P4
@given(pair_case(), st.floats(-3, 3), st.sampled_from([0.0, 0.1]))
def test_p1_scale_invariance(case, log_c, wd):
    """P1: (cA, B/c) gives the same trajectory of BA (coordinates, their gradients and Adam's state are
    invariant), with and without the re-balance and weight decay (exact coordinates: step_damping=0, whose
    absolute shift is tied to balanced factors; no ramp, see the next test)."""
    A, B, x, y = case
    c = 10**log_c
    for rebalance in (True, False):
        runs = []
        for A0, B0 in ((A, B), (c * A, B / c)):
            layer = layer_with(A0, B0)
            opt = SDSAdamW(layer.named_parameters(), lr=1e-2, weight_decay=wd, warmup_steps=0, rebalance=rebalance,
                           step_damping=0.0, coordinate_ramp=0)
            runs.append(run(layer, opt, x, y, steps=4))
        for W, W_c in zip(*runs):
            assert rel(W_c, W) <= 1e-9


@given(pair_case(), st.integers(-12, 12), st.sampled_from([0.0, 0.1]))
def test_p1_scale_invariance_is_exact_for_powers_of_two(case, k, wd):
    """P1 with the ramp and the re-balance: for c = 2^k floating point scales exactly, so the trajectories
    are bit-identical.  (With the ramp, a generic c can land on a rounding-sensitive trajectory: measured, a
    κ ≈ 100 pair whose small steps keep it ill-conditioned moved BA by 6e-8 after a 2^-20 change of c.)"""
    A, B, x, y = case
    runs = []
    for A0, B0 in ((A, B), (2.0**k * A, B / 2.0**k)):
        layer = layer_with(A0, B0)
        runs.append(run(layer, SDSAdamW(layer.named_parameters(), lr=1e-2, weight_decay=wd, warmup_steps=0,
                                        step_damping=0.0, coordinate_ramp=10), x, y, steps=4))
    for W, W_c in zip(*runs):
        assert rel(W_c, W) <= 1e-15


@given(pair_case(max_kappa=1e4), st.floats(-2, 2))
def test_p3_isotropy(case, log_s):
    """P3: the singular values of g̃B are those of s·G·V_A, of g̃A those of s·U_Bᵀ·G: Σ of the other factor is gone."""
    A, B, x, _ = case
    s = 10**log_s
    G = torch.randn(B.shape[0], A.shape[1], dtype=F64, generator=torch.Generator().manual_seed(1))
    new_a, new_b = rewrite_pair(A, B, *lora_grads(A, B, G, s), mode="sds")
    V_A = torch.linalg.svd(A, full_matrices=False).Vh.T
    U_B = torch.linalg.svd(B, full_matrices=False).U
    # the relative shift τ = 1e-13 of (2.5) perturbs a direction of a factor of condition κ by ~ r·τ·κ²
    kappa = max(torch.linalg.cond(A).item(), torch.linalg.cond(B).item())
    tol = 1e-10 + 1e-13 * A.shape[0] * kappa**2
    torch.testing.assert_close(torch.linalg.svdvals(new_b), torch.linalg.svdvals(s * G @ V_A), rtol=tol, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(new_a), torch.linalg.svdvals(s * U_B.T @ G), rtol=tol, atol=0)


@given(st.integers(2, 9), st.integers(2, 9), st.data())
def test_p4_orthonormal_factors_take_the_lora_step(m, n, data):
    """P4: with A Aᵀ = I and Bᵀ B = I the coordinates are the factors: one step equals plain AdamW."""
    r = data.draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    A, B = orthonormal(n, r, gen).T.contiguous(), orthonormal(m, r, gen)
    x, y = torch.randn(16, n, dtype=F64, generator=gen), torch.randn(16, m, dtype=F64, generator=gen)
    sds, lora = layer_with(A, B), layer_with(A, B)
    run(sds, SDSAdamW(sds.named_parameters(), lr=1e-2, warmup_steps=0, coordinate_ramp=0, step_damping=0.0), x, y,
        steps=1)
    run(lora, torch.optim.AdamW(lora.parameters(), lr=1e-2), x, y, steps=1)
    for p, q in zip(factors(sds), factors(lora)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- P7, P8, P10
@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True, weight_decay=0.1), dict(maximize=True)])
def test_p7_warmup_is_adamw_bit_for_bit(kw):
    """The warm-up steps of every pair are torch.optim.AdamW(foreach=False) exactly, B = 0 start included."""
    torch.manual_seed(0)
    ours, ref = LoraLinear(nn.Linear(7, 5), 3), LoraLinear(nn.Linear(7, 5), 3)
    ref.load_state_dict(ours.state_dict())
    x, y = torch.randn(12, 7), torch.randn(12, 5)
    run(ours, SDSAdamW(ours.named_parameters(), lr=1e-2, warmup_steps=6, **kw), x, y, steps=5)
    run(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, foreach=False, **kw),
        x, y, steps=5)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_p8_zero_b_start_in_coordinates(m, n, r, seed, dtype):
    """P8: B = 0 with coordinate steps from step one (warmup_steps=0).  A's partner is zero, so R_B = I and A
    takes AdamW's step (up to the rounding of adding the change ``X + (X' − X)``); B moves in A's basis, so the
    weight step ``δB·A = δB̃·Q_Aᵀ`` has the norm of Adam's first coordinate step, lr·√(m·r) (r ≤ n).  Then
    finite coordinate steps, r > min(m, n) included."""
    gen = torch.Generator().manual_seed(seed)
    layer = LoraLinear(nn.Linear(n, m, bias=False), r).to(dtype)
    x, y = torch.randn(16, n, generator=gen).to(dtype), torch.randn(16, m, generator=gen).to(dtype)
    ref = LoraLinear(nn.Linear(n, m, bias=False), r).to(dtype)
    ref.load_state_dict(layer.state_dict())
    A0 = factors(layer)[0].detach().clone()
    lr = 1e-2
    run(layer, SDSAdamW(layer.named_parameters(), lr=lr, weight_decay=0.0, warmup_steps=0, coordinate_ramp=0,
                         step_damping=0.0), x, y,
        steps=1)
    run(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=lr, weight_decay=0.0),
        x, y, steps=1)
    torch.testing.assert_close(factors(layer)[0], factors(ref)[0], rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=0)
    if 2 * r <= n and dtype != torch.bfloat16:  # a well-conditioned A: the τ shift is negligible
        step = (factors(layer)[1].double() @ A0.double()).norm().item()
        assert step == pytest.approx(lr * math.sqrt(m * r), rel=1e-3)
    opt = SDSAdamW(layer.named_parameters(), lr=lr, warmup_steps=0)
    run(layer, opt, x, y, steps=5)
    assert all(torch.isfinite(p).all() for p in layer.parameters())


@given(pair_case(max_kappa=1e4))
def test_p10_resplit_preserves_the_product(case):
    """P10: the re-split leaves BA unchanged (1e-12 relative), balances the factors and aligns them with BA's SVD."""
    A, B, _, _ = case
    M_A, M_B = resplit_maps((A @ A.T)[None], (B.T @ B)[None], rank_tol=1e-13)
    A2, B2 = M_A[0] @ A, B @ M_B[0]
    assert rel(B2 @ A2, B @ A) <= 1e-12
    sigma = torch.linalg.svdvals(B @ A)[: A.shape[0]]
    strong = sigma >= 1e-3 * sigma[0]
    torch.testing.assert_close(torch.linalg.svdvals(A2)[strong], sigma[strong].sqrt(), rtol=1e-8, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(B2)[strong], sigma[strong].sqrt(), rtol=1e-8, atol=0)


@pytest.mark.parametrize("m, n, r", [(9, 7, 3), (5, 12, 4), (16, 16, 1)])
def test_resplit_signs_follow_a_convention(m, n, r):
    """The re-split's B' in the coordinates of B's orthonormal basis is ``U·D_B`` with the largest-magnitude entry
    of every column positive, whatever signs the SVD returned (CPU and GPU re-splits then agree)."""
    gen = torch.Generator().manual_seed(m * n + r)
    A, B = torch.randn(r, n, generator=gen, dtype=F64), torch.randn(m, r, generator=gen, dtype=F64)
    M_A, M_B = resplit_maps((A @ A.T)[None], (B.T @ B)[None], rank_tol=1e-13)
    Q, R = torch.linalg.qr(B)
    C = (Q * torch.sign(torch.diagonal(R))).T @ (B @ M_B[0])
    assert (C.gather(0, C.abs().argmax(0, keepdim=True)) > 0).all()
    assert rel((B @ M_B[0]) @ (M_A[0] @ A), B @ A) <= 1e-12


def test_p10_resplit_in_the_optimizer_resets_the_state():
    """At the end of the warm-up: BA as after the AdamW step, Adam state zero, step counts 0, warm-up count kept."""
    torch.manual_seed(1)
    ours, ref = LoraLinear(nn.Linear(7, 5, dtype=F64), 3), LoraLinear(nn.Linear(7, 5, dtype=F64), 3)
    ref.load_state_dict(ours.state_dict())
    x, y = torch.randn(12, 7, dtype=F64), torch.randn(12, 5, dtype=F64)
    opt = SDSAdamW(ours.named_parameters(), lr=1e-2, warmup_steps=3)
    W = run(ours, opt, x, y, steps=3)[-1]
    W_ref = run(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2), x, y, steps=3)[-1]
    assert rel(W, W_ref) <= 1e-12
    for p in factors(ours):
        state = opt.state[p]
        assert state["step"].item() == 0 and state["sds_warmup"] == 3
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    A, B = factors(ours)
    sigma_a, sigma_b = torch.linalg.svdvals(A), torch.linalg.svdvals(B)
    strong = sigma_a**2 >= 1e-3 * sigma_a[0] ** 2  # weaker directions keep A's part at the floor
    torch.testing.assert_close(sigma_a[strong], sigma_b[strong], rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- P9, P11
def test_p9_first_order_step_of_the_papers_layer():
    """P9: from the same ΔW, bases and (empty) Adam state, one step of the paper's layer (2.0) with AdamW and
    one step of SDSAdamW change W alike to first order in lr: the difference shrinks ∝ lr."""
    gen = torch.Generator().manual_seed(4)
    m, n, r = 6, 8, 3
    Q_B, Q_A = orthonormal(m, r, gen), orthonormal(n, r, gen)
    D = torch.tensor([2.0, 1.0, 0.3], dtype=F64)
    A, B = D[:, None] * Q_A.T, Q_B * D  # R_B = R_A = D: the bases are Q_B, Q_A
    x, y = torch.randn(32, n, dtype=F64, generator=gen), torch.randn(32, m, dtype=F64, generator=gen)
    gaps = []
    for lr in (1e-3, 1e-4):
        ours = layer_with(A, B, alpha=6.0)
        W0 = product(ours)
        opt = SDSAdamW(ours.named_parameters(), lr=lr, weight_decay=0.0, warmup_steps=0, coordinate_ramp=0)
        W_ours = run(ours, opt, x, y, 1)[0]
        paper = layer_with(A, B, alpha=6.0)
        layers = PaperSDSLayers(paper, total_steps=100)
        layers.activate()
        torch.testing.assert_close(layers.delta_weight(layers.layers[0]), W0, rtol=1e-12, atol=0)  # Eq. 8 keeps W
        opt = torch.optim.AdamW([p for p in paper.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        run(paper, opt, x, y, 1)
        W_paper = layers.delta_weight(layers.layers[0]).detach()
        gaps.append(rel(W_ours - W0, W_paper - W0))
    assert gaps[0] < 0.05 and gaps[1] < gaps[0] / 5, gaps


@given(pair_case(max_kappa=1e3), st.floats(-1, 1))
def test_p11_gradient_descent_limit_is_scaled_with_zero_damping(case, log_s):
    """P11: betas = (0, 0), eps ≫ |g| (Adam = gradient step of size lr/eps): the weight step of ``sds`` is
    −η s² (Q_BQ_Bᵀ G + G Q_AQ_Aᵀ) = ``scaled`` with δ → 0, to first order in η."""
    A, B, x, y = case
    s = 10**log_s
    alpha = s * A.shape[0]
    eps, lr = 1e10, 1.0  # step 1e-10·g̃: |g| ≪ eps, δB·δA ∝ step² negligible; rounding of W (~1) limits to ~1e-4
    layer = layer_with(A, B, alpha=alpha)
    W0 = product(layer)
    W = (layer.base.weight + W0).requires_grad_(True)
    G = torch.autograd.grad(((x @ W.T - y) ** 2).mean(), W)[0]
    Q_B, Q_A = torch.linalg.qr(B).Q, torch.linalg.qr(A.T).Q
    expected = -(lr / eps) * s**2 * (Q_B @ Q_B.T @ G + G @ Q_A @ Q_A.T)
    steps = {}
    for mode, kw in (("sds", dict(warmup_steps=0, coordinate_ramp=0, step_damping=0.0)),
                     ("scaled", dict(damping=1e-30))):
        lay = layer_with(A, B, alpha=alpha)
        opt = SDSAdamW(lay.named_parameters(), lr=lr, eps=eps, betas=(0.0, 0.0), weight_decay=0.0, mode=mode, **kw)
        steps[mode] = run(lay, opt, x, y, 1)[0] - W0
    for mode, step in steps.items():
        assert rel(step, expected) <= 5e-4, mode


# ----------------------------------------------------------------------------- extremes, dtypes
@pytest.mark.parametrize("case", ["zero_b", "rank1", "r_gt_min", "kappa1e8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_factors_stay_finite(case, dtype):
    # without the step damping the κ = 1e8 case jumps from 1.1 to ~15 (bf16) at the end of the warm-up
    """B = 0, rank-1 factors, r > min(m, n) and κ = 1e8 train for 30 steps (warm-up 3) without NaN/Inf,
    and the loss goes down."""
    gen = torch.Generator().manual_seed(5)
    m, n, r = (2, 9, 6) if case == "r_gt_min" else (7, 9, 4)
    layer = LoraLinear(nn.Linear(n, m, bias=False), r)
    A, B = factors(layer)
    with torch.no_grad():
        if case == "rank1":
            A.copy_(torch.randn(1, n, generator=gen).expand(r, n) * 0.3)
        if case == "kappa1e8":
            A.copy_(make_factor(r, n, 1e8, 1.0, gen).float())
            B.copy_(make_factor(m, r, 1e8, 1.0, gen).float())
    layer = layer.to(dtype)
    x, y = torch.randn(64, n, generator=gen).to(dtype), torch.randn(64, m, generator=gen).to(dtype)
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, warmup_steps=3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(x) - y) ** 2).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert losses[-1] < losses[0]
    assert all(p.dtype == dtype for p in layer.parameters())


def test_factor_change_is_exactly_zero_when_adam_makes_none():
    """lr = 0: the map back adds R^{-1}·0, so the factors stay bit-identical (the change, not a round trip, is mapped)."""
    torch.manual_seed(2)
    layer = LoraLinear(nn.Linear(6, 5), 3)
    with torch.no_grad():
        factors(layer)[1].normal_()
    before = [p.detach().clone() for p in factors(layer)]
    opt = SDSAdamW(layer.named_parameters(), lr=0.0, warmup_steps=0, rebalance=False)
    run(layer, opt, torch.randn(8, 6), torch.randn(8, 5), steps=2)
    for p, q in zip(factors(layer), before):
        assert torch.equal(p, q)


def test_lora_fa_pair_moves_only_the_trainable_factor():
    """A frozen (LoRA-FA): B takes coordinate steps B̃ = B R_Aᵀ; A is untouched; the warm-up still counts."""
    torch.manual_seed(3)
    layer = LoraLinear(nn.Linear(6, 5, dtype=F64), 3)
    A, B = factors(layer)
    A_before = A.detach().clone()
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, warmup_steps=2)
    x, y = torch.randn(8, 6, dtype=F64), torch.randn(8, 5, dtype=F64)
    A.requires_grad_(False)
    run(layer, opt, x, y, steps=4)
    assert torch.equal(A, A_before) and B.abs().sum() > 0
    assert opt.state[B]["sds_warmup"] == 2


# ----------------------------------------------------------------------------- errors, checkpoints
@pytest.mark.parametrize("kw,match", [
    (dict(decouple_sigma=True), "use mode='sds_polar' for the singular-value channel"),
    (dict(route="eigh"), "route='eigh' does not apply to mode='sds'"),
    (dict(warmup_steps=-1), "warmup_steps=-1 must be an int >= 0"),
    (dict(warmup_steps=2.5), "warmup_steps=2.5 must be an int"),
    (dict(resplit="yes"), "resplit='yes' must be True or False"),
    (dict(mode="sds_polar", route="cholesky"), "route='cholesky' does not apply to mode='sds_polar'"),
])
def test_bad_options_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        SDSAdamW(LoraLinear(nn.Linear(4, 3), 2).named_parameters(), **kw)


def test_a_state_from_sdsopt_0_1_sds_is_refused():
    """0.1's 'sds' kept Adam moments of the plain factors: loading them into 0.2's coordinate 'sds' is refused."""
    layer = LoraLinear(nn.Linear(4, 3), 2)
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2)
    run(layer, opt, torch.randn(5, 4), torch.randn(5, 3), steps=1)
    old = opt.state_dict()
    for group in old["param_groups"]:  # what 0.1 wrote: no warm-up options, mode 'sds'
        for key in ("warmup_steps", "resplit", "rebalance"):
            del group[key]
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="written by sdsopt 0.1.*mode='sds_polar'"):
        SDSAdamW(layer.named_parameters()).load_state_dict(torch.load(buf))


def test_coordinate_ramp_scales_each_pairs_first_coordinate_steps():
    """coordinate_ramp=N: a pair's k-th coordinate step applies k/N of the change of the same step without the
    ramp (same state, same moments); pairs of one bucket at different counts get their own factor."""
    torch.manual_seed(4)
    net = nn.ModuleDict({name: LoraLinear(nn.Linear(6, 5, dtype=F64), 3) for name in ("p", "q")})  # one bucket
    with torch.no_grad():
        for layer in net.values():
            factors(layer)[1].normal_()
    x, y = torch.randn(8, 6, dtype=F64), torch.randn(8, 5, dtype=F64)
    kw = dict(lr=1e-2, warmup_steps=0, rebalance=False, coordinate_ramp=4)
    opt = SDSAdamW(net.named_parameters(), **kw)
    for step in range(6):
        opt.zero_grad()
        ((net["p"](x) + net["q"](x) - y) ** 2).mean().backward()
        if step == 0:  # q skips a step: its count lags p's by one from here on
            for p in factors(net["q"]):
                p.grad = None
        twin = copy.deepcopy(net)
        twin_opt = SDSAdamW(twin.named_parameters(), **kw)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        twin_opt.param_groups[0]["coordinate_ramp"] = 0
        for p, t in zip(net.parameters(), twin.parameters()):
            t.grad = None if p.grad is None else p.grad.clone()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.step()
        twin_opt.step()
        for name, layer in net.items():
            count = step if name == "p" else step - 1  # coordinate steps taken before this one
            if name == "q" and step == 0:
                continue
            c = min(1.0, (count + 1) / 4)
            for label, p, t in zip("AB", factors(layer), factors(twin[name])):
                key = next(n for n, q in net.named_parameters() if q is p)
                torch.testing.assert_close(p - before[key], c * (t - before[key]), rtol=1e-9, atol=1e-15,
                                           msg=f"{name}.{label} step {step}")


@pytest.mark.filterwarnings("ignore:SDSAdamW.skip_nonfinite=True. skipped a step")
@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, amsgrad=True, coordinate_ramp=3),
                                dict(rebalance=False, maximize=True, skip_nonfinite=True, step_damping=0.5)])
def test_the_cpu_per_pair_and_chunked_routes_step_as_the_stacked_route(kw, monkeypatch):
    """On the CPU factors in the algebra's dtype (above a size threshold) take the per-pair route of the torch
    step (no stacks; the map back an ``addmm_`` per factor): float64 factors after 6 steps equal the stacked
    route's (the route of small, bf16 and FSDP2-sharded factors) to 1e-12 — three Linear pairs of one shape (a
    bucket), a Conv2d pair, a LoRA-FA pair, a NaN gradient on step 4 — with weight decay, amsgrad, the ramp,
    re-balancing or not.  So does the stacked route when a bucket is stacked one pair at a time (chunks of
    bounded bytes, :func:`sdsopt.buckets.chunks`)."""
    from sdsopt import buckets
    from sdsopt.modes import sds_steps

    def model():
        torch.manual_seed(7)
        net = nn.ModuleDict({f"l{i}": nn.ModuleDict({"lora_A": nn.Linear(9, 3, bias=False),
                                                     "lora_B": nn.Linear(3, 7, bias=False)}) for i in range(3)})
        net["conv"] = nn.ModuleDict({"lora_A": nn.Conv2d(4, 2, 3, bias=False),
                                     "lora_B": nn.Conv2d(2, 5, 1, bias=False)})
        net["fa"] = nn.ModuleDict({"lora_A": nn.Linear(6, 2, bias=False), "lora_B": nn.Linear(2, 6, bias=False)})
        net = net.double()
        net["fa"]["lora_A"].weight.requires_grad_(False)
        return net

    def steps(net):
        opt = SDSAdamW(net.named_parameters(), lr=1e-2, warmup_steps=2, **kw)
        gen = torch.Generator().manual_seed(1)
        for t in range(6):
            for p in net.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            if t == 3 and kw.get("skip_nonfinite"):
                net["l1"]["lora_B"].weight.grad[0, 0] = float("nan")
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    monkeypatch.setattr(sds_steps, "PER_PAIR_MIN_NUMEL", 0)  # (these factors are below the route's size threshold)
    routes = []
    route = sds_steps._per_pair_route
    monkeypatch.setattr(sds_steps, "_per_pair_route", lambda *a: routes.append(route(*a)) or routes[-1])
    per_pair = steps(model())
    assert routes and all(routes)
    monkeypatch.setattr(sds_steps, "_per_pair_route", lambda *a: False)
    stacked = steps(model())
    assert max((a - b).abs().max().item() for a, b in zip(per_pair, stacked)) <= 1e-12
    monkeypatch.setattr(buckets, "STACK_CHUNK_BYTES", 1)  # every chunk one pair
    sizes = []
    monkeypatch.setattr(sds_steps, "chunks", lambda *a: sizes.append([len(c.a) for c in buckets.chunks(*a)]) or
                        buckets.chunks(*a))
    chunked = steps(model())
    assert [1, 1, 1] in sizes and all(set(x) == {1} for x in sizes)  # the 3-pair bucket went in 3 chunks
    assert max((a - b).abs().max().item() for a, b in zip(chunked, stacked)) <= 1e-12
    assert any((a - b).abs().max() > 0 for a, b in zip(per_pair, [p for p in model().parameters()]))
