"""SDSAdamW as an optimizer: AdamW equivalence (P4, P7), closed-form steps, AdamW semantics, checkpoints."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from svd_reference import sds_reference, sigma_split_reference
from sdsopt import SDSAdamW

from conftest import LoraLinear, fresh, make_data, train

F64 = torch.float64


# ----------------------------------------------------------------------------- pairing
def test_pairs_found_by_name():
    opt = SDSAdamW(fresh().named_parameters())
    got = sorted((p.name_a, p.name_b, p.m, p.n, p.r) for p in opt.lora_pairs)
    assert got == [
        ("l1.lora_A.default.weight", "l1.lora_B.default.weight", 16, 8, 4),
        ("l2.lora_A.default.weight", "l2.lora_B.default.weight", 3, 16, 2),
    ]


def test_unnamed_parameters_without_inference_warn_once_and_are_adamw():
    model = fresh()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no LoRA pairs.*named_parameters") as rec:
        opt = SDSAdamW(model.parameters(), lr=1e-2, infer_names=False)
    assert len([w for w in rec if "no LoRA pairs" in str(w.message)]) == 1
    train(model, opt)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_explicit_pairs_and_custom_patterns():
    class Kohya(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_down = nn.Linear(6, 2, bias=False)
            self.lora_up = nn.Linear(2, 5, bias=False)

    m = Kohya()
    opt = SDSAdamW([{"params": list(m.parameters()), "lora_pairs": [(m.lora_down.weight, m.lora_up.weight)]}])
    assert [(p.index_a, p.index_b, p.r) for p in opt.lora_pairs] == [(0, 1, 2)]
    from sdsopt import regex_pairing

    opt = SDSAdamW(m.named_parameters(), pairing=regex_pairing(r"(?:^|\.)lora_(?P<factor>down|up)\.", a="down", b="up"))
    assert [(p.name_a, p.name_b) for p in opt.lora_pairs] == [("lora_down.weight", "lora_up.weight")]
    opt = SDSAdamW(m.named_parameters(), pairing=lambda names: [("lora_down.weight", "lora_up.weight")])
    assert len(opt.lora_pairs) == 1


@pytest.mark.parametrize("mode", ["sds", "sds_polar", "scaled", "lorapro"])
def test_conv_and_embedding_shapes_pair(mode):
    A = nn.Parameter(torch.randn(4, 3, 3, 3))  # Conv LoRA A: r × c × k × k
    B = nn.Parameter(torch.zeros(8, 4, 1, 1))  # Conv LoRA B: out × r × 1 × 1
    E_A = nn.Parameter(torch.randn(4, 50))  # lora_embedding_A: r × num_embeddings
    E_B = nn.Parameter(torch.zeros(12, 4))  # lora_embedding_B: dim × r
    named = [("conv.lora_A.default.weight", A), ("conv.lora_B.default.weight", B),
             ("emb.lora_embedding_A.default", E_A), ("emb.lora_embedding_B.default", E_B)]
    opt = SDSAdamW(named, lr=1e-2, mode=mode, warmup_steps=0)
    assert sorted((p.m, p.n, p.r) for p in opt.lora_pairs) == [(8, 27, 4), (12, 50, 4)]
    for p in (A, B, E_A, E_B):
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in (A, B, E_A, E_B))
    assert B.abs().sum() > 0 and E_B.abs().sum() > 0
    before = A.detach().clone()
    for p in (A, B, E_A, E_B):  # a second step with both factors non-zero moves A too, in its 4-D shape
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(torch.isfinite(p).all() for p in (A, B, E_A, E_B)) and not torch.equal(A, before)


# ----------------------------------------------------------------------------- AdamW equivalence (P7, P4)
def rosenbrock(xy):
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(xy):
    x, y = xy
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


@pytest.mark.parametrize("fn,start", [(rosenbrock, (-2.0, 2.0)), (beale, (1.5, 1.5))])
@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True), dict(maximize=False, weight_decay=0.1)])
def test_p7_unpaired_follow_adamw_bit_for_bit(fn, start, kw):
    """P7 on torch-optimizer's benchmark functions, next to a LoRA pair that is being rewritten."""
    xy = nn.Parameter(torch.tensor(start))
    xy_ref = nn.Parameter(torch.tensor(start))
    model = fresh(zero_b=False)
    x, y = make_data()
    opt = SDSAdamW([("xy", xy), *model.named_parameters()], lr=1e-2, mode="sds_polar", decouple_sigma=True, **kw)
    ref = torch.optim.AdamW([xy_ref], lr=1e-2, foreach=False, **kw)
    for _ in range(200):
        opt.zero_grad()
        ref.zero_grad()
        (fn(xy) + ((model(x) - y) ** 2).mean()).backward()
        fn(xy_ref).backward()
        opt.step()
        ref.step()
        assert torch.equal(xy, xy_ref)
    assert fn(xy).item() < fn(torch.tensor(start)).item()


