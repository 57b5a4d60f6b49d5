"""The peers of docs/math.md §7 against independent float64 references: LoRA-Pro's adjusted gradients (7.1)–(7.2),
the re-factorisation invariance (7.3) of LoRA-RITE and of ``sds``, LoRA+'s groups, PEFT's Riemannian optimizer
against mode ``scaled``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LoraLinear, fresh, make_data, train
from hypothesis import given
from hypothesis import strategies as st

from sdsopt import SDSAdamW
from sdsopt.coordinates import resplit_maps
from sdsopt.linalg import gram
from sdsopt.modes.lorapro import adjusted_gradients
from sdsopt.lab.peers import loraplus, make_peer, peft_riemannian, rite

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")

F64 = torch.float64


def _pair(m, n, r, seed, cond=1.0, b_rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=F64)
    A = torch.diag(torch.logspace(0, -cond, r, dtype=F64)) @ A  # κ(A) ≈ 10^cond
    B = torch.randn(m, r, generator=g, dtype=F64)
    if b_rank is not None:  # rank-deficient B (B = 0 for b_rank = 0)
        B[:, b_rank:] = 0.0
    G = torch.randn(m, n, generator=g, dtype=F64)
    return A, B, G


@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 10**6),
       cond=st.floats(0.0, 3.0), s=st.floats(0.1, 4.0), b_rank=st.one_of(st.none(), st.integers(0, 3)))
def test_lorapro_step_is_the_tangent_projection_and_least_norm(m, n, r, seed, cond, s, b_rank):
    """(7.1): ``s·(B g̃A + g̃B A) = s²·(P_B G + (I − P_B) G P_A)`` (the paper's ``1/s²`` taken out), and (7.2)'s
    ``X`` is the least-norm choice: against a least-squares solve over all r×r ``X``, in float64."""
    r = min(r, m, n)
    A, B, G = _pair(m, n, r, seed, cond, None if b_rank is None else min(b_rank, r))
    gA, gB = s * B.T @ G, s * G @ A.T
    ga, gb = (t[0] for t in adjusted_gradients(A[None], B[None], gA[None], gB[None], 1e-13))
    P_B, P_A = B @ torch.linalg.pinv(B, rtol=1e-10), torch.linalg.pinv(A, rtol=1e-10) @ A
    tangent = P_B @ G + (torch.eye(m, dtype=F64) - P_B) @ G @ P_A
    scale = G.norm()
    assert torch.allclose(s * (B @ ga + gb @ A) / s**2, tangent, atol=1e-6 * scale)
    # the reference: X free in g̃A = F_A + X A, g̃B = F_B − B X; minimise the sum of squares by least squares
    lin = []
    for i in range(r * r):
        E = torch.zeros(r * r, dtype=F64)
        E[i] = 1.0
        E = E.view(r, r)
        lin.append(torch.cat([(E @ A).flatten(), (-B @ E).flatten()]))
    M = torch.stack(lin, 1)
    K_Bp = torch.linalg.pinv(B.T @ B, rtol=1e-10, hermitian=True)
    F_A = K_Bp @ gA
    F_B = (torch.eye(m, dtype=F64) - P_B) @ gB @ torch.linalg.pinv(A @ A.T, rtol=1e-10, hermitian=True)
    f = torch.cat([F_A.flatten(), F_B.flatten()])
    x = torch.linalg.lstsq(M, -f, rcond=None).solution
    best = f + M @ x
    ours = torch.cat([ga.flatten(), gb.flatten()])
    assert ours.norm() <= best.norm() * (1 + 1e-6) + 1e-8 * scale


def test_lorapro_from_b_zero_is_the_papers_first_step():
    """LoRA's ``B = 0``: ``g̃A = 0`` and ``g̃B = gB·(K_A + δI)^{-1}``, finite."""
    A, _, G = _pair(6, 5, 3, 1)
    B = torch.zeros(6, 3, dtype=F64)
    gA, gB = B.T @ G, G @ A.T
    ga, gb = (t[0] for t in adjusted_gradients(A[None], B[None], gA[None], gB[None], 1e-6))
    assert torch.equal(ga, torch.zeros_like(ga))
    assert torch.allclose(gb, gB @ torch.linalg.inv(A @ A.T + 1e-6 * torch.eye(3, dtype=F64)), atol=1e-12)


def test_lorapro_mode_is_adamw_on_the_adjusted_gradients():
    """One ``SDSAdamW(mode='lorapro')`` step equals torch AdamW fed (7.1)'s gradients (float64), and the model
    trains from LoRA's zero ``B`` in float32 and bfloat16 without a non-finite value."""
    torch.manual_seed(0)
    layer = LoraLinear(5, 6, 3, dtype=F64, zero_b=False)
    x, y = torch.randn(16, 5, dtype=F64), torch.randn(16, 6, dtype=F64)
    ref = copy.deepcopy(layer)
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="lorapro", weight_decay=0.1)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for model in (layer, ref):
        ((model(x) - y) ** 2).mean().backward()
    A, B = ref.lora_A["default"].weight, ref.lora_B["default"].weight
    ga, gb = adjusted_gradients(A.detach()[None], B.detach()[None], A.grad[None], B.grad[None], 1e-6)
    A.grad, B.grad = ga[0].clone(), gb[0].clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(layer.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    for dtype in (torch.float32, torch.bfloat16):
        model = fresh(dtype=dtype)
        losses = train(model, SDSAdamW(model.named_parameters(), lr=1e-2, mode="lorapro"), steps=8, dtype=dtype)
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- (7.3): re-factorisation invariance
def _layer_pair(S, seed=0):
    """Two layers with ``BA`` equal: ``(A, B)`` and ``(S⁻¹A, BS)``, in float64, and a regression problem."""
    torch.manual_seed(seed)
    one = LoraLinear(7, 6, 3, dtype=F64, zero_b=False)
    two = copy.deepcopy(one)
    with torch.no_grad():
        two.lora_A["default"].weight.copy_(torch.linalg.solve(S, one.lora_A["default"].weight))
        two.lora_B["default"].weight.copy_(one.lora_B["default"].weight @ S)
    x, y = torch.randn(64, 7, dtype=F64), torch.randn(64, 6, dtype=F64)
    return one, two, x, y


def _product_gap(make_opt, S, steps=6):
    """max |B₁A₁ − B₂A₂| after ``steps`` steps of the two factorisations, relative to ``|BA|``."""
    one, two, x, y = _layer_pair(S)
    for layer in (one, two):
        opt = make_opt(layer)
        for _ in range(steps):
            opt.zero_grad()
            ((layer(x) - y) ** 2).mean().backward()
            opt.step()
    W1, W2 = (lay.lora_B["default"].weight @ lay.lora_A["default"].weight for lay in (one, two))
    return float(((W1 - W2).abs().max() / W1.abs().max()).detach())


GENERAL = torch.tensor([[1.3, 0.4, -0.2], [0.1, 0.7, 0.5], [-0.3, 0.2, 1.8]], dtype=F64)
DIAGONAL = torch.diag(torch.tensor([3.0, -0.25, 1.7], dtype=F64))


def _only_pairs(layer):
    return [(n, p) for n, p in layer.named_parameters() if "lora" in n]


def test_rite_is_invariant_to_every_refactorisation_adamw_is_not():
    """(7.3): LoRA-RITE's ``BA`` after 6 steps is the same for ``(A, B)`` and ``(S⁻¹A, BS)``, general ``S``
    (float64); AdamW's is not."""
    pytest.importorskip("pytorch_optimizer")
    rite_opt = lambda layer: rite(layer, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)  # noqa: E731
    adamw = lambda layer: torch.optim.AdamW([p for n, p in _only_pairs(layer)], lr=1e-2)  # noqa: E731
    assert _product_gap(rite_opt, GENERAL) < 1e-9
    assert _product_gap(adamw, GENERAL) > 1e-3


def test_sds_is_invariant_to_diagonal_refactorisations_only():
    """(7.3) for ``sds`` in coordinates from step one (``warmup_steps=0``, no re-split, ``step_damping=0``):
    diagonal ``S`` (signs included) leaves ``BA``'s trajectory unchanged to ``O(τ)``; a general ``S`` does not.
    A re-split (2.4) maps both factorisations to the same factors."""
    sds = lambda layer: SDSAdamW(_only_pairs(layer), lr=1e-2, warmup_steps=0, step_damping=0.0)  # noqa: E731
    assert _product_gap(sds, DIAGONAL) < 1e-9
    assert _product_gap(sds, GENERAL) > 1e-4
    one, two, _, _ = _layer_pair(GENERAL)
    split = []
    for layer in (one, two):
        A, B = layer.lora_A["default"].weight.detach()[None], layer.lora_B["default"].weight.detach()[None]
        M_A, M_B = resplit_maps(gram(A), gram(B.mT), 1e-13)
        split.append((M_A @ A, B @ M_B))
    assert torch.allclose(split[0][0], split[1][0], atol=1e-10) and torch.allclose(split[0][1], split[1][1], atol=1e-10)


# ---------------------------------------------------------------- LoRA+ and PEFT's Riemannian optimizer
def test_loraplus_groups_match_pefts():
    """LoRA+: the ``B`` factors (sdsopt's pairing) and 1-D parameters at ``λ·lr``, everything else at ``lr``, as
    PEFT's ``create_loraplus_optimizer`` groups them; ``loraplus<λ>`` reads λ from the name."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"], modules_to_save=["2"]))
    ours = loraplus(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, ratio=16.0)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)

    def by_lr(opt):
        out: dict[float, set[int]] = {}
        for g in opt.param_groups:
            out.setdefault(round(g["lr"], 12), set()).update(id(p) for p in g["params"])
        return out

    assert by_lr(ours) == {k: v for k, v in by_lr(theirs).items() if v}
    assert make_peer("loraplus4", model, 1e-3, (0.9, 0.999), 0.0).param_groups[1]["lr"] == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="ratio"):
        loraplus(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, ratio=0.0)


def test_peft_riemannian_equals_mode_scaled():
    """PEFT's ``create_riemannian_optimizer`` (on sdsopt's pairs) and ``SDSAdamW(mode='scaled', damping=reg)``
    take the same steps (float64, 5 steps, non-pair parameters included)."""
    pytest.importorskip("peft.optimizers.riemannian")
    one = fresh(dtype=F64, zero_b=False)
    two = copy.deepcopy(one)
    data = make_data(dtype=F64)
    train(one, peft_riemannian(one, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, reg=1e-2), steps=5, data=data)
    train(two, SDSAdamW(two.named_parameters(), lr=1e-2, mode="scaled", damping=1e-2, weight_decay=0.1),
          steps=5, data=data)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("peer", ["rite", "loraplus", "peft_riemannian"])
def test_peer_checkpoints_resume_bit_exactly(peer):
    """A peer saved after 3 steps and loaded into a fresh optimizer continues exactly as the uninterrupted run."""
    if peer == "rite":
        pytest.importorskip("pytorch_optimizer")
    if peer == "peft_riemannian":
        pytest.importorskip("peft.optimizers.riemannian")
    data = make_data()
    one = fresh(zero_b=False)
    opt = make_peer(peer, one, 1e-2, (0.9, 0.999), 0.0)
    train(one, opt, steps=3, data=data)
    saved_model, saved_opt = copy.deepcopy(one.state_dict()), copy.deepcopy(opt.state_dict())
    train(one, opt, steps=3, data=data)
    two = fresh(seed=1, zero_b=False)
    two.load_state_dict(saved_model)
    opt2 = make_peer(peer, two, 1e-2, (0.9, 0.999), 0.0)
    opt2.load_state_dict(saved_opt)
    train(two, opt2, steps=3, data=data)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)
    fresh_start = fresh(seed=1, zero_b=False)  # without the state the steps differ (the test can fail)
    fresh_start.load_state_dict(saved_model)
    train(fresh_start, make_peer(peer, fresh_start, 1e-2, (0.9, 0.999), 0.0), steps=3, data=data)
    assert not all(torch.equal(p, q) for p, q in zip(one.parameters(), fresh_start.parameters()))


def test_rite_trains_the_other_parameters_with_adamw_and_refuses_conv_and_bf16_pairs():
    pytest.importorskip("pytorch_optimizer")
    model = fresh()
    extra = model.extra.detach().clone()
    opt = make_peer("rite", model, 1e-2, (0.9, 0.999), 0.0)
    losses = train(model, opt, steps=5)
    assert losses[-1] < losses[0] and not torch.equal(model.extra, extra)
    opt.load_state_dict(opt.state_dict())
    conv = torch.nn.Module()
    conv.lora_A = torch.nn.Parameter(torch.randn(2, 3, 3, 3))
    conv.lora_B = torch.nn.Parameter(torch.zeros(4, 2, 1, 1))
    with pytest.raises(ValueError, match="Conv"):
        rite(conv, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    with pytest.raises(ValueError, match="float32/float64"):
        rite(fresh(dtype=torch.bfloat16), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    with pytest.raises(ValueError, match="unknown peer"):
        make_peer("rite2", model, 1e-3, (0.9, 0.999), 0.0)
