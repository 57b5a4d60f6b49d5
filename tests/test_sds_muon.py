"""Mode ``sds_muon`` (docs/math.md §8, P13): against an independent float64 SVD/QR reference over several steps,
the invariance (8.5) under every invertible re-factorisation, the spectral size of each path's step (8.4), the zero
``B`` start, bf16 factors, exact resume, non-finite gradients and its option checks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fresh, make_data, train
from hypothesis import given
from hypothesis import strategies as st
from svd_reference import make_factor, sds_muon_reference
from torch import nn

from sdsopt import SDSAdamW
from sdsopt.muon import msign

EXACT = dict(mode="sds_muon", step_damping=0.0, rebalance=False, weight_decay=0.0, linalg_dtype=torch.float64)


class Product(nn.Module):
    """One LoRA pair as the model: ``W = s·B·A``, loss ``½‖W − T‖²`` (so ``G = W − T``)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, s: float):
        super().__init__()
        self.lora_A = nn.Parameter(A.clone())
        self.lora_B = nn.Parameter(B.clone())
        self.s = s

    def loss(self, T: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.s * self.lora_B @ self.lora_A - T) ** 2).sum()


def run(model: Product, T: torch.Tensor, steps: int, **kw) -> list[torch.Tensor]:
    opt = SDSAdamW(model.named_parameters(), **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        model.loss(T).backward()
        opt.step()
        out.append(model.s * model.lora_B.detach() @ model.lora_A.detach())
    return out


def problem(m: int, n: int, r: int, kappa: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    A = make_factor(r, n, kappa, 1.0, gen)
    B = make_factor(m, r, kappa, 0.5, gen)
    T = torch.randn(m, n, dtype=torch.float64, generator=gen)
    return A, B, T


@pytest.mark.parametrize("shape", [(7, 5, 3), (4, 9, 2), (6, 6, 4)])
def test_matches_the_svd_reference_over_steps(shape):
    m, n, r = shape
    A, B, T = problem(m, n, r, 20.0, seed=1)
    s, lr, beta, ratio = 2.0, 0.05, 0.9, 3.0
    model = Product(A, B, s)
    opt = SDSAdamW(model.named_parameters(), lr=lr, betas=(beta, 0.999), b_lr_ratio=ratio, **EXACT)
    ref = sds_muon_reference(A, B, lambda W: W - T, s, lr, beta, ratio, steps=4)
    for A_ref, B_ref in ref:
        opt.zero_grad()
        model.loss(T).backward()
        opt.step()
        torch.testing.assert_close(model.lora_A.detach(), A_ref, rtol=1e-5, atol=1e-6)  # δ of (8.3)
        torch.testing.assert_close(model.lora_B.detach(), B_ref, rtol=1e-5, atol=1e-6)


@given(m=st.integers(2, 10), n=st.integers(2, 10), r=st.integers(1, 6), kappa=st.floats(1.0, 10.0),
       s_kappa=st.floats(1.0, 10.0), ratio=st.sampled_from([1.0, 4.0]), wd=st.sampled_from([0.0, 0.1]),
       rebalance=st.booleans(), seed=st.integers(0, 2**16))
def test_ba_trajectory_is_invariant_under_refactorisation(m, n, r, kappa, s_kappa, ratio, wd, rebalance, seed):
    """(8.5): (S⁻¹A, BS) for a random invertible S takes (A, B)'s BA trajectory (not so for sds, (7.3)), here
    with ``step_damping=0`` (exact coordinates): at larger lrs a square factor (r = m) that a step takes near
    singular makes ``R^{-1}`` amplify rounding, and the two runs part although both are exact to rounding."""
    r = min(r, m, n)
    A, B, T = problem(m, n, r, kappa, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    S = make_factor(r, r, s_kappa, 1.0, gen) @ torch.linalg.qr(torch.randn(r, r, dtype=torch.float64,
                                                                             generator=gen))[0]
    kw = dict(EXACT, lr=0.01, b_lr_ratio=ratio, weight_decay=wd, rebalance=rebalance)
    plain = run(Product(A, B, 1.5), T, 5, **kw)
    moved = run(Product(torch.linalg.solve(S, A), B @ S, 1.5), T, 5, **kw)
    for W, W_moved in zip(plain, moved):
        torch.testing.assert_close(W_moved, W, rtol=1e-5, atol=1e-6)  # O(τ·κ²), τ = 1e-13


def test_sds_is_not_invariant_where_sds_muon_is():
    """The contrast of (7.3): the same non-diagonal S moves mode sds's trajectory."""
    A, B, T = problem(6, 5, 3, 10.0, seed=3)
    S = torch.tensor([[1.0, 0.7, 0.0], [0.3, 1.0, 0.2], [0.0, -0.5, 1.0]], dtype=torch.float64)
    kw = dict(lr=0.03, step_damping=0.0, rebalance=False, weight_decay=0.0, warmup_steps=0)
    plain = run(Product(A, B, 1.0), T, 5, mode="sds", **kw)
    moved = run(Product(torch.linalg.solve(S, A), B @ S, 1.0), T, 5, mode="sds", **kw)
    assert (plain[-1] - moved[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("ratio", [1.0, 8.0])
def test_each_path_takes_a_spectral_step_of_lr_sqrt_m_over_n(ratio):
    """(8.4): from a fresh state, ‖s·B·ΔA‖_op = s·lr·√(m/n) and ‖s·ΔB·A‖_op = s·λ·lr·√(m/n)."""
    m, n, r, s, lr = 12, 5, 3, 2.0, 1e-3
    A, B, T = problem(m, n, r, 5.0, seed=4)
    model = Product(A, B, s)
    run(model, T, 1, lr=lr, b_lr_ratio=ratio, **{k: v for k, v in EXACT.items() if k != "weight_decay"},
        weight_decay=0.0)
    dA, dB = model.lora_A.detach() - A, model.lora_B.detach() - B
    size = s * lr * (m / n) ** 0.5
    assert torch.linalg.matrix_norm(s * B @ dA, ord=2).item() == pytest.approx(size, rel=1e-6)
    assert torch.linalg.matrix_norm(s * dB @ A, ord=2).item() == pytest.approx(ratio * size, rel=1e-6)


def test_zero_b_gives_a_still_a_and_a_finite_start():
    """B = 0 (PEFT's init): gA = 0, so A does not move at the first step (no amplified noise); B does, and
    training goes on finite."""
    model = fresh()
    A0 = model.l1.lora_A["default"].weight.detach().clone()
    opt = SDSAdamW(model.named_parameters(), lr=0.05, mode="sds_muon", weight_decay=0.0)
    assert opt.param_groups[0]["warmup_steps"] == 0
    losses = train(model, opt, steps=1)
    assert torch.equal(model.l1.lora_A["default"].weight.detach(), A0)
    assert model.l1.lora_B["default"].weight.detach().abs().max() > 0
    losses += train(model, opt, steps=30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_msign_of_zero_is_zero_and_of_a_full_rank_matrix_is_its_polar_factor():
    Y = torch.zeros(2, 3, 7, dtype=torch.float64)
    assert torch.equal(msign(Y, Y @ Y.mT, 1e-11), Y)
    Y = torch.randn(2, 3, 7, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(Y, full_matrices=False)
    torch.testing.assert_close(msign(Y, Y @ Y.mT, 1e-11), U @ Vh, rtol=0, atol=1e-6)  # δ = 1e-8


def test_bf16_factors_step_with_float32_algebra():
    ref = fresh(zero_b=False)
    low = fresh(zero_b=False).to(torch.bfloat16)
    out_ref = train(ref, SDSAdamW(ref.named_parameters(), lr=0.02, mode="sds_muon"), steps=10)
    out_low = train(low, SDSAdamW(low.named_parameters(), lr=0.02, mode="sds_muon"), steps=10,
                    dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in low.parameters())
    assert out_low[-1] == pytest.approx(out_ref[-1], rel=0.05)


def test_checkpoint_resumes_bit_exactly():
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=0.02, mode="sds_muon", b_lr_ratio=4.0)
    train(model, opt, steps=3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"exp_avg", "muon_prev"} <= set(opt.state[model.l1.lora_A["default"].weight])
    train(model, opt, steps=4)
    again = fresh()
    again.load_state_dict(saved_model)
    opt2 = SDSAdamW(again.named_parameters(), lr=0.02, mode="sds_muon", b_lr_ratio=4.0)
    opt2.load_state_dict(saved_opt)
    train(again, opt2, steps=4)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_gradients_pass_as_in_adamw_and_skip_under_the_guard():
    x, y = make_data()
    for guard in (False, True):
        model = fresh(zero_b=False)
        opt = SDSAdamW(model.named_parameters(), lr=0.02, mode="sds_muon", skip_nonfinite=guard)
        train(model, opt, steps=2, data=(x, y))
        before = [p.detach().clone() for p in model.parameters()]
        prev = opt.state[model.l1.lora_B["default"].weight]["muon_prev"].clone()
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        model.l1.lora_B["default"].weight.grad[0, 0] = float("nan")
        if guard:
            with pytest.warns(RuntimeWarning, match="skipped a step"):
                opt.step()
        else:
            opt.step()
        B = model.l1.lora_B["default"].weight.detach()
        if guard:
            assert opt.skipped_steps == 1
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            assert torch.equal(opt.state[model.l1.lora_B["default"].weight]["muon_prev"], prev)
        else:
            assert torch.isnan(B).any()
            assert torch.isfinite(model.l2.lora_B["default"].weight).all()  # other pairs are untouched


def test_finite_input_never_gives_nonfinite_steps():
    """Huge but finite gradients (a Gram that overflows float32) give a zero step, not Inf."""
    model = fresh(zero_b=False)
    opt = SDSAdamW(model.named_parameters(), lr=0.02, mode="sds_muon")
    x, y = make_data()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    for p in model.parameters():
        p.grad.mul_(1e25)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("option, value, words", [
    ("warmup_steps", 5, "warmup_steps=0"),
    ("amsgrad", True, "amsgrad=False"),
])
def test_options_that_do_not_apply_are_refused_with_the_fix(option, value, words):
    with pytest.raises(ValueError, match=words):
        SDSAdamW(fresh().named_parameters(), mode="sds_muon", **{option: value})


def test_diagnostics_report_the_mode_and_the_rebalanced_norms():
    """opt.diagnostics() names the mode as the phase; the re-balance (on by default, from each step's Grams)
    keeps ‖B‖/‖A‖ near 1, where without it B, started at 0, stays far smaller than A."""
    ratios = {}
    for rebalance in (True, False):
        model = fresh()
        opt = SDSAdamW(model.named_parameters(), lr=0.02, mode="sds_muon", rebalance=rebalance)
        train(model, opt, steps=3)
        pairs = opt.diagnostics()["pairs"]
        assert {p["phase"] for p in pairs} == {"sds_muon"}
        ratios[rebalance] = [p["norm_ratio"] for p in pairs]
    assert all(0.8 < r < 1.25 for r in ratios[True]) and all(r < 0.3 for r in ratios[False])
