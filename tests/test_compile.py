"""``SDSAdamW.step`` under ``torch.compile`` (:mod:`sdsopt.compiled`): one custom operator in the graph, no graph
break, and the eager step's result bit for bit — also where the graph changes the gradients before the step and
AOTAutograd hands the operator copies."""

from __future__ import annotations

import pytest
import torch

from sdsopt import SDSAdamW
from conftest import fresh, make_data

BACKENDS = ["eager", "aot_eager"]  # (Inductor: the CPU test at the end, and the CUDA test with the kernels)


def _twins(mode="sds", device="cpu", **kw):
    """Two equal models with their optimizers, and data."""
    out = []
    for _ in range(2):
        model = fresh(zero_b=False).to(device)
        out.append((model, SDSAdamW(model.named_parameters(), lr=1e-2, mode=mode, **kw)))
    return out, tuple(t.to(device) for t in make_data())


def _backward(model, x, y):
    model.zero_grad(set_to_none=False)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


def _clipped(model, opt):
    """Gradient clipping, then the step: the gradients change in the graph before the step reads them."""

    def clipped_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()

    return clipped_step


def _compare(twins, data, compiled, steps, exact):
    """``steps`` steps of ``compiled`` (clipping + step of ``twins[0]``) against the same in eager on ``twins[1]``,
    parameters compared after every step: bit for bit (``exact``), or to float32 rounding."""
    (model, _), (twin, twin_opt) = twins
    for _ in range(steps):
        _backward(model, *data)
        compiled()
        _backward(twin, *data)
        _clipped(twin, twin_opt)()
        for a, b in zip(model.parameters(), twin.parameters()):
            if exact:
                assert torch.equal(a, b)
            else:  # (Inductor's clipping may round differently)
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sds", "scaled", "sds_polar"])
def test_the_step_is_one_graph_without_breaks_and_steps_as_eager(backend, mode):
    torch._dynamo.reset()
    twins, data = _twins(mode, warmup_steps=1) if mode == "sds" else _twins(mode)
    (model, opt), (twin, twin_opt) = twins
    _backward(model, *data)
    explained = torch._dynamo.explain(_clipped(model, opt))()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.load_state_dict(twin.state_dict())  # (explain ran the step once: start both again)
    opt.load_state_dict(twin_opt.state_dict())
    # warm-up step, then coordinates (mode sds)
    _compare(twins, data, torch.compile(_clipped(model, opt), fullgraph=True, backend=backend), 4, exact=True)
    for a, b in zip(opt.state.values(), twin_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b if torch.is_tensor(b[k]))


def test_a_closure_is_traced_and_its_loss_returned():
    torch._dynamo.reset()
    ((model, opt), (twin, twin_opt)), (x, y) = _twins()
    compiled = torch.compile(lambda: opt.step(lambda: _backward(model, x, y)), backend="aot_eager")
    for _ in range(2):
        loss = compiled()
        ref = twin_opt.step(lambda: _backward(twin, x, y))
        assert torch.equal(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_operator_is_left_out_of_inductors_cuda_graphs():
    """Tagged ``cudagraph_unsafe`` (where torch has the tag), so ``mode="reduce-overhead"`` cannot freeze the step's
    host decisions in a recording (the last CUDA test steps through ``sds``'s warm-up that way)."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert torch.Tag.cudagraph_unsafe in torch.ops.sdsopt.step_.default.tags


def test_a_deleted_optimizer_is_named_in_the_error():
    torch._dynamo.reset()
    ((model, opt), _), (x, y) = _twins()
    _backward(model, x, y)
    params = [p for p in model.parameters() if p.grad is not None]
    handle = opt.compile_handle
    del opt
    with pytest.raises(RuntimeError, match=f"no live SDSAdamW has handle {handle}"):
        torch.ops.sdsopt.step_(handle, params, [p.grad for p in params])


def test_compiled_training_step_with_opt_step_matches_eager():
    """torch.compile (Inductor) of a whole step (zero_grad, forward, backward, opt.step)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = fresh(zero_b=False)
        opt = SDSAdamW(model.named_parameters(), lr=1e-2)
        x, y = make_data()

        def step():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step) if compiled else step
        results.append([fn().item() for _ in range(4)] + [p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels under Inductor need CUDA")
@pytest.mark.parametrize("mode,compile_kw,kw", [
    ("sds", {"fullgraph": True}, {"warmup_steps": 0}),
    ("scaled", {"fullgraph": True}, {}),
    # Inductor's CUDA graphs around the step, through sds's warm-up and ramp (the operator is left out of them)
    ("sds", {"mode": "reduce-overhead"}, {"warmup_steps": 2, "coordinate_ramp": 2}),
])
def test_inductor_with_the_fused_kernels_steps_as_eager(mode, compile_kw, kw):
    torch._dynamo.reset()
    twins, data = _twins(mode, "cuda", fused=True, **kw)
    model, opt = twins[0]
    _compare(twins, data, torch.compile(_clipped(model, opt), **compile_kw), 6, exact=False)
