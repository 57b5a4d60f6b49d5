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
from conftest import LoraLinear, Net, make_data
from hypothesis import given
from hypothesis import strategies as st

from sdsopt import SDSAdamW
from sdsopt.gradient_start import POWER_STEPS, aligned_rows, start_pairs, top_right_basis, waiting_pairs

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
    """P12: ``A``'s rows span G's top-r right singular subspace (float64 reference SVD; to 1e-9 where
    top_right_basis's block covers min(m, n), else within its documented error ``(σ_{k+1}/σ_r)^{2·POWER_STEPS}``
    over the gap), they are orthonormal up to one scale, ``‖A‖_F`` is kept, and ``BA`` stays 0 (lr = 0: only the
    start moves anything)."""
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
    k = min(max(2 * r, r + 8), m, n)
    eps = (S[k] / S[r - 1]).item() ** (2 * POWER_STEPS) if k < len(S) else 0.0
    over_gap = (S[r - 1] ** 2 / (S[r - 1] ** 2 - S[r] ** 2)).item() if r < len(S) else 1.0
    torch.testing.assert_close(A @ A.T, c2 * torch.eye(r, dtype=F64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A.T @ A / c2, Vh[:r].T @ Vh[:r], rtol=1e-8, atol=1e-9 + 100 * eps * over_gap)
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


def _hooks(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks left on ``model``'s modules."""
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


def _svd_start(A0: torch.Tensor, G: torch.Tensor, r: int) -> torch.Tensor:
    """(2.8)'s ``A`` from the float64 reference SVD of ``G`` (rows signed as :func:`top_right_basis` signs them)."""
    return aligned_rows(A0, _signed(torch.linalg.svd(G).Vh[:r]))


@pytest.mark.parametrize("given", ["named_parameters", "parameters", "model"])
def test_the_optimizer_records_the_first_batch_itself_and_stops_after_the_start(given):
    """No attach(): the optimizer records the layers of the model passed (or of the live module holding the
    pairs, named or not), starts at step 1 as with an explicit attach, then removes its hooks (no recording after
    the start)."""
    n, m, r = 8, 6, 2
    x, y = _batch(n, m)
    ref = _layer(n, m, r, s=1.5)
    _started(ref, x, y, lr=1e-2)
    layer = _layer(n, m, r, s=1.5)
    params = {"named_parameters": layer.named_parameters(), "parameters": layer.parameters(), "model": layer}[given]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the PairingNotice of unnamed parameters)
        opt = SDSAdamW(params, gradient_start=True, lr=1e-2)
    assert opt.capture is not None and _hooks(layer) == 2  # lora_A's pre-hook, lora_B's hook
    opt.zero_grad()
    _loss(layer, x, y).backward()
    opt.step()
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.capture is None and _hooks(layer) == 0


def test_the_start_needs_the_recorded_inputs():
    """Bare tensors held by no module: nothing to record from, and step 1 says how to fix it, naming the pair."""
    A = torch.randn(2, 6, dtype=F64, requires_grad=True)
    B = torch.zeros(5, 2, dtype=F64, requires_grad=True)
    opt = SDSAdamW([{"params": [A, B], "lora_pairs": [(A, B)]}], gradient_start=True, infer_names=False)
    assert opt.capture is None
    (torch.randn(3, 5, dtype=F64) @ B @ A @ torch.randn(6, 3, dtype=F64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"params\[0\].*SDSAdamW\(model, \.\.\.\).*opt\.attach\(model\)"):
        opt.step()


def test_pairs_held_outside_linear_layers_are_refused_when_built():
    """A module holds the factors, but not as ``nn.Linear`` weights: the recording cannot hook them, and the
    construction says so, naming ``gradient_start``."""

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(torch.randn(2, 6, dtype=F64))
            self.B = torch.nn.Parameter(torch.zeros(5, 2, dtype=F64))

    model = Bare()
    with pytest.raises(ValueError, match=r"gradient_start.*Linear LoRA only"):
        SDSAdamW([{"params": [model.A, model.B], "lora_pairs": [(model.A, model.B)]}], gradient_start=True)


def _train_step(opt: SDSAdamW, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


def test_the_recording_stops_by_itself_after_the_first_step():
    """Two layers: after step 1 no hook is left on any module, and the following steps train without one."""
    model = Net(dtype=F64)
    x, y = make_data(dtype=F64)
    opt = SDSAdamW(model.named_parameters(), gradient_start=True, lr=1e-2)
    assert _hooks(model) == 4
    _train_step(opt, model, x, y)
    assert opt.capture is None and _hooks(model) == 0
    _train_step(opt, model, x, y)
    assert opt.capture is None and all(torch.isfinite(p).all() for p in model.parameters())


def test_the_recording_goes_on_with_keep_and_for_svd_oracle():
    """``attach(model, keep=True)`` (metrics), and a group in mode ``svd_oracle`` beside a gradient-started one
    (the optimizer's own recording), keep the hooks after the start, and the next batch is recorded."""
    x, y = make_data(dtype=F64)

    def kept(model: Net) -> SDSAdamW:
        opt = SDSAdamW(model.named_parameters(), gradient_start=True, lr=1e-2)
        opt.attach(model, keep=True)
        return opt

    def oracle(model: Net) -> SDSAdamW:
        l1 = [p for name, p in model.named_parameters() if name.startswith("l1.")]
        rest = [p for name, p in model.named_parameters() if not name.startswith("l1.")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the PairingNotice of unnamed parameters)
            return SDSAdamW([{"params": l1, "mode": "svd_oracle"}, {"params": rest, "gradient_start": True}],
                            mode="lora", lr=1e-2)

    for build in (kept, oracle):
        model = Net(dtype=F64)
        opt = build(model)
        capture = opt.capture
        for _ in range(2):
            _train_step(opt, model, x, y)
            assert opt.capture is capture and _hooks(model) == 4
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        assert capture.has(model.l1.lora_A["default"].weight) and capture.has(model.l2.lora_A["default"].weight)
        capture.remove()
        assert _hooks(model) == 0


def test_warmup_steps_default_follows_gradient_start():
    """``warmup_steps=None`` (default): 0 with ``gradient_start``, 10 (mode sds's warm-up) without; an explicit value
    is kept; a param group with its own ``gradient_start`` resolves its own."""
    model = Net(dtype=F64)
    named = list(model.named_parameters())

    def warmups(groups=named, **kw) -> list[int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the PairingNotice of unnamed parameters)
            return [g["warmup_steps"] for g in SDSAdamW(groups, mode="sds", **kw).param_groups]

    assert warmups() == [10] and warmups(gradient_start=True) == [0]
    assert warmups(gradient_start=True, warmup_steps=5) == [5] and warmups(warmup_steps=0) == [0]
    l1 = [p for name, p in named if name.startswith("l1.")]
    rest = [p for name, p in named if not name.startswith("l1.")]
    assert warmups([{"params": l1, "gradient_start": True}, {"params": rest}]) == [0, 10]
    assert warmups([{"params": l1, "gradient_start": False}, {"params": rest, "warmup_steps": 4}],
                   gradient_start=True) == [10, 4]
    assert SDSAdamW(named).defaults["warmup_steps"] is None  # (a group added later resolves its own)


def test_eval_forwards_without_backward_record_nothing():
    """Forwards with gradients on but no backward (an evaluation without ``no_grad``) leave nothing behind; a
    forward and backward leaves exactly one ``(X, δ)``, and ``δᵀX`` is autograd's ``G``."""
    layer = _layer(6, 5, 2, s=1.0)
    opt = SDSAdamW(layer.named_parameters(), mode="lora")
    capture = opt.attach(layer)
    x, y = _batch(6, 5)
    G = _reference_gradient(copy.deepcopy(layer), x, y)
    for _ in range(3):
        _loss(layer, x, y)  # (gradients on, no backward: the graph is dropped)
    A, B = _factors(layer)
    assert not capture.has(A) and not capture._pending and not capture._records
    _loss(layer, x, y).backward()
    assert len(capture.rows(A, B)) == 1 and not capture._pending
    X, delta = capture.rows(A, B)[0]
    assert torch.equal(X, x)
    torch.testing.assert_close(delta.T @ X, G, rtol=1e-12, atol=1e-14)


def test_gradient_accumulation_sums_G_and_the_start_uses_the_sum():
    """Two forward/backward passes before the step: two records, ``G`` their sum (autograd's), the start from it
    and ``B``'s gradient recomputed at the new ``A``."""
    n, m, r = 7, 5, 2
    layer = _layer(n, m, r, s=1.5)
    (x1, y1), (x2, y2) = _batch(n, m, seed=1), _batch(n, m, seed=2)
    G = _reference_gradient(copy.deepcopy(layer), x1, y1) + _reference_gradient(copy.deepcopy(layer), x2, y2)
    A0 = _factors(layer)[0].detach().clone()
    opt = SDSAdamW(layer.named_parameters(), gradient_start=True, lr=0.0, mode="lora")
    A, B = _factors(layer)
    opt.zero_grad()
    _loss(layer, x1, y1).backward()
    _loss(layer, x2, y2).backward()
    assert len(opt.capture.rows(A, B)) == 2
    torch.testing.assert_close(opt.capture.full(A, B, F64), G, rtol=1e-12, atol=1e-14)
    opt.step()
    torch.testing.assert_close(A, _svd_start(A0, G, r), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B.grad, G @ A.detach().T, rtol=1e-12, atol=1e-14)


def test_B_s_new_gradient_is_in_the_units_of_the_gradients_the_step_is_handed():
    """The recorded ``G`` is that of the loss the backward ran on: a ``GradScaler``'s scaled loss (whose gradients
    ``unscale_`` divides), or one whose gradients ``clip_grad_norm_`` rescaled.  The recomputed ``gB`` carries the
    same factor as the gradients the step sees: ``G·Aᵀ`` under the scaler, ``c·G·Aᵀ`` after clipping by ``c``."""
    n, m, r = 7, 5, 2
    x, y = _batch(n, m)
    for rescale in ("scaler", "clip"):
        layer = _layer(n, m, r, s=1.5)
        G = _reference_gradient(copy.deepcopy(layer), x, y)
        opt = SDSAdamW(layer.named_parameters(), gradient_start=True, lr=0.0, mode="lora")
        opt.zero_grad()
        if rescale == "scaler":
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(_loss(layer, x, y)).backward()
            scaler.step(opt)
            factor = 1.0
        else:
            _loss(layer, x, y).backward()
            factor = (0.01 / (torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.01) + 1e-6)).item()  # (its c)
            opt.step()
        A, B = _factors(layer)
        assert factor < 0.5 or rescale == "scaler"  # (the clip acts)
        torch.testing.assert_close(B.grad, factor * G @ A.detach().T, rtol=1e-9, atol=1e-14, msg=rescale)


def _with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``U·diag(s)·Vᵀ`` with random orthonormal ``U`` (m × q), ``V`` (n × q), ``q = len(s)``."""
    U = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=F64)).Q
    return (U * s) @ V.T


@st.composite
def _spectral_batches(draw, exact: bool = False):
    """``(Gs, spectra, r)``: 1–3 matrices ``m × n`` (m, n in [2, 40]) with singular values ``10^{-d·u}`` (``u``
    sorted uniform in [0, 1] from its smallest, so ``σ_1 = 1``; decay ``d`` in [0, 6] drawn per matrix).  ``exact``:
    only shapes where top_right_basis's block has ``k = min(m, n)`` columns."""
    m, n = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    r = draw(st.integers(max(1, min(m, n) - 8) if exact else 1, min(m, n)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    Gs, spectra = [], []
    for decay in draw(st.lists(st.floats(0.0, 6.0), min_size=1, max_size=3)):
        u = torch.rand(min(m, n), generator=gen, dtype=F64).sort().values
        s = 10.0 ** (-decay * (u - u[0]))
        Gs.append(_with_spectrum(m, n, s, gen))
        spectra.append(s)
    return torch.stack(Gs), spectra, r


@given(_spectral_batches())
def test_top_right_basis_against_the_float64_svd(case):
    """Batched block subspace iteration against float64 SVD.  Rows orthonormal (1e-10), signed (largest entry
    positive), in descending order of ``‖G vᵢ‖``.  Captured energy ``‖G Vᵀ‖²`` within the documented error of the
    exact top-r one, ``ε = (σ_{k+1}/σ_r)^{2·POWER_STEPS}`` relative (0 where k = min(m, n)), so ≥ (1 − 1e-6)·Σ_{i≤r}
    σ_i² wherever ε ≤ 1e-6 (not for every spectrum: a slowly decaying one misses a few percent).  With a gap
    σ_r − σ_{r+1} > 0.1·σ_1 the subspace is the SVD's: projector difference < 1e-6 where ε < 1e-9, else within
    ``100·ε·σ_r²/(σ_r² − σ_{r+1}²)`` (the random start's constant; measured ≤ 15)."""
    Gs, spectra, r = case
    m, n = Gs.shape[-2:]
    k = min(max(2 * r, r + 8), m, n)
    V = top_right_basis(Gs, r)
    assert V.shape == (len(Gs), r, n) and V.dtype == F64
    for G, v, s in zip(Gs, V, spectra):
        torch.testing.assert_close(v @ v.T, torch.eye(r, dtype=F64), rtol=0, atol=1e-10)
        assert (v.gather(1, v.abs().argmax(1, keepdim=True)) > 0).all()
        captured = (G @ v.T).pow(2).sum(0)
        assert (captured[1:] <= captured[:-1] * (1 + 1e-9) + 1e-15).all()
        eps = (s[k] / s[r - 1]).item() ** (2 * POWER_STEPS) if k < len(s) else 0.0
        best = s[:r].pow(2).sum().item()
        assert best * (1 - 1e-12 - eps) <= captured.sum().item() <= best * (1 + 1e-12)
        if r < len(s) and s[r - 1] - s[r] > 0.1 * s[0]:
            gap = torch.linalg.matrix_norm(v.T @ v - (W := torch.linalg.svd(G).Vh[:r]).T @ W, 2).item()
            ratio = (s[r - 1] ** 2 / (s[r - 1] ** 2 - s[r] ** 2)).item()
            assert gap < (1e-6 if eps < 1e-9 else 1e-6 + 100 * eps * ratio), (gap, eps)


@given(_spectral_batches(exact=True))
def test_top_right_basis_is_exact_where_its_block_covers_min_m_n(case):
    """k = min(m, n): span(Q) holds G's whole row space, so Rayleigh–Ritz gives the top-r subspace exactly
    (energy to 1e-12); with the r + 1 leading singular values apart (1e-3·σ_1), the rows are the SVD's, signed."""
    Gs, spectra, r = case
    assert min(max(2 * r, r + 8), *Gs.shape[-2:]) == min(Gs.shape[-2:])
    for G, v, s in zip(Gs, top_right_basis(Gs, r), spectra):
        assert (G @ v.T).pow(2).sum().item() >= s[:r].pow(2).sum().item() * (1 - 1e-12)
        top = s[: r + 1]
        if len(top) < 2 or (top[:-1] - top[1:]).min() > 1e-3 * s[0]:
            torch.testing.assert_close(v, _signed(torch.linalg.svd(G).Vh[:r]), rtol=0, atol=1e-8)


@given(m=st.integers(2, 30), n=st.integers(2, 30), rank=st.integers(0, 5), r=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_top_right_basis_of_a_rank_deficient_or_zero_G(m, n, rank, r, seed):
    """rank(G) < r, and a zero G beside it in the batch: finite orthonormal rows, and the first capture all of G
    (the rows past its rank are any orthonormal completion)."""
    r = min(r, m, n)
    rank = min(rank, r - 1)
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(rank, generator=gen, dtype=F64) + 0.5
    G = _with_spectrum(m, n, s, gen) if rank else torch.zeros(m, n, dtype=F64)
    V = top_right_basis(torch.stack([G, torch.zeros_like(G)]), r)
    assert torch.isfinite(V).all()
    for v in V:
        torch.testing.assert_close(v @ v.T, torch.eye(r, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close((G @ V[0].T).pow(2).sum(), G.pow(2).sum(), rtol=1e-10, atol=1e-12)


def test_the_start_leaves_the_global_rng_alone():
    """Neither the basis nor a whole started step draws from the global RNG (dropout's): its state is unchanged."""
    layer = _layer(9, 6, 3, s=1.0)
    x, y = _batch(9, 6)
    G = torch.randn(12, 9, dtype=F64)
    before = torch.random.get_rng_state()
    top_right_basis(G, 3)
    _started(layer, x, y, lr=1e-2)
    assert torch.equal(torch.random.get_rng_state(), before)


class _Three(torch.nn.Module):
    """Three LoRA layers of one shape (one bucket of the start's batched basis), each with its own input."""

    def __init__(self, n: int, m: int, r: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(_layer(n, m, r, s=1.0, seed=i) for i in range(3))

    def loss(self, xs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return sum(_loss(layer, x, y) for layer, x in zip(self.layers, xs))


def test_a_nonfinite_G_in_a_bucket_starts_nothing_for_its_pair_and_leaves_the_others_alone():
    """The first pair's batch holds an Inf: its ``A`` and ``B``'s gradient stay as they were; the two others (same
    shape, same batched basis) start as each does alone (k = min(m, n): exact)."""
    n, m, r = 6, 5, 2
    model = _Three(n, m, r)
    alone = [copy.deepcopy(layer) for layer in model.layers[1:]]
    x, y = _batch(n, m)
    bad = x.clone()
    bad[0, 0] = float("inf")
    opt = SDSAdamW(model.named_parameters(), gradient_start=True, lr=0.0, mode="lora")
    opt.zero_grad()
    model.loss([bad, x, x], y).backward()
    A0, B0 = _factors(model.layers[0])
    A0_before, gB0_before = A0.detach().clone(), B0.grad.clone()
    with torch.no_grad():  # (what step 1 runs, after the guard)
        start_pairs(opt.param_groups, waiting_pairs(opt.param_groups, opt.state), opt.capture, lambda gi: None)
    assert torch.equal(A0, A0_before)
    assert torch.allclose(B0.grad, gB0_before, rtol=0, atol=0, equal_nan=True)  # (bit for bit, NaNs where they were)
    for layer, single in zip(model.layers[1:], alone):
        _started(single, x, y, lr=0.0, mode="lora")
        for p, q in zip(_factors(layer), _factors(single)):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_a_skipped_nonfinite_first_step_starts_the_pair_at_the_next_step():
    """``skip_nonfinite=True``: the first batch is not finite, the step is skipped, nothing starts and the recording
    stays; the next (finite) batch starts the pair from its own ``G``, and only then does the recording stop."""
    n, m, r = 7, 5, 2
    layer = _layer(n, m, r, s=1.5)
    x, y = _batch(n, m)
    bad = x.clone()
    bad[3, 2] = float("nan")
    G = _reference_gradient(copy.deepcopy(layer), x, y)
    A0 = _factors(layer)[0].detach().clone()
    opt = SDSAdamW(layer.named_parameters(), gradient_start=True, lr=0.0, mode="lora", skip_nonfinite=True)
    opt.zero_grad()
    _loss(layer, bad, y).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(_factors(layer)[0], A0) and opt.capture is not None
    opt.zero_grad()
    _loss(layer, x, y).backward()
    opt.step()
    torch.testing.assert_close(_factors(layer)[0], _svd_start(A0, G, r), rtol=1e-10, atol=1e-12)
    assert opt.capture is None and _hooks(layer) == 0


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
