"""Reliability (issue 12): the non-finite guard, checkpoint validation, and API sequences fuzzed with hypothesis."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdsopt import SDSAdamW
from conftest import Net, fresh, make_data

F64 = torch.float64

GUARDED_MODES = [
    dict(mode="lora"), dict(mode="sds", warmup_steps=0), dict(mode="sds", warmup_steps=3), dict(mode="sds_polar"),
    dict(mode="sds_polar", decouple_sigma=True), dict(mode="scaled"),
    dict(mode="sds", warmup_steps=0, fused=True), dict(mode="sds", warmup_steps=0, amsgrad=True),
    dict(mode="lorapro"),
]


def backward(model, data):
    x, y = data
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in model.parameters()})


def assert_same(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p in model.parameters():
        mine = opt.state[p]
        assert mine.keys() == state[id(p)].keys()
        for k, v in mine.items():
            assert torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k], k


# ----------------------------------------------------------------------------- skip_nonfinite
@pytest.mark.parametrize("kw", GUARDED_MODES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_step_is_skipped_bit_exactly_and_training_continues(kw, bad):
    """A NaN/Inf gradient leaves parameters, moments, step counts and sds's warm-up count bit-identical; the
    trajectory then continues exactly as that of an optimizer that never saw the bad step."""
    data = make_data()
    model, twin = fresh(), fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, skip_nonfinite=True, **kw)
    ref = SDSAdamW(twin.named_parameters(), lr=1e-2, **kw)
    for step in range(6):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            backward(m, data)
        if step == 2:  # the bad step: only the guarded optimizer sees it
            snap = snapshot(model, opt)
            model.l1.lora_B["default"].weight.grad[3, 1] = bad
            with pytest.warns(RuntimeWarning, match=r"l1\.lora_B\.default\.weight.*not finite"):
                opt.step()
            assert_same(model, opt, snap)
            assert opt.skipped_steps == 1
            continue
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)


def test_skip_warns_once_and_counts_every_skip_across_checkpoints():
    data = make_data()
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, skip_nonfinite=True, warmup_steps=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(5):
            opt.zero_grad()
            backward(model, data)
            if step % 2 == 0:
                model.extra.grad[0] = float("nan")
            opt.step()
    assert len([w for w in rec if "skipped a step" in str(w.message)]) == 1
    assert opt.skipped_steps == 3
    saved = opt.state_dict()
    assert saved["param_groups"][0]["skipped_steps"] == 3
    other = SDSAdamW(fresh().named_parameters(), lr=1e-2, skip_nonfinite=True, warmup_steps=1)
    other.load_state_dict(copy.deepcopy(saved))
    assert other.skipped_steps == 3
    assert "skipped_steps" not in other.param_groups[0]


def test_guard_off_is_adamw_nan_reaches_parameters():
    """Default ``skip_nonfinite=False``: as torch's AdamW, the NaN reaches the parameter."""
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode="lora")
    backward(model, make_data())
    model.extra.grad[0] = float("nan")
    opt.step()
    assert torch.isnan(model.extra).any()
    assert opt.skipped_steps == 0


def test_guard_checks_only_gradients_the_step_uses():
    """Parameters without a gradient (frozen, or ``grad=None``) do not trigger the guard; bf16 grads are checked."""
    model = fresh(dtype=torch.bfloat16)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, skip_nonfinite=True, warmup_steps=0)
    x, y = make_data(dtype=torch.bfloat16)
    backward(model, (x, y))
    model.l2.base.weight.grad = None
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    backward(model, (x, y))
    model.l1.lora_A["default"].weight.grad[0, 0] = float("-inf")
    with pytest.warns(RuntimeWarning, match="lora_A"):
        opt.step()
    assert opt.skipped_steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("kw", [dict(mode="sds", warmup_steps=0, coordinate_ramp=0), dict(mode="scaled"),
                                dict(mode="lora"), dict(mode="sds_polar", route="newton_schulz")])
