"""``gradient_start`` (docs/math.md (2.8), P12): the gradient-aligned start of a pair with LoRA's zero ``B``.

References are independent of sdsopt's code: the full gradient comes from autograd on a zero weight-delta leaf
(float64), its singular vectors from float64 ``torch.linalg.svd``; the step after the start is compared with
``torch.optim.AdamW`` on a copy of the model whose ``A`` was set by hand before its forward and backward.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import LoraLinear
from hypothesis import given
from hypothesis import strategies as st

from sdsopt import SDSAdamW
from sdsopt.gradient_start import aligned_rows, top_right_basis

F64 = torch.float64


def _layer(n: int, m: int, r: int, s: float, seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    return LoraLinear(n, m, r, s=s, dtype=F64)


def _batch(n: int, m: int, rows: int = 24, seed: int = 1, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -spread, n, dtype=F64)  # inputs of graded size: G's spectrum has gaps
    return torch.randn(rows, n, generator=g, dtype=F64) * scale, torch.randn(rows, m, generator=g, dtype=F64)


def _signed(V: torch.Tensor) -> torch.Tensor:
    """Rows signed so that each one's entry of largest magnitude is positive (the sign top_right_basis gives)."""
    return V * torch.stack([row[row.abs().argmax()].sign() for row in V])[:, None]