@pytest.mark.parametrize("flags", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_mode_lora_is_adamw_bit_for_bit(flags):
    model, ref = fresh(), fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, mode="lora", **flags)
    train(model, opt, steps=10)
    train(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05, **flags), steps=10)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_p4_orthonormal_factors_step_equals_adamw_bit_for_bit():
    """With exactly orthonormal factors (signed coordinate frames), one SDS step is AdamW's, bit for bit."""
    def build():
        torch.manual_seed(0)
        m = LoraLinear(6, 5, 3, zero_b=False)
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(torch.eye(3, 6)[[2, 0, 1]] * torch.tensor([[1.0], [-1.0], [1.0]]))
            m.lora_B["default"].weight.copy_(-torch.eye(5, 3))
        return m

    model, ref = build(), build()
    x = torch.randn(10, 6)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for m, o in ((model, opt), (ref, ref_opt)):
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- closed-form steps (float64)
def first_adam_step(g, lr, eps):
    return lr * g / (g.abs() + eps)  # bias-corrected m̂/(√v̂+ε) at step 1


@pytest.mark.parametrize("route", ["eigh", "newton_schulz"])
def test_first_step_matches_svd_closed_form(route):
    """One float64 step of a full-rank pair equals AdamW applied to s·G·Ω_Aᵀ and s·Ω_Bᵀ·G from SVDs."""
    torch.manual_seed(1)
    layer = LoraLinear(7, 5, 3, s=1.5, dtype=F64, zero_b=False)
    A0 = layer.lora_A["default"].weight.detach().clone()
    B0 = layer.lora_B["default"].weight.detach().clone()
    x = torch.randn(20, 7, dtype=F64)
    W = (layer.base.weight.detach() + 1.5 * B0 @ A0).requires_grad_()
    (torch.tanh(x @ W.T + layer.base.bias.detach()) ** 2).sum().backward()
    G = W.grad
    lr, eps, wd = 1e-3, 1e-8, 0.1
    opt = SDSAdamW(layer.named_parameters(), lr=lr, eps=eps, weight_decay=wd, mode="sds_polar", route=route)
    (torch.tanh(layer(x)) ** 2).sum().backward()
    opt.step()
    ref_a, ref_b = sds_reference(A0, B0, G, 1.5)
    tol = 1e-10 if route == "eigh" else 1e-6
    # Adam's first step is g/(|g|+ε): compare the rewritten gradients through it, with decay applied first
    for p0, p, ref in ((A0, layer.lora_A["default"].weight, ref_a), (B0, layer.lora_B["default"].weight, ref_b)):
        expect = p0 * (1 - lr * wd) - first_adam_step(ref, lr, eps)
        assert (p.detach() - expect).abs().max().item() <= tol * lr


def test_sigma_channel_first_step_closed_form():
    """(2.3)–(2.4) through the optimizer, float64: basis part by elementwise Adam, σ part by its own Adam."""
    torch.manual_seed(2)
    layer = LoraLinear(7, 5, 3, s=1.0, dtype=F64, zero_b=False)
    A0 = layer.lora_A["default"].weight.detach().clone()
    B0 = layer.lora_B["default"].weight.detach().clone()
    x = torch.randn(20, 7, dtype=F64)
    W = (layer.base.weight.detach() + B0 @ A0).requires_grad_()
    (torch.sin(x @ W.T + layer.base.bias.detach())).sum().backward()
    lr, ratio, eps, wd = 1e-3, 0.5, 1e-8, 0.0
    opt = SDSAdamW(layer.named_parameters(), lr=lr, eps=eps, weight_decay=wd, mode="sds_polar", decouple_sigma=True, sigma_lr_ratio=ratio)
    torch.sin(layer(x)).sum().backward()
    opt.step()
    ref_a, ref_b = sds_reference(A0, B0, W.grad, 1.0)
    for X0, g, new, transpose in ((A0, ref_a, layer.lora_A["default"].weight, False),
                                  (B0, ref_b, layer.lora_B["default"].weight, True)):
        Xr, gr = (X0.T, g.T) if transpose else (X0, g)
        g_sigma, basis, U, Vh = sigma_split_reference(Xr, gr)
        expect = Xr - first_adam_step(basis, lr, eps) - U @ torch.diag(first_adam_step(g_sigma, lr * ratio, eps)) @ Vh
        got = new.detach().T if transpose else new.detach()
        assert (got - expect).abs().max().item() <= 1e-9 * lr


