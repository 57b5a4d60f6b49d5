"""``b_lr_ratio`` (docs/math.md (2.7)): the B factor's step at ``b_lr_ratio·lr``.

* mode ``lora`` is LoRA+ exactly: bit for bit against PEFT's ``create_loraplus_optimizer`` around
  ``torch.optim.AdamW`` over several steps (weight decay on, B non-zero after the first step);
* mode ``sds``: one coordinate step of B at ratio λ is λ times the step at ratio 1 (float64, hypothesis-drawn
  shapes, ranks, ratios and decay), A's step unchanged; the warm-up's plain steps are LoRA+'s;
* the fused kernels take the same B step as the torch path;
* bad values are refused with the option's name.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdsopt import SDSAdamW, fused

peft = pytest.importorskip("peft")


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(12, 20)
        self.down = torch.nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _peft_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.0)
    return peft.get_peft_model(_MLP(), config)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 5, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("ratio,wd", [(16.0, 0.01), (4.0, 0.0), (2.5, 0.1)])
def test_lora_mode_is_peft_loraplus_bit_for_bit(ratio, wd):
    from peft.optimizers import create_loraplus_optimizer

    ref_model, model = _peft_model(), _peft_model()
    ref = create_loraplus_optimizer(ref_model, torch.optim.AdamW, lr=3e-3, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=wd)
    opt = SDSAdamW(model.named_parameters(), lr=3e-3, weight_decay=wd, mode="lora", b_lr_ratio=ratio)
    _train(ref_model, ref, 6)
    _train(model, opt, 6)
    moved = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), name
        moved += "lora_B" in name and bool(p.abs().max() > 0)
    assert moved == 2  # B left zero would make the test blind to B's lr


def test_lora_mode_ratio_differs_from_plain_adamw():
    """The ratio is not silently ignored: at λ = 4 B moves 4× as far on the first step (Adam's first step is
    sign-like, so |ΔB| = λ·lr where the gradient is not tiny)."""
    models = [_peft_model(), _peft_model()]
    opts = [SDSAdamW(m.named_parameters(), lr=1e-3, weight_decay=0.0, mode="lora", b_lr_ratio=ratio)
            for m, ratio in zip(models, (1.0, 4.0))]
    for m, o in zip(models, opts):
        _train(m, o, 1)
    for (name, p1), (_, p4) in zip(models[0].named_parameters(), models[1].named_parameters()):
        if "lora_B" in name:
            torch.testing.assert_close(p4, 4 * p1, rtol=1e-5, atol=0)
        elif p1.requires_grad:
            assert torch.equal(p1, p4), name


def _pair(m: int, n: int, r: int, seed: int) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(m, r, generator=g, dtype=torch.float64) / r**0.5
    return [("l.lora_A.default.weight", torch.nn.Parameter(A)), ("l.lora_B.default.weight", torch.nn.Parameter(B))]


def _one_step(named, seed: int, **kw) -> list[torch.Tensor]:
    named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    opt = SDSAdamW(named, **kw)
    g = torch.Generator().manual_seed(seed + 7)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    opt.step()
    return [p.detach() for _, p in named]


@settings(max_examples=25, deadline=None)
@given(m=st.integers(6, 24), n=st.integers(6, 24), r=st.integers(1, 6), ratio=st.sampled_from([0.25, 3.0, 16.0]),
       wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_sds_coordinate_step_of_b_scales_by_the_ratio(m, n, r, ratio, wd, seed):
    named = _pair(m, n, r, seed)
    A0, B0 = (p.detach() for _, p in named)
    kw = dict(lr=1e-2, weight_decay=wd, warmup_steps=0, rebalance=False)
    A1, B1 = _one_step(named, seed, **kw)
    Al, Bl = _one_step(named, seed, b_lr_ratio=ratio, **kw)
    assert torch.equal(A1, Al)
    # B' = B(1 − λ·lr·wd) + λ·(mapped change at ratio 1), (2.7); the step damping μ_s uses lr, not λ·lr
    change = B1 - B0 * (1 - 1e-2 * wd)
    torch.testing.assert_close(Bl, B0 * (1 - ratio * 1e-2 * wd) + ratio * change, rtol=1e-10, atol=1e-12)


def test_sds_warmup_steps_are_loraplus():
    """The warm-up's plain AdamW steps of ``sds`` are LoRA+'s steps (P7 with the ratio)."""
    a, b = _peft_model(), _peft_model()
    _train(a, SDSAdamW(a.named_parameters(), lr=3e-3, mode="sds", b_lr_ratio=8.0, warmup_steps=5), 4)
    _train(b, SDSAdamW(b.named_parameters(), lr=3e-3, mode="lora", b_lr_ratio=8.0), 4)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not fused.available(torch.empty(0, device=DEVICE)),
                    reason="the fused kernels need Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("mode", ["sds", "scaled"])
def test_fused_kernels_take_the_ratio(mode):
    named = [(n, p.detach().float()) for n, p in _pair(24, 20, 4, 3)]
    kw = dict(lr=1e-2, weight_decay=0.1, warmup_steps=0, mode=mode, b_lr_ratio=6.0)
    runs = []
    for flag in (False, True):
        params = [(n, torch.nn.Parameter(t.clone().to(DEVICE))) for n, t in copy.deepcopy(named)]
        opt = SDSAdamW(params, fused=flag, **kw)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
            opt.step()
        runs.append([p.detach().cpu() for _, p in params])
    for got, ref in zip(*runs):
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "16", True])
def test_bad_ratios_are_refused_by_name(value):
    with pytest.raises(ValueError, match="b_lr_ratio"):
        SDSAdamW(_pair(4, 4, 2, 0), b_lr_ratio=value)


def test_the_oracle_refuses_a_ratio():
    with pytest.raises(ValueError, match="b_lr_ratio.*svd_oracle"):
        SDSAdamW(_pair(4, 4, 2, 0), mode="svd_oracle", b_lr_ratio=2.0)


def test_a_checkpoint_from_before_the_option_resumes_at_ratio_one():
    """Param groups saved before ``b_lr_ratio`` existed lack the key: they load and step as ratio 1 (bit for
    bit with an uninterrupted run)."""
    a, b = _peft_model(), _peft_model()
    opt_a = SDSAdamW(a.named_parameters(), lr=3e-3, warmup_steps=2)
    opt_b = SDSAdamW(b.named_parameters(), lr=3e-3, warmup_steps=2)
    _train(a, opt_a, 3)
    _train(b, opt_b, 3)
    old = opt_b.state_dict()
    for group in old["param_groups"]:
        del group["b_lr_ratio"]
    opt_b.load_state_dict(old)
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