def _loss(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((layer(x) - y) ** 2).mean()


def _reference_gradient(layer: LoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``G = ∂L/∂(BA)`` by autograd on a zero leaf added to the product (what the LoRA branch multiplies)."""
    D = torch.zeros(layer.base.out_features, layer.base.in_features, dtype=F64, requires_grad=True)
    out = layer.base(x) + layer.s * x @ D.T
    ((out - y) ** 2).mean().backward()
    return D.grad  # s·(∂L/∂out)ᵀ X: the capture's G (δ at lora_B's output carries s)


def _factors(layer: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _started(layer: LoraLinear, x, y, **kw) -> SDSAdamW:
    opt = SDSAdamW(layer.named_parameters(), gradient_start=True, **kw)
    opt.attach(layer)
    opt.zero_grad()
    _loss(layer, x, y).backward()
    opt.step()
    return opt


@given(n=st.integers(3, 12), m=st.integers(3, 12), r=st.integers(1, 3), s=st.floats(0.25, 8.0),
       spread=st.floats(0.0, 2.0))
def test_start_takes_the_top_right_singular_subspace_and_keeps_the_product(n, m, r, s, spread):
    """P12: ``A``'s rows span G's top-r right singular subspace (float64 reference SVD), they are orthonormal up to
    one scale, ``‖A‖_F`` is kept, and ``BA`` stays 0 (lr = 0: only the start moves anything)."""
    r = min(r, n, m)
    layer = _layer(n, m, r, s)
    x, y = _batch(n, m, spread=spread)
    G = _reference_gradient(copy.deepcopy(layer), x, y)
    A0 = _factors(layer)[0].detach().clone()
    _started(layer, x, y, lr=0.0, mode="lora")
    A, B = _factors(layer)
    U, S, Vh = torch.linalg.svd(G)
    if r < len(S) and S[r - 1] - S[r] < 1e-6 * S[0]:
        return  # (no gap: the top-r subspace is not unique)
    c2 = (A0.norm() ** 2 / r).item()
    torch.testing.assert_close(A @ A.T, c2 * torch.eye(r, dtype=F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A.T @ A / c2, Vh[:r].T @ Vh[:r], rtol=1e-8, atol=1e-9)
    assert torch.equal(B, torch.zeros_like(B))


def test_the_step_after_the_start_is_adamw_at_the_new_A():
    """The first step is not spent on the start: it equals AdamW's step on a model whose A was set to (2.8)'s
    rows *before* its forward and backward (mode lora, LoRA+ ratio on: B steps by the recomputed G·Aᵀ)."""
    n, m, r = 10, 7, 3
    layer = _layer(n, m, r, s=2.0)
    ref = copy.deepcopy(layer)
    x, y = _batch(n, m)
    G = _reference_gradient(copy.deepcopy(layer), x, y)
    with torch.no_grad():
        _factors(ref)[0].copy_(aligned_rows(_factors(ref)[0], _signed(torch.linalg.svd(G).Vh[:r])))
    kw = dict(lr=1e-2, weight_decay=0.01)
    adamw = torch.optim.AdamW([{"params": [p for name, p in ref.named_parameters() if "lora_B" not in name]},
                               {"params": [_factors(ref)[1]], "lr": 4e-2}], **kw)
    adamw.zero_grad()
    _loss(ref, x, y).backward()
    adamw.step()
    _started(layer, x, y, mode="lora", b_lr_ratio=4.0, **kw)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert _factors(layer)[1].abs().sum() > 0


def test_start_happens_once_and_a_checkpoint_resumes_bit_for_bit():
    """Only the first step starts a pair; an optimizer loaded from a checkpoint after it does not start again,
    and continues exactly as the uninterrupted run (mode sds, coordinate steps from step one)."""
    n, m, r = 9, 6, 2
    x, y = _batch(n, m)
    runs = []
    for resume in (False, True):
        layer = _layer(n, m, r, s=1.0)
        opt = _started(layer, x, y, lr=1e-2, mode="sds", warmup_steps=0)
        after_first = _factors(layer)[0].detach().clone()
        if resume:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            opt = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="sds", warmup_steps=0, gradient_start=True)
            opt.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
            opt.attach(layer)
        for _ in range(4):
            opt.zero_grad()
            _loss(layer, x, y).backward()
            opt.step()
        A = _factors(layer)[0]
        assert not torch.allclose(A, after_first)  # Adam moved it; not re-started (which would keep ‖A‖ rows)
        runs.append([p.detach().clone() for p in layer.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_sds_with_the_start_and_no_warmup_trains_and_stays_finite():
    """P8 with the start: coordinate steps from step one on B = 0 are finite and the loss falls."""
    n, m, r = 12, 8, 3
    layer = _layer(n, m, r, s=2.0)
    x, y = _batch(n, m)
    opt = SDSAdamW(layer.named_parameters(), lr=3e-2, mode="sds", warmup_steps=0, gradient_start=True)
    opt.attach(layer)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = _loss(layer, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("given", ["named_parameters", "model"])
def test_the_optimizer_records_the_first_batch_itself_and_stops_after_the_start(given):
    """No attach(): the optimizer records the layers of the model passed (or of the live module holding the
    pairs), starts at step 1 as with an explicit attach, then removes its hooks (no recording after the start)."""
    n, m, r = 8, 6, 2
    x, y = _batch(n, m)
    ref = _layer(n, m, r, s=1.5)
    _started(ref, x, y, lr=1e-2)
    layer = _layer(n, m, r, s=1.5)
    opt = SDSAdamW(layer if given == "model" else layer.named_parameters(), gradient_start=True, lr=1e-2)
    assert opt.capture is not None
    opt.zero_grad()
    _loss(layer, x, y).backward()
    opt.step()
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.capture is None
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in layer.modules())


def test_the_start_needs_the_recorded_inputs():
    """Bare tensors held by no module: nothing to record from, and step 1 says how to fix it."""
    A = torch.randn(2, 6, dtype=F64, requires_grad=True)
    B = torch.zeros(5, 2, dtype=F64, requires_grad=True)
    opt = SDSAdamW([{"params": [A, B], "lora_pairs": [(A, B)]}], gradient_start=True, infer_names=False)
    (torch.randn(3, 5, dtype=F64) @ B @ A @ torch.randn(6, 3, dtype=F64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"opt\.attach\(model\)"):
        opt.step()


def test_warmup_steps_default_follows_gradient_start():
    layer = _layer(6, 5, 2, s=1.0)
    assert SDSAdamW(layer.named_parameters()).param_groups[0]["warmup_steps"] == 10
    assert SDSAdamW(layer.named_parameters(), gradient_start=True).param_groups[0]["warmup_steps"] == 0
    assert SDSAdamW(layer.named_parameters(), gradient_start=True,
                    warmup_steps=5).param_groups[0]["warmup_steps"] == 5


def test_eval_forwards_without_backward_record_nothing():
    layer = _layer(6, 5, 2, s=1.0)
    opt = SDSAdamW(layer.named_parameters(), mode="lora")
    capture = opt.attach(layer)
    x, y = _batch(6, 5)
    for _ in range(3):
        _loss(layer, x, y)  # (gradients on, no backward: the graph is dropped)
    A = _factors(layer)[0]
    assert not capture.has(A)
    _loss(layer, x, y).backward()
    assert len(capture.rows(A, _factors(layer)[1])) == 1


def test_a_nonzero_B_is_left_as_it_is_with_a_warning():
    torch.manual_seed(0)
    layer = LoraLinear(6, 5, 2, s=1.0, dtype=F64, zero_b=False)
    A0 = _factors(layer)[0].detach().clone()
    with pytest.warns(UserWarning, match="B is not zero"):
        _started(layer, *_batch(6, 5), lr=0.0, mode="lora")
    assert torch.equal(_factors(layer)[0], A0)


def test_bad_values_are_refused_with_the_option_name():
    layer = _layer(6, 5, 2, s=1.0)
    with pytest.raises(ValueError, match="gradient_start"):
        SDSAdamW(layer.named_parameters(), gradient_start="yes")
    with pytest.raises(ValueError, match="gradient_start"):
        SDSAdamW(layer.named_parameters(), gradient_start=True, mode="svd_oracle")


def test_pure_functions_against_closed_forms():
    """``top_right_basis`` on a matrix with known singular vectors; ``aligned_rows`` keeps ‖A‖_F (and gives rows
    of norm 3^{-1/2} for a zero A)."""
    Q1, _ = torch.linalg.qr(torch.randn(7, 7, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=F64))
    G = Q1[:, :5] @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=F64)) @ Q2.T
    V = top_right_basis(G, 2)
    torch.testing.assert_close(V.T @ V, Q2[:, :2] @ Q2[:, :2].T)
    A = torch.randn(2, 5, dtype=F64)
    torch.testing.assert_close(aligned_rows(A, V).norm(), A.norm())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(aligned_rows(torch.zeros(2, 5, dtype=F64), V).norm(dim=1),
                                   torch.full((2,), 3.0 ** -0.5, dtype=F64))


def test_the_fused_kernels_take_the_same_started_steps():
    """``fused=True`` (Triton kernels; Triton's interpreter on a CPU): the start happens before the kernels read the
    factors and gradients, so the fused route follows the torch route's trajectory (float32, 5 steps)."""
    pytest.importorskip("triton")
    from sdsopt import fused

    n, m, r = 16, 12, 4
    x, y = (t.float() for t in _batch(n, m))
    if not fused.available(x):
        pytest.skip("the fused kernels need CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
    runs = []
    for use_fused in (False, True):
        torch.manual_seed(0)
        layer = LoraLinear(n, m, r, s=2.0)
        opt = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="sds", warmup_steps=0, gradient_start=True,
                       b_lr_ratio=2.0, fused=use_fused)
        opt.attach(layer)
        for _ in range(5):
            opt.zero_grad()
            _loss(layer, x, y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in layer.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=2e-4, atol=2e-5)


def test_groups_of_checkpoints_from_before_the_option_do_not_start():
    """A checkpoint saved before ``gradient_start`` existed has groups without the key: they step as before."""
    n, m, r = 8, 6, 2
    x, y = _batch(n, m)
    layer = _layer(n, m, r, s=1.0)
    opt = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="lora")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["gradient_start"]
    resumed = SDSAdamW(layer.named_parameters(), lr=1e-2, mode="lora", gradient_start=True)
    resumed.load_state_dict(saved)
    A0 = _factors(layer)[0].detach().clone()
    resumed.zero_grad()
    _loss(layer, x, y).backward()
    resumed.step()  # no capture attached: a group that started would raise
    torch.testing.assert_close(_factors(layer)[0], A0 * (1 - 1e-2 * 1e-2))  # AdamW's decay only (gA = 0)
