"""The fused step (``fused=True``: the Triton kernels of :mod:`sdsopt.kernels`) against the float64 torch path.

On CUDA with Triton the kernels run on the GPU; without CUDA ``tests/conftest.py`` turns on Triton's interpreter
(``TRITON_INTERPRET=1``) so the same kernels run on the CPU; without Triton every test here skips.

Ranks up to 256 (:data:`sdsopt.fused.MAX_RANK`) are drawn: above :data:`sdsopt.fused.HELD_RANK` (64) the Grams are
computed in tiles, the frames by batched torch calls and the Adam step in two matrix-product passes, whose padding
(r = 100, 192) and tile edges must agree as well.  Stated tolerance (parameters and Adam moments after three
steps, max |Δ| / max |reference|): float32 factors 2e-4, bf16 factors three bf16 ulps (3·2⁻⁷; their moments after
one step, as later ones can cancel to near zero), or 4× the error of the torch path in the same dtype where that is
larger (rank-deficient pairs, ``r > min(m, n)``, amplify the rounding of both paths by their frames' conditioning).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sdsopt import SDSAdamW, fused
from sdsopt.buckets import Bucketing, split_fused

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not fused.available(torch.empty(0, device=DEVICE)),
                                reason="the fused kernels need Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


@pytest.fixture(autouse=True)
def _kernels_up_to_256(monkeypatch):
    """Every test here with the kernels' whole range, whatever the environment says."""
    monkeypatch.delenv("SDSOPT_KERNELS_MAX_RANK", raising=False)


TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3 * 2**-7}
EXAMPLES = 60 if DEVICE.type == "cuda" else 6  # Triton's interpreter runs every program in Python


