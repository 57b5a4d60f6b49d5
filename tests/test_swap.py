"""Issue 34: the swap that cannot silently do nothing.  Every way ``SDSAdamW`` would train nothing, or crash, says
so once with cause and fix (built before the PEFT wrap, all frozen, a lone factor, rank 0, frozen pairs), and an
AdamW checkpoint resumes in SDSAdamW (and a ``lora`` one in AdamW) where the mathematics allows it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sdsopt import SDSAdamW

from conftest import fresh, train

peft = pytest.importorskip("peft")


class Base(nn.Module):
    """A tiny model for PEFT to wrap: one target layer ``lin`` and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)))


def wrap(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lin"], **kw))


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def build(*args, **kw) -> tuple[SDSAdamW, list[str]]:
    """The optimizer and every warning its construction gave."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = SDSAdamW(*args, **kw)
    return opt, messages(rec)


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return messages(rec)


# ----------------------------------------------------------------------------- nothing would train
def test_built_before_get_peft_model_names_the_cause_and_the_fix():
    torch.manual_seed(0)
    base = Base()
    opt, said = build(base.parameters(), lr=1e-2)
    assert len(said) == 1 and "No parameter name matched" in said[0]
    assert "get_peft_model" in said[0] and "optimizer_cls_and_kwargs" in said[0]
    model = wrap(base)  # freezes the base weights the optimizer holds, adds LoRA factors it does not
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 16)
    said = step(model, opt, x)
    assert len(said) == 1, said
    assert "frozen now" in said[0] and "wrapped after the optimizer was built" in said[0]
    assert "PeftModel" in said[0] and "lora_A.default.weight" in said[0]
    assert "optimizer_cls_and_kwargs" in said[0] and "no LoRA pairs" not in said[0]
    assert step(model, opt, x) == []  # said once
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the fix: built after wrapping, it pairs and trains the adapter
    opt, said = build(model.parameters(), lr=1e-2)
    assert len(opt.lora_pairs) == 1 and all("frozen" not in s for s in said)


def test_all_frozen_parameters_warn_once_that_nothing_will_train():
    model = wrap(Base())
    for p in model.parameters():
        p.requires_grad_(False)
    opt, said = build(model.parameters(), lr=1e-2)
    assert len(said) == 1 and "all 6 parameters given are frozen" in said[0]
    assert "its 1 LoRA pair(s) included" in said[0] and "nothing will train" in said[0]
    assert step_no_grad(opt) == []  # not said again at the first step


def step_no_grad(opt: SDSAdamW) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()
    return messages(rec)


def test_only_lora_b_gets_one_message_without_the_misleading_no_pairs():
    model = wrap(Base())
    _, said = build([(n, p) for n, p in model.named_parameters() if "lora_B" in n])
    assert len(said) == 1, said
    assert "without their partner" in said[0] and "behaves exactly as torch.optim.AdamW" in said[0]
    assert "pairing=" not in said[0]


def test_merged_linear_alone_is_paired_per_block_without_a_warning():
    """loralib's MergedLinear (q and v of one layer): two pairs, one per block, and no warning (issue 45)."""
    loralib = pytest.importorskip("loralib")
    model = nn.Sequential(loralib.MergedLinear(12, 24, r=2, enable_lora=[True, False, True]))
    loralib.mark_only_lora_as_trainable(model)
    opt, said = build(model.parameters(), lr=1e-2)
    assert [p.name_a for p in opt.lora_pairs] == ["0.lora_A[0:2]", "0.lora_A[2:4]"]
    assert len(said) == 1 and said[0].startswith("SDSAdamW: the parameters came without names") and "2 LoRA pair(s)" in said[0]


# ----------------------------------------------------------------------------- rank 0
@pytest.mark.parametrize("warmup", [0, 10])
@pytest.mark.parametrize("explicit", [False, True])
def test_rank_zero_pairs_step_as_adamw_bit_for_bit(warmup, explicit):
    torch.manual_seed(0)
    A, B = nn.Parameter(torch.randn(0, 16)), nn.Parameter(torch.zeros(24, 0))
    W, b = nn.Parameter(torch.randn(2, 24)), nn.Parameter(torch.randn(2))
    if explicit:
        params = [{"params": [A, B, W, b], "lora_pairs": [(A, B)]}]
    else:
        params = list(zip(["l.lora_A.default.weight", "l.lora_B.default.weight", "head.weight", "head.bias"],
                          [A, B, W, b]))
    opt, said = build(params, lr=1e-2, warmup_steps=warmup, infer_names=False)
    assert opt.lora_pairs == [] and len(said) == 1 and "rank 0" in said[0], said
    ref = [nn.Parameter(t.detach().clone()) for t in (A, B, W, b)]
    adamw = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        grads = [torch.randn(p.shape, generator=gen) for p in ref]
        for ps, o in (((A, B, W, b), opt), (ref, adamw)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip((A, B, W, b), ref))


# ----------------------------------------------------------------------------- the pairing notice
def two_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = wrap(Base())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["lin", "head"]))
    return model  # "default" (1 pair) trainable, "other" (2 pairs) frozen


def test_frozen_pairs_are_not_counted_and_not_stepped():
    model = two_adapters()
    opt, said = build(model.parameters(), lr=1e-2, warmup_steps=2)
    assert len(said) == 1 and "paired 1 LoRA pair(s) by name" in said[0]
    assert "2 frozen pair(s) (requires_grad=False) are not counted" in said[0]
    assert len(opt.lora_pairs) == 3  # still paired: SDS once unfrozen (set_adapter)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    x = torch.randn(8, 16)
    for _ in range(4):
        assert step(model, opt, x) == []
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], p) and named[n] not in opt.state for n, p in frozen.items())


