"""``SDSAdamW.diagnostics()`` and ``track_step()``: the r×r formulas of sdsopt.diagnostics against dense float64
references, their invariances, and that nothing is kept or run unless asked for."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh, train

from sdsopt import SDSAdamW
from sdsopt.diagnostics import factor_statistics, step_grams, step_statistics
from sdsopt.lab.metrics import condition_number, effective_rank

F64 = torch.float64


def factors(m=12, n=9, r=3, seed=0, kappa=30.0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -math.log10(kappa), r, dtype=F64)
    A = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0].T * scale[:, None]
    B = torch.randn(m, r, generator=g, dtype=F64)
    return A, B, 0.1 * torch.randn(r, n, generator=g, dtype=F64), 0.1 * torch.randn(m, r, generator=g, dtype=F64)


def dense_share_b(A, B, A1, B1):
    dW = B1 @ A1 - B @ A
    P_B = B @ torch.linalg.pinv(B)
    P_A = torch.linalg.pinv(A) @ A
    b = (dW - P_B @ dW).norm()
    a = (dW - dW @ P_A).norm()
    return float(b / (a + b))


def stats(A, B, A1, B1):
    G_U, G_V = step_grams(A1, B1, A, B)
    return {k: float(v) for k, v in step_statistics(G_U[None], G_V[None]).items()}


def test_factor_statistics_match_dense_references():
    A, B, _, _ = factors()
    out = factor_statistics((A @ A.T)[None], (B.T @ B)[None])
    assert float(out["kappa_A"]) == pytest.approx(condition_number(A), rel=1e-9)
    assert float(out["kappa_B"]) == pytest.approx(condition_number(B), rel=1e-9)
    assert float(out["norm_ratio"]) == pytest.approx(float(B.norm() / A.norm()), rel=1e-12)
    zero = factor_statistics((A @ A.T)[None], torch.zeros(1, 3, 3, dtype=F64))
    assert math.isinf(float(zero["kappa_B"])) and float(zero["norm_ratio"]) == 0.0


def test_step_statistics_match_dense_references():
    A, B, dA, dB = factors()
    A1, B1 = A + dA, B + dB
    out = stats(A, B, A1, B1)
    dW = B1 @ A1 - B @ A
    assert out["step_effective_rank"] == pytest.approx(effective_rank(dW), rel=1e-9)
    assert out["step_relative"] == pytest.approx(float(dW.norm() / (B @ A).norm()), rel=1e-9)
    assert out["step_share_B"] == pytest.approx(dense_share_b(A, B, A1, B1), rel=1e-7)


def test_step_share_is_invariant_under_refactorisation_and_one_from_zero_b():
    A, B, dA, dB = factors(seed=1)
    A1, B1 = A + dA, B + dB
    base = stats(A, B, A1, B1)
    M = torch.tensor([[2.0, 0.3, 0.0], [0.0, 0.5, 0.1], [0.2, 0.0, 1.5]], dtype=F64)
    for A2, B2 in ((3.0 * A1, B1 / 3.0), (M @ A1, B1 @ torch.linalg.inv(M))):  # the same B'A', split otherwise
        moved = stats(A, B, A2, B2)
        for key in base:
            assert moved[key] == pytest.approx(base[key], rel=1e-7), key
    first = stats(A, torch.zeros_like(B), A, dB)  # LoRA's first step: only B moves
    assert first["step_share_B"] == pytest.approx(1.0) and math.isinf(first["step_relative"])
    only_a = stats(A, B, A1, B)  # A moves, B does not: B's side made nothing outside col(B)
    assert only_a["step_share_B"] == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(stats(A, B, A, B)["step_share_B"]) and stats(A, B, A, B)["step_effective_rank"] == 0.0


def test_diagnostics_phases_and_tracking_one_step_only():
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=2)
    first = opt.diagnostics()
    assert [r["phase"] for r in first["pairs"]] == ["warmup"] * 2
    assert [r["name"] for r in first["pairs"]] == [p.name_a for p in opt.lora_pairs]
    assert first["summary"]["pairs_warmup"] == 2.0 and math.isinf(first["summary"]["kappa_B_max"])
    assert "step_effective_rank" not in first["pairs"][0]
    train(model, opt, steps=2)
    assert "_step_tracker" not in opt.__dict__ and not opt._optimizer_step_pre_hooks  # nothing when not asked
    opt.track_step()
    before = [(A.detach().clone(), B.detach().clone()) for A, B in
              ((g["params"][ia], g["params"][ib]) for g in opt.param_groups for ia, ib in g["lora_pairs"])]
    train(model, opt, steps=1)
    report = opt.diagnostics()
    assert all(r["phase"] == "coordinates" for r in report["pairs"])
    for row, (A0, B0), pair in zip(report["pairs"], before, opt.lora_pairs):
        A, B = opt.param_groups[pair.group]["params"][pair.index_a], opt.param_groups[pair.group]["params"][pair.index_b]
        A, B = A.detach(), B.detach()
        dW = (B.double() @ A.double()) - B0.double() @ A0.double()
        assert row["step_effective_rank"] == pytest.approx(effective_rank(dW), rel=1e-6)
        assert row["kappa_A"] == pytest.approx(condition_number(A), rel=1e-6)
    assert opt.diagnostics()["summary"] == report["summary"]  # reading twice changes nothing
    train(model, opt, steps=1)  # not re-armed: the copy is dropped and the hook removed
    assert "step_share_B" not in opt.diagnostics()["pairs"][0] and not opt._optimizer_step_pre_hooks


def test_other_modes_report_their_name():
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode="scaled")
    train(model, opt, steps=1)
    assert {r["phase"] for r in opt.diagnostics()["pairs"]} == {"scaled"}