def _pairs(shapes: list[tuple[int, int]], r: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """float64 LoRA factors of layers ``m × n`` (PEFT names), B not zero."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for i, (m, n) in enumerate(shapes):
        A = torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5
        B = torch.randn(m, r, generator=gen, dtype=torch.float64) / r**0.5
        named += [(f"layers.{i}.lora_A.default.weight", A), (f"layers.{i}.lora_B.default.weight", B)]
    return named


def _run(named, dtype, device, steps, seed, **kw):
    """Parameters and moments (float64, CPU) after ``steps`` steps on gradients drawn in float64."""
    params = [(n, torch.nn.Parameter(t.to(dtype).to(device).clone())) for n, t in named]
    opt = SDSAdamW(params, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        opt.step()
    moments = [opt.state[p][k].double().cpu() for _, p in params for k in ("exp_avg", "exp_avg_sq")]
    return [p.detach().double().cpu() for _, p in params], moments


def _err(got, ref):
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, ref))


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    r=st.sampled_from([1, 2, 5, 16, 33, 64, 100, 128, 256]),
    shapes=st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)), min_size=1, max_size=3),
    mode=st.sampled_from(["sds", "scaled", "sds_polar"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    wd=st.sampled_from([0.0, 0.1]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(r=128, shapes=[(150, 70)], mode="sds", dtype=torch.float32, wd=0.1, amsgrad=False, maximize=False, seed=1)
@example(r=100, shapes=[(40, 130)], mode="scaled", dtype=torch.bfloat16, wd=0.0, amsgrad=True, maximize=True, seed=2)
@example(r=5, shapes=[(4, 77)], mode="sds", dtype=torch.bfloat16, wd=0.0, amsgrad=False, maximize=False, seed=0)
@example(r=256, shapes=[(300, 96), (64, 280)], mode="sds", dtype=torch.float32, wd=0.1, amsgrad=False, maximize=True,
         seed=3)
@example(r=192, shapes=[(260, 230)], mode="sds", dtype=torch.bfloat16, wd=0.0, amsgrad=True, maximize=False, seed=4)
def test_fused_step_matches_the_float64_torch_step(r, shapes, mode, dtype, wd, amsgrad, maximize, seed):
    """Random shapes (uneven, r up to 128, rank-deficient where r > min(m, n)), the three modes the kernels serve,
    bf16, weight decay, amsgrad, maximize: the kernels' parameters and moments equal the float64 torch path's
    to the stated tolerance."""
    named = _pairs(shapes, r, seed)
    if dtype == torch.bfloat16:  # the reference starts from the same rounded factors
        named = [(n, t.to(dtype).double()) for n, t in named]
    kw = dict(lr=1e-2, mode=mode, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    if mode == "sds":
        kw.update(warmup_steps=0, coordinate_ramp=2)
    if mode == "sds_polar":
        kw.update(route="eigh")  # the reference's route on every device
    ref = _run(named, torch.float64, "cpu", 3, seed, **kw)
    got = _run(named, dtype, DEVICE, 3, seed, fused=True, **kw)
    base = _run(named, dtype, DEVICE, 3, seed, **kw)  # the torch path (fused=False), same dtype and device
    tol = TOLERANCE[dtype]
    assert _err(got[0], ref[0]) <= max(tol, 4 * _err(base[0], ref[0]))
    if dtype == torch.float32:
        assert _err(got[1], ref[1]) <= max(tol, 4 * _err(base[1], ref[1]))
    else:  # bf16 moments after one step: later ones can cancel to near zero
        one = [_run(named, dt, dev, 1, seed, **flags)[1] for dt, dev, flags in
               ((torch.float64, "cpu", {}), (dtype, DEVICE, {"fused": True}), (dtype, DEVICE, {}))]
        assert _err(one[1], one[0]) <= max(tol, 4 * _err(one[2], one[0]))


def _table_pair(r, m, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=gen).to(dtype).to(DEVICE)
    B = torch.randn(m, r, generator=gen).to(dtype).to(DEVICE)
    return A, B


@pytest.mark.parametrize("r,m,n", [(1, 3, 70), (7, 33, 5), (64, 65, 129), (100, 40, 200), (128, 150, 70),
                                   pytest.param(256, 300, 270, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_grams(r, m, n, dtype, split, monkeypatch):
    """The Gram kernel: ``[K_A; K_B]`` of a family equals the float64 product (uneven p, r > min(m, n); above
    r = 64 in 64 × 64 tiles, mirrored, the last one cut at r = 100); ``split``: at ``tf32x3`` (the GPU's float32
    precision: the diagonal tiles' two-pass symmetric split, the others' three passes, under the interpreter)."""
    if split:
        default = fused.launch
        monkeypatch.setattr(fused, "launch", lambda *a, **k: dataclasses.replace(default(*a, **k),
                                                                                 gram_precision="tf32x3"))
    A, B = _table_pair(r, m, n, dtype)
    fam = fused.Family(r, dtype, [(0, 1)], [True], [True])
    K = fused.grams(fused.Tables(), "t", {"params": [A, B]}, fam).double().cpu()
    A64, B64 = A.double().cpu(), B.double().cpu()
    for got, want in ((K[0], A64 @ A64.T), (K[1], B64.T @ B64)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_step_with_nonfinite_gradients_changes_nothing():
    """``found_inf`` (skip_nonfinite's device flag) > 0: parameters, moments and step counts stay bit-identical,
    as in torch's fused AdamW; = 0: the step runs."""
    A, B = _table_pair(4, 9, 11, torch.float32)
    fam = fused.Family(4, torch.float32, [(0, 1)], [True], [True])
    group = {"params": [A, B], "amsgrad": True, "betas": (0.9, 0.999), "lr": 1e-2, "eps": 1e-8,
             "weight_decay": 0.1, "maximize": False, "b_lr_ratio": 1.0}
    lists = {"params": [A, B], "grads": [torch.randn_like(A), torch.randn_like(B)],
             "exp_avgs": [torch.rand_like(A), torch.rand_like(B)],
             "exp_avg_sqs": [torch.rand_like(A), torch.rand_like(B)],
             "max_exp_avg_sqs": [torch.rand_like(A), torch.rand_like(B)],
             "state_steps": [torch.full((), 3.0, device=DEVICE), torch.full((), 3.0, device=DEVICE)]}
    eye = torch.eye(4, device=DEVICE).expand(2, 4, 4).contiguous()
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    for flag, changed in ((1.0, False), (0.0, True)):
        done = fused.adam(fused.Tables(), "t", group, fam, lists, {0: 0, 1: 1}, gmaps=eye, mmaps=eye,
                          scales=None, ramps=None, found_inf=torch.tensor(flag, device=DEVICE))
        assert done == {0, 1}
        for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
            same = all(torch.equal(a, b) for a, b in zip(lists[key], before[key]))
            assert same != changed, key
    assert all(float(t) == 4.0 for t in lists["state_steps"])


def _model(dtype, seed=0, scale=1):
    """Three LoRA pairs (ranks 4, 4, 8: two families) and a head; ``scale`` multiplies every size (32: ranks 128
    and 256, the two-pass kernels)."""
    torch.manual_seed(seed)
    def pair(n, r, m):
        return torch.nn.ModuleDict({"lora_A": torch.nn.Linear(n * scale, r * scale, bias=False),
                                    "lora_B": torch.nn.Linear(r * scale, m * scale, bias=False)})

    model = torch.nn.ModuleDict({"a": pair(24, 4, 18), "b": pair(18, 4, 24), "c": pair(24, 8, 24),
                                 "head": torch.nn.Linear(24 * scale, 3)})
    return model.to(dtype).to(DEVICE)


def _steps(model, opt, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device)
        opt.step()


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_mixed_phases_and_checkpoints_resume_bit_exactly():
    """A group with pairs of two ranks (two families), in warm-up and then in coordinates, and a plain parameter,
    ``fused=True``: ``BA`` as the torch path's (float32) to 3e-5 (the re-split's SVD, GPU rounding), and a
    checkpoint taken mid-run resumes bit-exactly."""
    kw = dict(lr=1e-2, warmup_steps=2, coordinate_ramp=3, weight_decay=0.05)
    ref, got = _model(torch.float32), _model(torch.float32)
    opt_ref = SDSAdamW(ref.named_parameters(), **kw)
    opt = SDSAdamW(got.named_parameters(), fused=True, **kw)
    _steps(ref, opt_ref, 7)
    _steps(got, opt, 7)
    for name in ("a", "b", "c", "head"):  # the products: the re-split's SVD may rotate factors within a cluster
        want, have = (m[name].lora_B.weight @ m[name].lora_A.weight if name != "head" else m[name].weight
                      for m in (ref, got))
        assert (have.cpu() - want.cpu()).abs().max() <= 3e-5 * want.abs().max(), name
    state = copy.deepcopy(opt.state_dict())
    saved = {k: v.clone() for k, v in got.state_dict().items()}
    _steps(got, opt, 3, seed=2)
    resumed = _model(torch.float32)
    resumed.load_state_dict(saved)
    opt2 = SDSAdamW(resumed.named_parameters(), fused=True, **kw)
    opt2.load_state_dict(state)
    _steps(resumed, opt2, 3, seed=2)
    for p, q in zip(got.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_float64_factors_and_large_ranks_keep_the_torch_path(monkeypatch):
    """The kernels take float32/bf16/fp16 factors of rank ≤ 256 with float32 algebra (less where
    ``SDSOPT_KERNELS_MAX_RANK`` says so; a bad value is named); float64 factors, ``linalg_dtype=float64`` or a
    larger rank keep the torch path (whose algebra is float64 for float64)."""
    assert fused.supported(torch.bfloat16, fused.MAX_RANK) and not fused.supported(torch.float32, fused.MAX_RANK + 1)
    assert fused.max_rank() == 256
    for bad in ("300", "x", "0"):
        monkeypatch.setenv("SDSOPT_KERNELS_MAX_RANK", bad)
        with pytest.raises(ValueError, match="SDSOPT_KERNELS_MAX_RANK"):
            fused.max_rank()
    monkeypatch.setenv("SDSOPT_KERNELS_MAX_RANK", "128")
    assert fused.supported(torch.float32, 128) and not fused.supported(torch.float32, 129)
    assert not fused.supported(torch.float64, 8)
    for dtype, linalg in ((torch.float64, None), (torch.float32, torch.float64), (torch.float32, None)):
        model = _model(dtype)
        opt = SDSAdamW(model.named_parameters(), fused=True, warmup_steps=0, linalg_dtype=linalg)
        position = {i: i for i in range(len(opt.param_groups[0]["params"]))}
        kernel, rest = split_fused(opt.param_groups[0], Bucketing().buckets(0, opt.param_groups[0], position))
        assert (len(kernel), len(rest)) == ((3, 0) if (dtype, linalg) == (torch.float32, None) else (0, 3))


def test_vector_width_promises_only_what_holds():
    """The kernels load 16-byte vectors only where every pointer is 16-byte aligned and every length (and, for B's
    rows, the rank) a multiple of the vector; a misaligned view steps as its aligned copy does."""
    x = torch.zeros(4, 64, device=DEVICE)
    assert fused.vector_width([x], [64], 4, False) == 4
    assert fused.vector_width([x.bfloat16()], [64], 4, False) == 8
    assert fused.vector_width([x], [63], 4, False) == 1
    assert fused.vector_width([x.bfloat16()], [64], 6, True) == 1
    shifted = torch.zeros(1 + 4 * 64, device=DEVICE)[1:].view(4, 64)
    assert fused.vector_width([x, shifted], [64, 64], 4, False) == 1

    named = _pairs([(24, 32)], 8, seed=3)
    results = []
    for offset in (0, 1):
        params = []
        for name, t in named:
            buf = torch.zeros(offset + t.numel(), device=DEVICE)
            buf[offset:] = t.float().reshape(-1).to(DEVICE)
            params.append((name, torch.nn.Parameter(buf[offset:].view(t.shape))))
        opt = SDSAdamW(params, lr=1e-2, fused=True, warmup_steps=0)
        gen = torch.Generator().manual_seed(4)
        for _ in range(2):
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
        results.append([p.detach().cpu() for _, p in params])
    assert _err(results[1], results[0]) < 1e-6


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
@pytest.mark.parametrize("mode", ["sds", "scaled"])
def test_a_tensor_lr_steps_as_the_float_lr(mode):
    """``fused=True`` with a Tensor lr (changed in place, as schedulers do with ``fill_``) steps as the same float
    lr does: the kernels read it on the device, including ``lr = 0`` (nothing moves, not even the balance)."""
    kw = dict(mode=mode, fused=True, weight_decay=0.05, **({"warmup_steps": 1} if mode == "sds" else {}))
    floats, tensors = _model(torch.float32), _model(torch.float32)
    opt_f = SDSAdamW(floats.named_parameters(), lr=1e-2, **kw)
    lr = torch.tensor(1e-2, device=DEVICE)
    opt_t = SDSAdamW(tensors.named_parameters(), lr=lr, **kw)
    for i, value in enumerate((1e-2, 3e-3, 0.0, 1e-2)):
        opt_f.param_groups[0]["lr"] = value
        lr.fill_(value)
        before = [p.detach().clone() for p in tensors.parameters()]
        _steps(floats, opt_f, 1, seed=i)
        _steps(tensors, opt_t, 1, seed=i)
        for p, q in zip(tensors.parameters(), floats.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-8)
        if value == 0.0:
            assert all(torch.equal(p, b) for p, b in zip(tensors.parameters(), before))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("mode,tensor_lr,scale", [("sds", False, 1), ("scaled", False, 1), ("sds", True, 1),
                                                  ("sds", False, 32), ("scaled", True, 32)])
def test_the_step_is_captured_in_a_cuda_graph(mode, tensor_lr, scale):
    """Past the warm-up and ramp, ``opt.step()`` with ``fused=True`` reads nothing on the host: it can be
    captured in a CUDA graph, and replaying the graph steps as the eager step does (bit for bit); with a Tensor
    lr on the device a schedule reaches the replays (``fill_`` between them).  ``scale`` 32: ranks 128 and 256
    (the two-pass kernels, the frames by batched torch calls)."""
    kw = dict(mode=mode, fused=True, **({"warmup_steps": 1} if mode == "sds" else {}))
    eager, graphed = _model(torch.float32, scale=scale), _model(torch.float32, scale=scale)
    opt_e = SDSAdamW(eager.named_parameters(), lr=1e-2, **kw)
    lr = torch.tensor(1e-2, device=DEVICE) if tensor_lr else 1e-2
    opt_g = SDSAdamW(graphed.named_parameters(), lr=lr, **kw)
    _steps(eager, opt_e, 3)
    _steps(graphed, opt_g, 3)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in eager.parameters()] for _ in range(4)]
    for p in graphed.parameters():
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        for p, g in zip(graphed.parameters(), grads[0]):
            p.grad.copy_(g)
        opt_g.step()  # warm-up on the side stream (allocations, tables)
        with torch.cuda.graph(graph, stream=side):
            opt_g.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, g in zip(eager.parameters(), grads[0]):  # the side stream's step; the capture itself runs nothing
        p.grad = g.clone()
    opt_e.step()
    for i, gs in enumerate(grads[1:]):
        if tensor_lr:  # a schedule: the replay reads the new value
            lr.fill_(1e-2 / (i + 2))
            opt_e.param_groups[0]["lr"] = 1e-2 / (i + 2)
        for p, g in zip(graphed.parameters(), gs):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager.parameters(), gs):
            p.grad = g.clone()
        opt_e.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p, q) if not tensor_lr else torch.allclose(p, q, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("r", [1, 3, 16, 100, *(pytest.param(r, marks=pytest.mark.slow) for r in (40, 64))])
def test_frames_kernel_matches_the_torch_frames(r):
    """:func:`sdsopt.fused.frames` (one Triton program per pair: Cholesky, inverse, map back, scales) against the
    torch path's :func:`cholesky_lower`, :func:`lower_inverse`, :func:`factor_map` and :func:`balance_scales` in
    float64: full-rank, rank-deficient, zero and non-finite Grams, with and without a step shift, to 3e-5 or 8× the
    float32 torch path's own error (ill-conditioned Grams: an unblocked Cholesky rounds more than LAPACK's); and
    mode ``scaled``'s inverses (:func:`sdsopt.fused.inverses`) against :func:`preconditioner`'s Cholesky route.
    r = 100 (above :data:`sdsopt.fused.HELD_RANK`): the batched torch calls, per-pair shifts and scales included."""
    from sdsopt.coordinates import balance_scales, factor_map, lower_inverse
    from sdsopt.linalg import cholesky_lower, finite_or_zero
    from sdsopt.spectral import damped_inverse, preconditioner

    gen = torch.Generator().manual_seed(r)
    X = [torch.randn(r, p, generator=gen) for p in (3 * r + 5, max(1, r // 2), r + 1, 7)]
    K = torch.stack([x @ x.T for x in X] * 2)  # k = 4 pairs: K_A = K_B families alike
    K[6] = 0.0
    K[3, 0, 0] = float("nan")
    K = K.to(DEVICE)
    tol = 1e-5
    for shifts in (None, torch.tensor([0.0, 1e-3, 0.5, 2.0], device=DEVICE)):
        both = torch.tensor([1, 1, 0, 1], dtype=torch.int32, device=DEVICE)
        G, M, scales = fused.frames(K.clone(), 4, tol, shifts, both)
        shift = (torch.zeros(4, device=DEVICE) if shifts is None else shifts).repeat(2).cpu()
        K64 = K.double().cpu()

        def torch_frames(Kj: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
            L_inv = lower_inverse(cholesky_lower(Kj, tol, shift=mu))
            return L_inv, factor_map(Kj, L_inv, mu)

        for j in range(8):
            want = torch_frames(K64[j:j + 1], float(shift[j]))
            base = [t.double() for t in torch_frames(K64[j:j + 1].float(), float(shift[j]))]  # float32 torch
            got = (G[j:j + 1].double().cpu(), M[j:j + 1].double().cpu())
            for a, b, w in zip(got, base, want):
                err = lambda x: ((x - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()  # noqa: E731
                assert err(a) <= max(3e-5, 8 * err(b)), (j, shifts)  # ill-conditioned: float32 noise in both
        if shifts is None:  # mode scaled's preconditioners, as the Cholesky route of preconditioner() forms them
            P = fused.inverses(K.clone(), 4, tol, 1e-3)
            want = preconditioner(finite_or_zero(K64), f=damped_inverse, route="cholesky", rank_tol=tol, damping=1e-3)
            base = preconditioner(finite_or_zero(K64.float()), f=damped_inverse, route="cholesky", rank_tol=tol,
                                  damping=1e-3).double()
            for j in range(8):
                err = lambda x: ((x[j] - want[j]).abs().max() / want[j].abs().max()).item()  # noqa: E731
                assert err(P.double().cpu()) <= max(3e-5, 8 * err(base)), j
        c, _ = balance_scales(K64[:4], K64[4:])
        c = torch.where(both.cpu().bool().view(-1, 1, 1), c, 1.0).view(-1)
        assert torch.allclose(scales[4:].double().cpu(), c, rtol=1e-5)
        assert torch.allclose(scales[:4].double().cpu(), 1 / c, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_factors_step_at_float32_accuracy(dtype, monkeypatch):
    """The precision the GPU's Adam kernel gets (:func:`sdsopt.fused.launch` on CUDA) on a rank-deficient 16-bit pair
    (r = 5 > m = 4: the partner's frame has weak directions of size √τ): the fused step's parameters stay within
    4× the torch path's error (same dtype) of the float64 step.  With the 16-bit operands the kernel took for
    bf16 factors before 2026-11-30 (``precision="native"``) this failed on an H200 (16 % vs 1.4 %), and does
    under Triton's interpreter."""
    if DEVICE.type == "cpu":  # the GPU's products with the maps (the interpreter's 16-bit dots are not the GPU's)
        default = fused.launch
        gpu = fused.launch(5, torch.device("cuda"), dtype).precision
        monkeypatch.setattr(fused, "launch", lambda *a, **k: dataclasses.replace(default(*a, **k), precision=gpu))
    named = [(n, t.to(dtype).double()) for n, t in _pairs([(4, 77)], 5, seed=0)]
    kw = dict(lr=1e-2, mode="sds", warmup_steps=0, coordinate_ramp=2)
    ref = _run(named, torch.float64, "cpu", 3, 0, **kw)
    got = _run(named, dtype, DEVICE, 3, 0, fused=True, **kw)
    base = _run(named, dtype, DEVICE, 3, 0, **kw)
    assert _err(got[0], ref[0]) <= max(TOLERANCE[torch.bfloat16], 4 * _err(base[0], ref[0]))


@pytest.mark.parametrize("mode,dtype", [("sds", torch.float32), ("scaled", torch.bfloat16), ("sds", torch.bfloat16)])
def test_the_two_passes_step_as_the_held_maps(mode, dtype, monkeypatch):
    """The Adam step of ranks above 64 forced on a rank the held-maps kernel also takes (r = 40: the two passes of
    :func:`sdsopt.kernels.pass_kernel` over rows in tiles of 16 and slices of 16 of the maps, the last ones cut;
    one pair's ``A`` wider than a work item; the second pass's direction from the stored moments): parameters and
    moments after three steps equal the held kernel's to float32 rounding (1e-5; bf16: two ulps, as the second
    pass takes the direction from the stored bf16 moments, as torch's AdamW does, and the held kernel from their
    float32 values), with the map back (``sds``) and without (``scaled``, amsgrad)."""
    named = _pairs([(90, 300), (33, 50)], 40, seed=6)
    kw = dict(lr=1e-2, mode=mode, weight_decay=0.1, amsgrad=mode == "scaled", fused=True,
              **({"warmup_steps": 0, "coordinate_ramp": 2} if mode == "sds" else {}))
    held = _run(named, dtype, DEVICE, 3, 6, **kw)
    default = fused.launch
    monkeypatch.setattr(fused, "launch", lambda *a, **k: dataclasses.replace(default(*a, **k), adam_kt=16, adam_tm=16))
    assert fused.launch(40, DEVICE, dtype).two_pass
    passes = _run(named, dtype, DEVICE, 3, 6, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    assert _err(passes[0], held[0]) <= tol and _err(passes[1], held[1]) <= tol