def test_guard_on_cuda_fused_does_not_synchronise(kw):
    """fused=True on CUDA: the skip decision stays on the device (no host sync in the step); bit-identical.
    (sds decides on the host while a pair counts its warm-up or ramp steps, hence no warm-up and no ramp here.)"""
    torch.manual_seed(0)
    model = Net(zero_b=False).cuda()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, fused=True, skip_nonfinite=True, **kw)
    x, y = (t.cuda() for t in make_data())
    with pytest.warns(RuntimeWarning, match=r"l2\.lora_A"):  # issued once the flag reached the host
        for step in range(4):
            opt.zero_grad()
            backward(model, (x, y))
            if step == 2:
                model.l2.lora_A["default"].weight.grad[1, 2] = float("nan")
                snap = snapshot(model, opt)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if step == 2:
                assert_same(model, opt, snap)
        assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- load_state_dict validation
def trained_state(**kw):
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, **kw)
    for _ in range(2):
        opt.zero_grad()
        backward(model, make_data())
        opt.step()
    return opt.state_dict()


class Wider(Net):
    def __init__(self):
        super().__init__()
        from test_optim import LoraLinear
        self.l1 = LoraLinear(8, 16, 6)


@pytest.mark.parametrize("case, match", [
    ("rank", r"'l1\.lora_A\.default\.weight' is \(6, 8\) but the checkpoint's exp_avg for it is \(4, 8\)"),
    ("mode", r"mode='scaled', this optimizer mode='sds'.*Resume with mode='scaled'"),
    ("groups", r"2 param group\(s\), this optimizer 1"),
    ("not a state dict", r"expected an optimizer state dict"),
])
def test_load_state_dict_refuses_a_checkpoint_that_does_not_fit(case, match):
    model = Wider() if case == "rank" else fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2)
    saved = {
        "rank": lambda: trained_state(),
        "mode": lambda: trained_state(mode="scaled"),
        "groups": lambda: {**trained_state(), "param_groups": trained_state()["param_groups"] * 2},
        "not a state dict": lambda: {"state": {}},
    }[case]()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert_same(model, opt, before)  # nothing was touched
    opt.zero_grad()
    backward(model, make_data())
    opt.step()  # and the optimizer still works


# ----------------------------------------------------------------------------- API sequences (hypothesis)
OPS = st.one_of(
    st.tuples(st.just("step"), st.integers(0, 3)),
    st.tuples(st.just("closure"), st.integers(0, 3)),
    st.tuples(st.just("lora_fa"), st.integers(0, 3)),  # A frozen for this step: B alone has a gradient
    st.tuples(st.just("no_pair_grad"), st.integers(0, 3)),  # l2's pair has no gradient at all
    st.tuples(st.just("zero_grad"), st.booleans()),
    st.tuples(st.just("lr"), st.sampled_from([0.0, 0.5, 1.0])),  # what a scheduler does: 0 included
    st.tuples(st.just("save_load"), st.just(0)),
    st.tuples(st.just("add_group"), st.just(0)),
    st.tuples(st.just("bad_group"), st.just(0)),
)


class Grown(Net):
    """Net plus a third LoRA layer whose factors join the optimizer mid-run (``add_param_group``)."""

    def __init__(self):
        super().__init__(dtype=F64, zero_b=True)
        from test_optim import LoraLinear
        self.l3 = LoraLinear(3, 3, 2, dtype=F64, zero_b=False)

    def forward(self, x):
        return self.l3(super().forward(x))


