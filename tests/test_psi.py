"""PSILoRA (issue 13): proximal ALS against float64 closed forms and SVDs; the optimizer end to end."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from svd_reference import make_factor, psi_reference, truncated
from sdsopt import PSILoRA, SDSAdamW
from sdsopt.psi import proximal_als
from sdsopt.lab.tasks.lora import LoraLinear

F64 = torch.float64


@st.composite
def factors_and_target(draw):
    m, n = draw(st.integers(3, 10)), draw(st.integers(3, 10))
    r = draw(st.integers(1, min(m, n) - 1))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    A = make_factor(r, n, 10 ** draw(st.floats(0, 2)), 1.0, gen)
    B = make_factor(m, r, 10 ** draw(st.floats(0, 2)), 1.0, gen)
    G = torch.randn(m, n, dtype=F64, generator=gen)
    return A, B, G


def products(W):
    return (lambda V: W @ V), (lambda U: W.T @ U)


@given(factors_and_target(), st.floats(-4, -1), st.floats(-3, 0))
def test_jacobi_pass_is_scaled_gradient_descent(case, log_lr, log_lmbd):
    """K = 0: one Jacobi pass towards W̄ = BA − lr·G is exactly A − lr(BᵀB + λI)^{-1}BᵀG, B − lr·G Aᵀ(AAᵀ + λI)^{-1}."""
    A, B, G = case
    lr, lam = 10**log_lr, 10**log_lr * 10**log_lmbd
    A1, B1 = proximal_als(A, B, *products(B @ A - lr * G), lam, sweeps=0)
    eye = torch.eye(A.shape[0], dtype=F64)
    torch.testing.assert_close(A1, A - lr * torch.linalg.solve(B.T @ B + lam * eye, B.T @ G), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(B1, B - lr * torch.linalg.solve(A @ A.T + lam * eye, (G @ A.T).T).T,
                               rtol=1e-9, atol=1e-12)


@given(factors_and_target(), st.floats(-3, 0))
def test_one_sweep_is_the_riemannian_step_to_first_order(case, log_lmbd):
    """K = 1: the first half-sweep is exactly the scaled step (the Jacobi pass's A); the whole Gauss–Seidel
    sweep moves BA, to first order in lr, by the Riemannian gradient step on the rank-r manifold,
    −lr·(P_B G + G P_A − P_B G P_A) (the tangent projection of G; P_B, P_A the projectors on B's columns and
    A's rows), i.e. scaled GD's −lr·(P_B G + G P_A) minus its doubly counted P_B G P_A."""
    A, B, G = case
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    tangent = P_B @ G + G @ P_A - P_B @ G @ P_A
    errors = []
    for lr in (1e-4, 1e-5):
        lam = lr * 10**log_lmbd
        A1, B1 = proximal_als(A, B, *products(B @ A - lr * G), lam, sweeps=1)
        A0, _ = proximal_als(A, B, *products(B @ A - lr * G), lam, sweeps=0)
        torch.testing.assert_close(A1, A0, rtol=1e-10, atol=1e-13)  # the first half-sweep
        errors.append(((B1 @ A1 - B @ A) / lr + tangent).norm() / tangent.norm())
    assert errors[1] <= 0.2 * errors[0] + 1e-7  # the remainder is O(lr)


@settings(deadline=None, max_examples=20)  # 300 sweeps: seconds on a busy 2-core machine
@given(factors_and_target(), st.integers(0, 10**6))
def test_many_sweeps_reach_the_best_rank_r_approximation(case, seed):
    """Prop. 1: with λ → 0, alternating sweeps converge to the truncated SVD of W̄ (Eckart–Young)."""
    A, B, _ = case
    gen = torch.Generator().manual_seed(seed)
    m, n, r = B.shape[0], A.shape[1], A.shape[0]
    S = torch.linspace(4.0, 0.5, min(m, n), dtype=F64)  # a clear gap after every r
    U = torch.linalg.qr(torch.randn(m, min(m, n), dtype=F64, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), dtype=F64, generator=gen))[0]
    W = U @ torch.diag(S) @ V.T
    A_k, B_k = proximal_als(A, B, *products(W), lam=1e-12, sweeps=300)
    best = truncated(W, r)
    assert (B_k @ A_k - best).norm() <= 1e-6 * best.norm()


def psi_layer(seed=0, zero_b=True):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(7, 6, dtype=F64), 3, alpha=6.0)
    if not zero_b:
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
    return layer


def step(layer, opt, x, y):
    opt.zero_grad()
    loss = ((layer(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def full_grad(layer, x, y):
    """G = ∂L/∂(BA), by autograd on the dense product (independent of the hooks)."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    P = (B @ A).detach().requires_grad_(True)
    out = layer.base(x) + layer.scaling * x @ P.T
    ((out - y) ** 2).mean().backward()
    return P.grad


def test_optimizer_step_equals_proximal_als_on_the_dense_gradient():
    """PSILoRA's step on a PEFT-style layer = proximal_als on W̄ = BA − lr·G with G from dense autograd."""
    layer = psi_layer(zero_b=False)
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    A0, B0 = (t.detach().clone() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    G = full_grad(layer, x, y)
    lr, lmbd = 0.05, 0.1
    opt = PSILoRA(layer, lr=lr, lmbd=lmbd, lookahead_iters=2)
    step(layer, opt, x, y)
    A_ref, B_ref = proximal_als(A0, B0, *products(B0 @ A0 - lr * G), lr * lmbd, sweeps=2)
    torch.testing.assert_close(layer.lora_A["default"].weight, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B["default"].weight, B_ref, rtol=1e-10, atol=1e-12)


def test_momentum_factors_are_the_dense_momentum_when_it_is_low_rank():
    """With gradients that share one rank-q subspace the low-rank momentum is exact: after t steps
    U_M V_M = Σ_k β^{t−1−k} G_k (torch SGD convention, dampening 0), to 1e-8."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(5, 4, bias=False, dtype=F64), 2)  # r = 2
    with torch.no_grad():
        layer.base.weight.zero_()
    x = torch.randn(2, 5, dtype=F64)  # two inputs: every G = δᵀX has rank ≤ 2 = q, in one row space
    beta, lr = 0.8, 1e-3
    opt = PSILoRA(layer, lr=lr, lmbd=1e-9, momentum=beta, lookahead_iters=50)
    dense = torch.zeros(4, 5, dtype=F64)
    A_param = layer.lora_A["default"].weight
    for t in range(4):
        y = torch.randn(2, 4, dtype=F64)
        dense = beta * dense + full_grad(layer, x, y)
        step(layer, opt, x, y)
        V_M, U_M = opt.state[A_param]["psi_momentum"], opt.state[layer.lora_B["default"].weight]["psi_momentum"]
        assert (U_M @ V_M - dense).norm() <= 1e-8 * dense.norm(), t


def test_zero_b_start_trains():
    """LoRA's B = 0 start: the first step moves B (λ > 0 keeps BᵀB + λI invertible) and the loss goes down."""
    layer = psi_layer(zero_b=True)
    x, y = torch.randn(32, 7, dtype=F64), torch.randn(32, 6, dtype=F64)
    opt = PSILoRA(layer, lr=0.05)
    losses = [step(layer, opt, x, y) for _ in range(30)]
    assert losses[-1] < losses[0] and all(torch.isfinite(p).all() for p in layer.parameters())
    assert layer.lora_B["default"].weight.abs().sum() > 0


def test_bias_follows_torch_adamw():
    """Parameters outside the pairs: torch's AdamW on the same gradients, bit for bit."""
    layer = psi_layer(zero_b=False)
    layer.base.bias.requires_grad_(True)
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    opt = PSILoRA(layer, lr=0.5, adam_lr=0.01, weight_decay=0.1)
    bias = layer.base.bias
    mirror = bias.detach().clone().requires_grad_(True)
    ref = torch.optim.AdamW([mirror], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        mirror.grad = bias.grad.clone()
        opt.step()
        ref.step()
        assert torch.equal(bias, mirror)


@pytest.mark.parametrize("kw", [dict(momentum=0.75), dict(metric="diagonal"),
                                dict(metric="diagonal", momentum=0.5, dampening=0.5, max_grad_norm=0.1)])
def test_checkpoint_resumes_bit_exactly(kw):
    """Momentum factors, the metric's running averages and its step count are in the state: resume is bit-exact."""
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    layer = psi_layer()
    opt = PSILoRA(layer, lr=0.05, **kw)
    for _ in range(3):
        step(layer, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(3):
        step(layer, opt, x, y)
    buf.seek(0)
    ckpt = torch.load(buf)
    other = psi_layer(seed=5)
    other.load_state_dict(ckpt["model"])
    resumed = PSILoRA(other, lr=0.05, **kw)
    resumed.load_state_dict(ckpt["opt"])
    for _ in range(3):
        step(other, resumed, x, y)
    for p, q in zip(layer.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_gradient_accumulation_sums_micro_batches():
    """Two micro-batches before one step = one step on their summed gradient (the recorded rows add up)."""
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    a, b = psi_layer(zero_b=False), psi_layer(zero_b=False)
    opt_a, opt_b = PSILoRA(a, lr=0.05), PSILoRA(b, lr=0.05)
    opt_a.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        (((a(x[half]) - y[half]) ** 2).sum() / (16 * 6)).backward()
    opt_a.step()
    step(b, opt_b, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_errors_name_the_fix():
    layer = psi_layer()
    with pytest.raises(ValueError, match=r"lmbd=0.0 must be > 0"):
        PSILoRA(layer, lmbd=0.0)
    with pytest.raises(ValueError, match="lookahead_iters"):
        PSILoRA(layer, lookahead_iters=-1)
    with pytest.raises(ValueError, match=r"max_grad_norm=0 must be None or > 0"):
        PSILoRA(layer, max_grad_norm=0)
    with pytest.raises(ValueError, match="nn.Module"):
        PSILoRA(list(layer.parameters()))
    opt = PSILoRA(layer, lr=0.01)
    detached = psi_layer(seed=1)  # another model: the hooks are on the one given to PSILoRA
    ((detached(torch.randn(4, 7, dtype=F64))) ** 2).mean().backward()
    for p, q in zip(layer.parameters(), detached.parameters()):
        p.grad = q.grad
    with pytest.raises(RuntimeError, match="inputs were not recorded"):
        opt.step()
    with pytest.raises(ValueError, match="one param group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_lr_zero_leaves_the_factors_unchanged():
    layer = psi_layer(zero_b=False)
    before = [p.detach().clone() for p in layer.parameters()]
    step(layer, PSILoRA(layer, lr=0.0), torch.randn(8, 7, dtype=F64), torch.randn(8, 6, dtype=F64))
    for p, q in zip(layer.parameters(), before):
        assert torch.equal(p, q)


def test_lorsum_mode_of_sdsadamw_names_psilora():
    with pytest.raises(ValueError, match="PSILoRA"):
        SDSAdamW(psi_layer().named_parameters(), mode="lorsum")


@given(factors_and_target(), st.integers(0, 4), st.floats(-3, 0))
def test_proximal_als_matches_least_squares_reference(case, sweeps, log_lam):
    """Each half-sweep is the proximal least-squares solution (independent reference: lstsq on the stacked
    system), in PSI-LoRA's order."""
    A, B, G = case
    W = B @ A - 0.1 * G
    lam = 10**log_lam
    got = proximal_als(A, B, *products(W), lam, sweeps)
    want = psi_reference(A, B, W, lam, sweeps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_overflowed_factors_give_nan_not_an_exception():
    """A diverged run (factors already non-finite) ends in NaN, as AdamW's would, instead of a Cholesky error."""
    eye = torch.eye(2, dtype=F64)
    A = torch.full((2, 4), float("inf"), dtype=F64)
    B = torch.ones(3, 2, dtype=F64)
    W = torch.ones(3, 4, dtype=F64)
    A1, B1 = proximal_als(A, B, *products(W), lam=0.1, sweeps=1)
    assert torch.isnan(B1).all()
    A_ok, _ = proximal_als(eye @ torch.ones(2, 4, dtype=F64), B, *products(W), lam=0.1, sweeps=0)
    assert torch.isfinite(A_ok).all()


def test_tiny_lambda_on_a_rank_deficient_float32_factor_stays_finite():
    """float32, B of rank 1 and norm 1e3, λ = 1e-9: the rounded BᵀB + λI is not numerically positive definite
    (its Cholesky fails: checked), yet the solve must not turn finite factors into NaN."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, 1, generator=gen)
    B = 1e3 * torch.cat([b, b, -b], dim=1)
    A = torch.randn(3, 7, generator=gen)
    W = torch.randn(6, 7, generator=gen)
    K = B.T @ B
    assert torch.linalg.cholesky_ex(K + 1e-9 * torch.eye(3))[1] != 0  # the failure the floor prevents
    for sweeps in (0, 1, 3):
        A1, B1 = proximal_als(A, B, *products(W), lam=1e-9, sweeps=sweeps)
        assert torch.isfinite(A1).all() and torch.isfinite(B1).all(), sweeps


def metric_reference(A, B, W, lam, sweeps, s_in, s_out):
    """The metric-norm proximal ALS by lstsq, column by column (A) and row by row (B) of the weighted system."""
    def solve_a(B_t):
        lhs = torch.cat([s_out.sqrt()[:, None] * B_t, lam**0.5 * torch.eye(B_t.shape[1], dtype=F64)])
        rhs = torch.cat([s_out.sqrt()[:, None] * W, lam**0.5 * A])
        return torch.linalg.lstsq(lhs, rhs).solution

    def solve_b(A_t):
        lhs = torch.cat([(A_t * s_in.sqrt()[None, :]).T, lam**0.5 * torch.eye(A_t.shape[0], dtype=F64)])
        rhs = torch.cat([(W * s_in.sqrt()[None, :]).T, lam**0.5 * B.T])
        return torch.linalg.lstsq(lhs, rhs).solution.T

    if sweeps == 0:
        return solve_a(B), solve_b(A)
    A_k, B_k = A, B
    for _ in range(sweeps):
        A_k = solve_a(B_k)
        B_k = solve_b(A_k)
    return A_k, B_k


@given(factors_and_target(), st.integers(0, 3), st.floats(-3, 0), st.integers(0, 10**6))
def test_metric_als_matches_weighted_least_squares(case, sweeps, log_lam, seed):
    """The diagonal-metric half-sweeps are the weighted proximal least-squares solutions (dense lstsq reference)."""
    A, B, G = case
    gen = torch.Generator().manual_seed(seed)
    s_in = torch.rand(A.shape[1], dtype=F64, generator=gen) * 3 + 0.1
    s_out = torch.rand(B.shape[0], dtype=F64, generator=gen) * 3 + 0.1
    W = B @ A - 0.1 * G / s_out[:, None] / s_in[None, :]
    lam = 10**log_lam
    got = proximal_als(A, B, *products(W), lam, sweeps, metric=(s_in, s_out))
    want = metric_reference(A, B, W, lam, sweeps, s_in, s_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_diagonal_metric_step_matches_a_dense_reference():
    """metric='diagonal': the step is proximal_als in the metric built independently from the batch: s_in from
    the inputs' squares, s_out from δ = ∂L/∂(output of lora_B) (bias-corrected first average: the batch means),
    plus damping, to the power 0.5, towards W̄ = BA − lr·S_out^{-1} G S_in^{-1}; two steps keep it finite."""
    layer = psi_layer(zero_b=False)
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    A0, B0 = (t.detach().clone() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    G = full_grad(layer, x, y)
    with torch.no_grad():
        out = layer(x)
    delta = layer.scaling * 2 * (out - y) / out.numel()  # ∂L/∂(lora_B output) of the mean squared error
    damping, lr, lmbd = 1e-5, 0.05, 0.1
    s_in = (x.square().mean(0) + damping).sqrt()
    s_out = (delta.square().mean(0) + damping).sqrt()
    opt = PSILoRA(layer, lr=lr, lmbd=lmbd, lookahead_iters=1, metric="diagonal", damping=damping)
    step(layer, opt, x, y)
    W = B0 @ A0 - lr * G / s_out[:, None] / s_in[None, :]
    A_ref, B_ref = metric_reference(A0, B0, W, lr * lmbd, 1, s_in, s_out)
    torch.testing.assert_close(layer.lora_A["default"].weight, A_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(layer.lora_B["default"].weight, B_ref, rtol=1e-8, atol=1e-10)
    step(layer, opt, x, y)
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def lora_delta(layer, x, y):
    """δ = ∂L/∂(output of lora_B) of the mean squared error, computed from the forward by hand."""
    with torch.no_grad():
        out = layer(x)
    return layer.scaling * 2 * (out - y) / out.numel()


def test_diagonal_metric_with_momentum_matches_a_dense_reference():
    """metric='diagonal' with momentum: the second step is proximal_als towards
    W̄ = BA − lr·S_out^{-1}(G₂ + β·G₁)S_in^{-1}, the metric the bias-corrected average of both batches' squares;
    two input rows keep every G (and so the momentum) of rank 2 ≤ q = 3, where the low-rank momentum is exact."""
    layer = psi_layer(zero_b=False)
    x = torch.randn(2, 7, dtype=F64)
    ys = [torch.randn(2, 6, dtype=F64) for _ in range(2)]
    lr, lmbd, beta, mbeta, damping, K = 0.05, 1e-9, 0.8, 0.9, 1e-5, 60
    opt = PSILoRA(layer, lr=lr, lmbd=lmbd, lookahead_iters=K, momentum=beta, metric="diagonal",
                  metric_beta=mbeta, damping=damping)
    G1, d1 = full_grad(layer, x, ys[0]), lora_delta(layer, x, ys[0])
    layer.zero_grad()
    step(layer, opt, x, ys[0])
    A1, B1 = (t.detach().clone() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    G2, d2 = full_grad(layer, x, ys[1]), lora_delta(layer, x, ys[1])
    layer.zero_grad()
    step(layer, opt, x, ys[1])

    def average(first, second):  # bias-corrected running average after two steps
        return (mbeta * (1 - mbeta) * first + (1 - mbeta) * second) / (1 - mbeta**2)

    s_in = (average(x.square().mean(0), x.square().mean(0)) + damping).sqrt()
    s_out = (average(d1.square().mean(0), d2.square().mean(0)) + damping).sqrt()
    W = B1 @ A1 - lr * (G2 + beta * G1) / s_out[:, None] / s_in[None, :]
    A_ref, B_ref = metric_reference(A1, B1, W, lr * lmbd, K, s_in, s_out)
    torch.testing.assert_close(layer.lora_A["default"].weight, A_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(layer.lora_B["default"].weight, B_ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rows", [2, 16])  # N(m+n) < mn: ⟨XXᵀ, δδᵀ⟩; else δᵀX formed
def test_clipping_uses_the_full_gradient_norm(rows):
    """max_grad_norm: the step is proximal_als on c·G and AdamW on c·g_bias with
    c = max / (‖(G, g_bias)‖ + 1e-6), the norm of the dense gradient (not of the factors' gradients)."""
    layer = psi_layer(zero_b=False)
    layer.base.bias.requires_grad_(True)
    x, y = torch.randn(rows, 7, dtype=F64), torch.randn(rows, 6, dtype=F64)
    A0, B0 = (t.detach().clone() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    bias0 = layer.base.bias.detach().clone()
    G = full_grad(layer, x, y)
    g_bias = layer.base.bias.grad.clone()
    layer.zero_grad()
    norm = torch.cat([G.flatten(), g_bias]).norm()
    lr, lmbd, max_norm = 0.05, 0.1, 0.25 * float(norm)
    opt = PSILoRA(layer, lr=lr, lmbd=lmbd, adam_lr=0.01, max_grad_norm=max_norm)
    step(layer, opt, x, y)
    torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-12, atol=0)
    c = max_norm / (norm + 1e-6)
    A_ref, B_ref = proximal_als(A0, B0, *products(B0 @ A0 - lr * c * G), lr * lmbd, sweeps=1)
    torch.testing.assert_close(layer.lora_A["default"].weight, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B["default"].weight, B_ref, rtol=1e-10, atol=1e-12)
    mirror = bias0.clone().requires_grad_(True)
    mirror.grad = c * g_bias
    torch.optim.AdamW([mirror], lr=0.01, weight_decay=0.0).step()
    torch.testing.assert_close(layer.base.bias, mirror, rtol=1e-12, atol=1e-15)
    # a bound above the norm changes nothing
    a, b = psi_layer(zero_b=False), psi_layer(zero_b=False)
    step(a, PSILoRA(a, lr=lr, max_grad_norm=10 * float(norm)), x, y)
    step(b, PSILoRA(b, lr=lr), x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_records_the_same_rows(use_reentrant):
    """torch.utils.checkpoint re-runs the forward during backward (reentrant: the first forward runs without
    grad; non-reentrant: the re-run's output gets no gradient): the step equals the step without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    plain, ckpt = psi_layer(zero_b=False), psi_layer(zero_b=False)
    opt_plain, opt_ckpt = PSILoRA(plain, lr=0.05, momentum=0.5), PSILoRA(ckpt, lr=0.05, momentum=0.5)
    x_in = x.clone().requires_grad_(use_reentrant)  # the reentrant variant needs an input that requires grad
    for _ in range(2):
        step(plain, opt_plain, x, y)
        opt_ckpt.zero_grad()
        ((checkpoint(ckpt, x_in, use_reentrant=use_reentrant) - y) ** 2).mean().backward()
        opt_ckpt.step()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", [dict(lookahead_iters=2, momentum=0.5, dampening=0.5), dict(metric="diagonal")])
def test_a_bucket_of_equal_shapes_steps_each_pair_as_alone(kw):
    """Three layers, two of one shape (one batched bucket) and one of another: after two steps every pair equals
    the same steps of a model holding that layer alone with the upstream activations and downstream gradients
    fixed, i.e. the bucket's batched algebra does not mix pairs."""
    torch.manual_seed(0)
    layers = nn.Sequential(*[LoraLinear(nn.Linear(i, o, dtype=F64), 2, alpha=4.0) for i, o in ((6, 6), (6, 6), (6, 4))])
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_()
    singles = [LoraLinear(nn.Linear(i, o, dtype=F64), 2, alpha=4.0) for i, o in ((6, 6), (6, 6), (6, 4))]
    for single, layer in zip(singles, layers):
        single.load_state_dict(layer.state_dict())
    opt = PSILoRA(layers, lr=0.05, **kw)
    opts = [PSILoRA(single, lr=0.05, **kw) for single in singles]
    if kw.get("momentum"):  # the Gaussian start of V_M is seeded by the pair's index: give the singles the joint's
        for k, (single, sopt, layer) in enumerate(zip(singles, opts, layers)):
            factors = lambda m: (m.lora_A["default"].weight, m.lora_B["default"].weight)  # noqa: E731
            for mine, joint in zip(sopt._momentum_factors(*factors(single), 0, F64),
                                   opt._momentum_factors(*factors(layer), k, F64)):
                mine.copy_(joint)
    for t in range(2):
        x, y = torch.randn(8, 6, dtype=F64), torch.randn(8, 4, dtype=F64)
        opt.zero_grad()
        acts = [x]
        for layer in layers:  # record every layer's input and output gradient of the joint model
            acts.append(layer(acts[-1]))
        for a in acts[1:]:
            a.retain_grad()
        ((acts[-1] - y) ** 2).mean().backward()
        for k, (single, sopt) in enumerate(zip(singles, opts)):  # same input, same gradient at the output
            sopt.zero_grad()
            (single(acts[k].detach()) * acts[k + 1].grad).sum().backward()
            sopt.step()
        opt.step()
    for single, layer in zip(singles, layers):
        for p, q in zip(single.parameters(), layer.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_load_state_dict_refuses_a_checkpoint_that_does_not_fit():
    """A checkpoint of another LoRA rank, or of another model (other pairs), is refused with the parameter named,
    before anything changes; the matching one loads."""
    x, y = torch.randn(16, 7, dtype=F64), torch.randn(16, 6, dtype=F64)
    layer = psi_layer(zero_b=False)
    opt = PSILoRA(layer, lr=0.05, momentum=0.5, metric="diagonal")
    step(layer, opt, x, y)
    saved = opt.state_dict()
    torch.manual_seed(1)
    other_rank = LoraLinear(nn.Linear(7, 6, dtype=F64), 2, alpha=6.0)  # r = 2, the checkpoint's r = 3
    opt2 = PSILoRA(other_rank, lr=0.05, momentum=0.5, metric="diagonal")
    with pytest.raises(ValueError, match=r"'lora_A\.default\.weight' is \(2, 7\) but the checkpoint's psi_momentum "
                                         r"for it is \(3, 7\), not \(2, 7\)"):
        opt2.load_state_dict(saved)
    assert not opt2.state
    two = nn.Sequential(psi_layer(), psi_layer(seed=1))
    with pytest.raises(ValueError, match=r"LoRA pairs .* but this optimizer has"):
        PSILoRA(two, lr=0.05).load_state_dict(saved)
    with pytest.raises(ValueError, match="expected an optimizer state dict"):
        opt2.load_state_dict({"state": {}})
    fresh = PSILoRA(psi_layer(zero_b=False), lr=0.05, momentum=0.5, metric="diagonal")
    fresh.load_state_dict(saved)
    assert fresh.state_dict()["state"].keys() == saved["state"].keys()