def test_every_pair_frozen_warns_that_the_adapters_do_not_train():
    model = wrap(Base(), modules_to_save=["head"])
    for n, p in model.named_parameters():
        p.requires_grad_("modules_to_save" in n)
    _, said = build(model.parameters(), lr=1e-2)
    assert len(said) == 1 and "all 1 LoRA pair(s) are frozen" in said[0], said


def test_explicit_pairs_are_not_reported_as_found_by_name():
    model = wrap(Base())
    lin = model.base_model.model.lin
    A, B = lin.lora_A.default.weight, lin.lora_B.default.weight
    opt, said = build([{"params": [A, B], "lora_pairs": [(A, B)]}])
    assert len(opt.lora_pairs) == 1 and said == []
    model = two_adapters()
    lin = model.base_model.model.lin
    A, B = lin.lora_A.other.weight, lin.lora_B.other.weight
    A.requires_grad_(True), B.requires_grad_(True)
    rest = [p for n, p in model.named_parameters() if p is not A and p is not B]
    opt, said = build([{"params": rest + [A, B], "lora_pairs": [(A, B)]}])
    assert len(said) == 1 and "paired 1 LoRA pair(s) by name (lora_A/lora_B: 1" in said[0]
    assert "and 1 given in lora_pairs" in said[0] and "1 frozen pair(s)" in said[0]


# ----------------------------------------------------------------------------- AdamW checkpoints
def adamw_run(steps: int, **kw) -> tuple[nn.Module, dict]:
    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False, **kw)
    train(model, opt, steps)
    return model, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("k", [1, 4, 9])
def test_adamw_checkpoint_in_the_warm_up_continues_an_uninterrupted_sds_run_bit_for_bit(k):
    model, saved = adamw_run(k)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=10)
    opt.load_state_dict(saved)
    train(model, opt, 20 - k)  # through the end of the warm-up, its re-split and coordinate steps
    ref = fresh()
    train(ref, SDSAdamW(ref.named_parameters(), lr=1e-2, warmup_steps=10), 20)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("resplit", [False, True])
def test_adamw_checkpoint_past_the_warm_up_takes_adamws_next_step_then_ends_the_warm_up(resplit):
    """k = 14 AdamW steps, warmup_steps = 4: the first step after loading is AdamW's 15th (bit for bit with
    resplit=False; with the re-split, BA and everything outside the pairs are AdamW's), then each pair's state
    is reset and its steps are in coordinates."""
    model, saved = adamw_run(14)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=4, resplit=resplit)
    opt.load_state_dict(saved)
    assert all(opt.state[model.get_parameter(p.name_a)]["sds_warmup"] == 3 for p in opt.lora_pairs)
    ref, _ = adamw_run(15)
    train(model, opt, 1)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if "lora_" not in name or not resplit:
            assert torch.equal(p, q), name
    for layer, other in ((model.l1, ref.l1), (model.l2, ref.l2)):
        ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(ba, other.lora_B["default"].weight @ other.lora_A["default"].weight)
    for pair in opt.lora_pairs:
        state = opt.state[model.get_parameter(pair.name_b)]
        assert state["sds_warmup"] == 4 and state["step"] == 0 and not state["exp_avg"].any()
    losses = train(model, opt, 10)
    assert losses[-1] < losses[0]


def test_adamw_checkpoint_with_no_warm_up_drops_the_pairs_moments_only():
    model, saved = adamw_run(5)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=0)
    opt.load_state_dict(saved)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p not in opt.state for p in lora)
    assert all(opt.state[p]["step"] == 5 for n, p in model.named_parameters() if "lora_" not in n)
    losses = train(model, opt, 8)
    assert losses[-1] < losses[0]


def test_adamw_checkpoint_into_lora_mode_and_back_continues_adamw_bit_for_bit():
    model, saved = adamw_run(6)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode="lora")
    opt.load_state_dict(saved)
    train(model, opt, 6)
    back = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))  # SDSAdamW(mode='lora') into AdamW
    train(model, back, 6)
    ref, _ = adamw_run(18)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_lora_mode_state_into_adamw_continues_like_sdsadamw_lora():
    model, ref = fresh(), fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode="lora")
    train(model, opt, 5)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adamw.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, adamw, 7)
    train(ref, SDSAdamW(ref.named_parameters(), lr=1e-2, mode="lora"), 12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("mode", ["sds_polar", "scaled", "lorapro"])
def test_adamw_checkpoint_into_a_rewriting_mode_is_refused(mode):
    model, saved = adamw_run(3)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, mode=mode)
    with pytest.raises(ValueError, match=rf"mode='{mode}' runs Adam on other gradients.*mode='sds'"):
        opt.load_state_dict(saved)
    assert not opt.state
    _, fresh_state = adamw_run(0)  # nothing stepped yet: nothing to refuse
    opt.load_state_dict(fresh_state)


def test_adam_with_coupled_weight_decay_and_other_models_are_refused_by_name():
    model = fresh()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, adam, 2)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="torch.optim.Adam's with weight_decay=0.1"):
        opt.load_state_dict(adam.state_dict())
    _, saved = adamw_run(2)
    smaller = fresh()
    smaller.l1 = type(smaller.l1)(8, 16, 6)
    opt = SDSAdamW(smaller.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"'l1\.lora_A\.default\.weight' is \(6, 8\) but the checkpoint's exp_avg"):
        opt.load_state_dict(saved)


def test_sds_state_in_its_warm_up_into_adamw_continues_adamw_bit_for_bit():
    """The other way round within the warm-up (past it the moments are of coordinates: not for AdamW, README)."""
    model = fresh()
    opt = SDSAdamW(model.named_parameters(), lr=1e-2, warmup_steps=10)
    train(model, opt, 4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    adamw.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, adamw, 4)
    ref, _ = adamw_run(8)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