def test_directional_derivative_by_finite_differences():
    """The SDS direction is a descent direction: dL/dt along −g̃ equals −⟨g, g̃⟩ < 0 (central differences)."""
    torch.manual_seed(3)
    layer = LoraLinear(6, 4, 2, dtype=F64, zero_b=False)
    x, y = torch.randn(15, 6, dtype=F64), torch.randn(15, 4, dtype=F64)
    loss = lambda: ((layer(x) - y) ** 2).mean()  # noqa: E731
    loss().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    from sdsopt import rewrite_pair

    new_a, new_b = rewrite_pair(A.detach(), B.detach(), A.grad, B.grad, mode="sds_polar")
    predicted = -((A.grad * new_a).sum() + (B.grad * new_b).sum()).item()
    h = 1e-6
    with torch.no_grad():
        A -= h * new_a
        B -= h * new_b
        up = loss().item()
        A += 2 * h * new_a
        B += 2 * h * new_b
        down = loss().item()
    assert predicted < 0
    assert abs((up - down) / (2 * h) - predicted) <= 1e-6 * abs(predicted)


# ----------------------------------------------------------------------------- AdamW semantics
def test_closure_zero_grad_and_no_grad_params():
    model = fresh()
    frozen = nn.Parameter(torch.ones(2))
    opt = SDSAdamW([*model.named_parameters(), ("frozen", frozen)], lr=1e-2)
    x, y = make_data()

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(20):
        last = opt.step(closure).item()
    assert last < first
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(2))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_maximize_flips_the_step():
    a, b = fresh(), fresh()
    train(a, SDSAdamW(a.named_parameters(), lr=1e-2, weight_decay=0.0), steps=1)
    x, y = make_data()
    opt = SDSAdamW(b.named_parameters(), lr=1e-2, weight_decay=0.0, maximize=True)
    (-((b(x) - y) ** 2).mean()).backward()
    opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_param_groups_schedulers_and_add_param_group():
    model = fresh()
    opt = SDSAdamW([
        {"params": list(model.l1.named_parameters(prefix="l1")), "lr": 1e-2},
        {"params": list(model.l2.named_parameters(prefix="l2")), "lr": 1e-3, "weight_decay": 0.0},
    ])
    assert [len(g["lora_pairs"]) for g in opt.param_groups] == [1, 1]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = make_data()
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [2.5e-3, 2.5e-4]
    opt.add_param_group({"params": [("extra", model.extra)], "lr": 0.1})
    assert opt.param_groups[-1]["lora_pairs"] == []
    new = LoraLinear(3, 3, 1, zero_b=False)
    opt.add_param_group({"params": list(new.named_parameters(prefix="new"))})
    assert len(opt.lora_pairs) == 3


def assert_resume_is_bit_exact(make_opt, before=4, after=4):
    """Train, checkpoint (torch.save), train on; a fresh model and optimizer loaded from the checkpoint
    must reproduce the uninterrupted parameters bit for bit.  Returns the losses before the checkpoint."""
    data = make_data()
    model = fresh(zero_b=True)
    opt = make_opt(model)
    losses = train(model, opt, steps=before, data=data)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, steps=after, data=data)

    buf.seek(0)
    ckpt = torch.load(buf)
    other = fresh(seed=123)
    other.load_state_dict(ckpt["model"])
    resumed = make_opt(other)
    resumed.load_state_dict(ckpt["opt"])
    train(other, resumed, steps=after, data=data)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    return losses