def run_sequence(ops, kw, interrupted: bool, adamw: bool = False):
    """Apply ``ops``; ``interrupted`` runs save/load and closures for real, the reference skips the save/load
    and calls ``backward`` directly; ``adamw`` runs ``torch.optim.AdamW`` instead of SDSAdamW (``kw`` unused).
    Returns the parameters after every op."""
    torch.manual_seed(0)
    model = Grown()
    base = [(n, p) for n, p in model.named_parameters() if not n.startswith("l3.")]
    late = [(n, p) for n, p in model.named_parameters() if n.startswith("l3.")]

    def group(named):
        if adamw:
            return {"params": [p for _, p in named]}
        return {"params": [p for _, p in named], "param_names": [n for n, _ in named]}

    def make(groups, lr=1e-2):
        if adamw:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2, foreach=False)
        return SDSAdamW(groups, lr=lr, **kw)

    opt = make([group(base)])
    added = False
    trace = []
    for op, arg in ops:
        data = make_data(dtype=F64, seed=arg if isinstance(arg, int) and not isinstance(arg, bool) else 0)
        if op in ("step", "lora_fa", "no_pair_grad"):
            backward(model, data)
            if op == "lora_fa":
                model.l1.lora_A["default"].weight.grad = None
            if op == "no_pair_grad":
                model.l2.lora_A["default"].weight.grad = model.l2.lora_B["default"].weight.grad = None
            opt.step()
        elif op == "closure":
            if interrupted:
                opt.step(lambda: backward(model, data))
            else:
                backward(model, data)
                opt.step()
        elif op == "zero_grad":
            opt.zero_grad(set_to_none=arg)
        elif op == "lr":
            for g in opt.param_groups:
                g["lr"] = 1e-2 * arg
        elif op == "save_load" and interrupted:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            opt = make([group(base)] + ([group(late)] if added else []), lr=opt.param_groups[0]["lr"])
            buf.seek(0)
            opt.load_state_dict(torch.load(buf))
        elif op == "add_group" and not added:
            opt.add_param_group(group(late))
            added = True
        elif op == "bad_group":
            # a group that repeats a parameter is refused (torch's own error), and the optimizer is unchanged
            n_groups = len(opt.param_groups)
            with pytest.raises(ValueError, match="more than one parameter group|more than one LoRA pair"):
                opt.add_param_group(group(base[:1]))
            assert len(opt.param_groups) == n_groups
        trace.append([p.detach().clone() for p in model.parameters()])
    return trace


SEQUENCE_MODES = [dict(mode="sds", warmup_steps=2), dict(mode="sds", warmup_steps=0), dict(mode="sds_polar"),
                  dict(mode="scaled"), dict(mode="lora", foreach=True), dict(mode="lorapro")]


@pytest.mark.parametrize("kw", SEQUENCE_MODES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@settings(max_examples=15, deadline=None)
@given(ops=st.lists(OPS, min_size=1, max_size=10))
def test_api_sequences_match_the_uninterrupted_trajectory(kw, ops):
    """Any sequence of steps, closures, LoRA-FA steps, pairs without grads, zero_grad, lr changes (0 included),
    mid-run param groups and refused groups: save/load and closures change nothing (bit for bit), and
    parameters stay finite."""
    got = run_sequence(ops, kw, interrupted=True)
    want = run_sequence(ops, kw, interrupted=False)
    for after_got, after_want in zip(got, want):
        for p, q in zip(after_got, after_want):
            assert torch.isfinite(p).all()
            assert torch.equal(p, q)


@settings(max_examples=15, deadline=None)
@given(ops=st.lists(OPS, min_size=1, max_size=10))
def test_api_sequences_of_mode_lora_are_torch_adamw(ops):
    """Mode ``lora`` under the same sequences (save/load and closures included) is ``torch.optim.AdamW``
    (float64, uninterrupted), bit for bit."""
    got = run_sequence(ops, dict(mode="lora", foreach=False), interrupted=True)
    want = run_sequence(ops, {}, interrupted=False, adamw=True)
    for after_got, after_want in zip(got, want):
        for p, q in zip(after_got, after_want):
            assert torch.equal(p, q)


def test_lr_scheduler_to_zero_freezes_parameters_but_not_moments():
    """A scheduler that sets lr = 0 leaves the parameters (weight decay is lr-scaled, as in AdamW) while the
    moments keep accumulating; in sds's coordinates too (the re-balance is skipped at lr = 0)."""
    model = fresh(dtype=F64)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=1, coordinate_ramp=10)  # re-split at step 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if 1 <= step <= 3 else 1.0)
    data = make_data(dtype=F64)
    for step in range(6):
        opt.zero_grad()
        backward(model, data)
        before = [p.clone() for p in model.parameters()]
        moment = opt.state[model.extra].get("exp_avg", torch.zeros(3, dtype=F64)).clone()
        opt.step()
        sched.step()
        frozen = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert frozen == (1 <= step <= 3), step
        assert not torch.equal(opt.state[model.extra]["exp_avg"], moment)
    assert opt.state[model.l1.lora_A["default"].weight]["sds_warmup"] == 6  # warm-up 1, then the ramp's count
