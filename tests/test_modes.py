"""Comparison modes (docs/math.md §3) and the layer capture, against float64 references (the lab's §5 metrics:
tests/test_metrics.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from svd_reference import make_factor, truncated
from sdsopt import SDSAdamW
from sdsopt.psi import RowGradient
from sdsopt.modes.svd_oracle import svd_refactor
from conftest import LoraLinear

F64 = torch.float64


@st.composite
def pair_and_grad(draw):
    m, n = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    r = draw(st.integers(1, min(m, n)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kappa = 10 ** draw(st.floats(0, 3))
    A = make_factor(r, n, kappa, 1.0, gen)
    B = make_factor(m, r, kappa, 0.5, gen)
    return A, B, torch.randn(m, n, dtype=F64, generator=gen)


@given(pair_and_grad())
def test_svd_refactor_is_eckart_young_and_aligned(case):
    A, B, G = case
    W = B @ A - 0.1 * G
    new_a, new_b = svd_refactor(W, A, B)
    r = A.shape[0]
    torch.testing.assert_close(new_b @ new_a, truncated(W, r), rtol=1e-8, atol=1e-10)
    # balanced: equal Gram spectra; and at the current product the factors are a fixed point up to balance
    torch.testing.assert_close(torch.linalg.eigvalsh(new_a @ new_a.T), torch.linalg.eigvalsh(new_b.T @ new_b),
                               rtol=1e-7, atol=1e-10)


def build_layer(seed=0, dtype=F64):
    torch.manual_seed(seed)
    layer = LoraLinear(6, 5, 2, s=1.5, dtype=dtype, zero_b=False)
    return layer, torch.randn(12, 6, dtype=dtype), torch.randn(12, 5, dtype=dtype)


def full_gradient(layer, x, y):
    """∂L/∂(BA) by autograd on an explicit product (independent of the capture hooks)."""
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    W = (B @ A).requires_grad_()
    out = layer.base(x) + layer.s * x @ W.T
    ((out - y) ** 2).mean().backward()
    return W.grad


def test_capture_reconstructs_the_full_gradient():
    layer, x, y = build_layer()
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="svd_oracle")
    capture = opt.attach(layer)
    ((layer(x) - y) ** 2).mean().backward()
    ((layer(x[:4]) - y[:4]) ** 2).mean().backward()  # gradient accumulation: two passes summed
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    G = capture.full(A, B, F64)
    torch.testing.assert_close(G @ A.detach().T, B.grad)  # gB = G Aᵀ
    torch.testing.assert_close(B.detach().T @ G, A.grad)  # gA = Bᵀ G
    # PSILoRA's G of a bucket of pairs, never formed: this pair, and one that recorded nothing (G = 0)
    rows = RowGradient([capture.rows(A, B), []], (B.shape[0], A.shape[1]), F64, A.device)
    V = torch.randn(2, 6, 3, dtype=F64)
    torch.testing.assert_close(rows(V), torch.stack([G @ V[0], torch.zeros(5, 3, dtype=F64)]))
    torch.testing.assert_close(rows.t(torch.eye(5, dtype=F64).expand(2, 5, 5))[0], G.T)
    torch.testing.assert_close(rows.sq_norms(), torch.stack([G.square().sum(), torch.zeros((), dtype=F64)]))
    layer2, x2, y2 = build_layer()
    torch.testing.assert_close(full_gradient(layer2, x2, y2), capture_single(x2, y2))


def capture_single(x, y):
    layer, _, _ = build_layer()
    opt = SDSAdamW(layer.named_parameters(), mode="svd_oracle")
    capture = opt.attach(layer)
    ((layer(x) - y) ** 2).mean().backward()
    return capture.full(layer.lora_A["default"].weight, layer.lora_B["default"].weight, F64)


def test_optimizer_svd_oracle_is_truncated_full_step():
    layer, x, y = build_layer()
    A0, B0 = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
    lr, eps, wd = 1e-2, 1e-8, 0.1
    opt = SDSAdamW(layer.named_parameters(), lr=lr, eps=eps, weight_decay=wd, mode="svd_oracle")
    opt.attach(layer)
    ((layer(x) - y) ** 2).mean().backward()
    opt.step()
    layer_ref, x_ref, y_ref = build_layer()
    G = full_gradient(layer_ref, x_ref, y_ref)
    full_step = B0 @ A0 * (1 - lr * wd) - lr * G / (G.abs() + eps)
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    torch.testing.assert_close(B @ A, truncated(full_step, 2), rtol=1e-9, atol=1e-12)
    assert opt.state[layer.lora_A["default"].weight]["oracle_exp_avg"].shape == (5, 6)


def test_modes_that_need_the_layers_refuse_without_attach_or_above_size_limit():
    layer, x, y = build_layer()
    opt = SDSAdamW(layer.named_parameters(), mode="svd_oracle")
    ((layer(x) - y) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match=r"call opt.attach\(model\)"):
        opt.step()
    opt = SDSAdamW(layer.named_parameters(), mode="svd_oracle", oracle_max_numel=20)
    opt.attach(layer)
    ((layer(x) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match="oracle_max_numel=20"):
        opt.step()
    with pytest.raises(ValueError, match="decouple_sigma=True works with modes"):
        SDSAdamW(layer.named_parameters(), mode="svd_oracle", decouple_sigma=True)


@pytest.mark.parametrize("kw", [dict(mode="lora"), dict(mode="sds", warmup_steps=2, coordinate_ramp=3),
                                dict(mode="sds_polar", decouple_sigma=True, amsgrad=True), dict(mode="scaled"),
                                dict(mode="svd_oracle")])
def test_each_mode_object_declares_the_state_it_keeps(kw):
    """The mode objects' interface: every mode of SDSAdamW has one, and the state the optimizer holds is
    AdamW's plus exactly the keys the mode declares (``Mode.state_keys``), nothing undeclared; the registry
    names each class as the user names the mode."""
    from sdsopt.modes import MODE_CLASSES, MODES

    assert tuple(MODE_CLASSES) == MODES and all(cls.name == name for name, cls in MODE_CLASSES.items())
    torch.manual_seed(0)
    layer = LoraLinear(8, 6, 3, dtype=F64, zero_b=False)
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, **kw)
    if kw["mode"] == "svd_oracle":
        opt.attach(layer)
    x, y = torch.randn(16, 8, dtype=F64), torch.randn(16, 6, dtype=F64)
    for _ in range(4):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
    keys = {k for s in opt.state.values() for k in s}
    declared = set(MODE_CLASSES[kw["mode"]].state_keys)
    assert keys - {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= declared
    assert all(torch.isfinite(p).all() for p in layer.parameters())


@pytest.mark.parametrize("kw", [dict(mode="scaled", weight_decay=0.1),
                                dict(mode="sds_polar", decouple_sigma=True, amsgrad=True)])
def test_preconditioned_modes_step_the_same_in_chunks(kw, monkeypatch):
    """The preconditioned modes' torch path stacks a bucket in chunks of bounded bytes
    (:func:`sdsopt.buckets.chunks`); one pair per chunk steps as the whole bucket at once (float64, 1e-12, 5
    steps of a 3-pair bucket and a pair of another shape, the singular-value channel on or off)."""
    from sdsopt import buckets
    from sdsopt.modes import precondition

    def steps():
        torch.manual_seed(3)
        layers = torch.nn.ModuleList([LoraLinear(9, 7, 3, dtype=F64, zero_b=False) for _ in range(3)]
                                     + [LoraLinear(5, 8, 2, dtype=F64, zero_b=False)])
        opt = SDSAdamW(layers.named_parameters(), lr=1e-2, **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in layers.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            opt.step()
        return [p.detach().clone() for p in layers.parameters()]

    whole = steps()
    monkeypatch.setattr(buckets, "STACK_CHUNK_BYTES", 1)
    sizes = []
    monkeypatch.setattr(precondition, "chunks",
                        lambda *a: sizes.append([len(c.a) for c in buckets.chunks(*a)]) or buckets.chunks(*a))
    chunked = steps()
    assert [1, 1, 1] in sizes
    assert max((a - b).abs().max().item() for a, b in zip(whole, chunked)) <= 1e-12