@pytest.mark.parametrize("kw", [
    dict(warmup_steps=2), dict(warmup_steps=4), dict(warmup_steps=6), dict(warmup_steps=3, amsgrad=True),
    dict(warmup_steps=3, fused=True), dict(warmup_steps=0, resplit=False), dict(warmup_steps=2, coordinate_ramp=4),
    dict(mode="sds_polar", decouple_sigma=True), dict(mode="sds_polar", decouple_sigma=True, amsgrad=True),
    dict(mode="sds_polar", route="newton_schulz"), dict(mode="scaled"), dict(mode="scaled", route="eigh"),
    dict(mode="lorapro"),
])
def test_checkpoint_resume_is_bit_exact(kw):
    """Saved before, at (warmup_steps=4: the re-split step) and after the end of sds's warm-up, and in other modes."""
    assert_resume_is_bit_exact(lambda m: SDSAdamW(m.named_parameters(), lr=1e-2, **kw))


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_as_the_original(clone):
    """``copy.deepcopy((model, opt))`` and a pickle round trip give an optimizer of the copied parameters with the
    original's settings, pairs, state and skip count, its own caches and compile handle, stepping bit-exactly as
    the original continues (across sds's warm-up)."""
    import pickle

    data = make_data()
    model = fresh(zero_b=False)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=3, skip_nonfinite=True)
    train(model, opt, steps=2, data=data)
    next(model.parameters()).grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        opt.step()
    copy_of = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}[clone]
    twin, twin_opt = copy_of((model, opt))
    assert twin_opt.param_groups[0]["params"][0] is next(twin.parameters())
    assert (twin_opt.skip_nonfinite, twin_opt.skipped_steps) == (True, 1)
    assert [(p.name_a, p.name_b) for p in twin_opt.lora_pairs] == [(p.name_a, p.name_b) for p in opt.lora_pairs]
    assert twin_opt.compile_handle != opt.compile_handle
    train(model, opt, steps=3, data=data)
    train(twin, twin_opt, steps=3, data=data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_with_other_pairs_is_refused():
    a = fresh()
    opt = SDSAdamW(a.named_parameters())
    train(a, opt, steps=1)
    other = SDSAdamW([(n, p) for n, p in fresh().named_parameters() if "l2" not in n])
    with pytest.raises(ValueError, match="LoRA pairs"):
        other.load_state_dict(opt.state_dict())


def test_lookahead_trains_and_resumes_bit_exactly():
    """torch-optimizer's Lookahead around SDSAdamW: trains, and a checkpoint resumes the same trajectory."""
    pytest.importorskip("torch_optimizer")
    from sdsopt.compat import lookahead

    losses = assert_resume_is_bit_exact(
        lambda m: lookahead(SDSAdamW(m.named_parameters(), lr=1e-2), k=3, alpha=0.5), before=31, after=7)
    assert losses[-1] < 0.9 * losses[0]


# ----------------------------------------------------------------------------- precision and non-finite input
def test_bf16_params_train_with_fp32_algebra():
    model = fresh(dtype=torch.bfloat16)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode="sds_polar", decouple_sigma=True)
    losses = train(model, opt, steps=30, dtype=torch.bfloat16)
    assert losses[-1] < losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        assert all(t.dtype == torch.bfloat16 for k, t in opt.state[p].items() if k != "step")


def test_non_finite_gradients_propagate_like_adamw():
    """Documented: nothing raises, no step is skipped; a NaN in row i of gB reaches row i of B only."""
    model = fresh(zero_b=False)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=0)
    x, y = make_data()
    ((model(x) - y) ** 2).mean().backward()
    B = model.l1.lora_B["default"].weight
    B.grad[3, 1] = float("nan")
    opt.step()
    assert torch.isnan(B[3]).all()
    assert torch.isfinite(B[torch.arange(16) != 3]).all()
    assert torch.isfinite(model.l1.lora_A["default"].weight).all()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0), "lr=-1.0 must be >= 0"),
    (dict(eps=-1e-8), "eps=.* must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay=.* must be >= 0"),
    (dict(betas=(0.9, 1.0)), "betas=.* in \\[0, 1\\)"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(mode="sdss"), "mode='sdss' is unknown; choose one of"),
    (dict(route="qr"), "route='qr' is unknown"),
    (dict(linalg_dtype=torch.float16), "linalg_dtype=.* unknown"),
    (dict(rank_tol=0.0), "rank_tol"),
    (dict(damping=0.0), "damping"),
    (dict(sigma_lr_ratio=-1.0), "sigma_lr_ratio"),
    (dict(mode="lora", decouple_sigma=True), "decouple_sigma"),
    (dict(lr=torch.tensor(0.1)), "a Tensor lr needs fused=True"),
    (dict(lr=torch.tensor([0.1, 0.2]), fused=True), "one floating-point number"),
    (dict(lr=torch.tensor(-0.1), fused=True), "lr=-0.1.* must be >= 0"),
    (dict(lr="0.1"), "lr='0.1' must be a float or a one-element Tensor.*YAML"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SDSAdamW(fresh().named_parameters(), **kw)


def test_bad_group_hyperparameter_names_the_group():
    model = fresh()
    with pytest.raises(ValueError, match="param group 1: lr=-0.5"):
        SDSAdamW([{"params": list(model.l1.named_parameters(prefix="l1"))},
                  {"params": list(model.l2.named_parameters(prefix="l2")), "lr": -0.5}])


def test_pair_shapes_must_chain():
    A = nn.Parameter(torch.randn(4, 6))
    B = nn.Parameter(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"do not chain: A 'x.lora_A.a.weight' is \(4, 6\).*'x.lora_B.a.weight' is \(5, 3\)"):
        SDSAdamW([("x.lora_A.a.weight", A), ("x.lora_B.a.weight", B)])


def test_pair_split_across_groups():
    model = fresh()
    named = dict(model.l1.named_parameters(prefix="l1"))
    with pytest.raises(ValueError, match="split across param groups.*same param group"):
        SDSAdamW([{"params": [(k, v) for k, v in named.items() if "lora_B" not in k]},
                  {"params": [(k, v) for k, v in named.items() if "lora_B" in k]}])
    A, B = model.l2.lora_A["default"].weight, model.l2.lora_B["default"].weight
    with pytest.raises(ValueError, match="is in param group 0: a pair's two factors must share one group"):
        SDSAdamW([{"params": [A]}, {"params": [B], "lora_pairs": [(A, B)]}])


def test_parameter_in_two_pairs():
    A, B, B2 = (nn.Parameter(torch.randn(*s)) for s in ((2, 5), (4, 2), (3, 2)))
    with pytest.raises(ValueError, match="more than one LoRA pair"):
        SDSAdamW([{"params": [A, B, B2], "lora_pairs": [(A, B), (A, B2)]}])


def test_sparse_gradients_and_complex_factors():
    emb = nn.Embedding(10, 4, sparse=True)
    A, B = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.zeros(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SDSAdamW([("emb.weight", emb.weight), ("m.lora_A.d.weight", A), ("m.lora_B.d.weight", B)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="'emb.weight' has a sparse gradient"):
        opt.step()
    Ac = nn.Parameter(torch.randn(2, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="'m.lora_A.d.weight' has dtype torch.complex64"):
        SDSAdamW([("m.lora_A.d.weight", Ac), ("m.lora_B.d.weight", B)])


def test_complex_unpaired_parameter_gets_adamw():
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z_ref = nn.Parameter(z.detach().clone())
    with pytest.warns(UserWarning):
        opt = SDSAdamW([z], lr=0.1)
    ref = torch.optim.AdamW([z_ref], lr=0.1, foreach=False)
    for p, o in ((z, opt), (z_ref, ref)):
        for _ in range(3):
            o.zero_grad()
            (p.abs() ** 2).sum().backward()
            o.step()
    assert torch.equal(z, z_ref)


_TF32_PROBE = """
import torch
from sdsopt import SDSAdamW
import sdsopt.modes.sds_steps as steps
{user}
seen = []
inner = steps.coordinate_gradient
steps.coordinate_gradient = lambda *a: (seen.append(torch.backends.cuda.matmul.fp32_precision), inner(*a))[1]
A = torch.nn.Parameter(torch.randn(2, 6)); B = torch.nn.Parameter(torch.randn(5, 2))
opt = SDSAdamW([("l.lora_A.weight", A), ("l.lora_B.weight", B)], lr=1e-3, warmup_steps=0)
(B @ A).square().sum().backward()
opt.step()
print(sorted(set(seen)), torch.backends.cuda.matmul.fp32_precision)
"""


@pytest.mark.parametrize("user", ["torch.backends.cuda.matmul.allow_tf32 = True",
                                  "torch.set_float32_matmul_precision('high')",
                                  "torch.backends.cuda.matmul.fp32_precision = 'tf32'"])
def test_the_step_takes_ieee_float32_products_whatever_the_users_tf32_flag(user):
    """docs/math.md (2.5): the algebra on the factors is float32-accurate; a user's TF32 switch (Trainer's
    ``tf32=True``) holds outside the step, through whichever of torch's two flag APIs the user set it with (they
    refuse to be mixed).  A fresh interpreter per API: the flags are process-wide."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TF32_PROBE.format(user=user)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['ieee']", "tf32"]
