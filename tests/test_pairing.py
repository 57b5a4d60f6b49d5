"""Pairing where users train: unnamed parameters (model.parameters(), unnamed groups) named from their modules,
the names of every common LoRA stack, stacked factors of an unknown layer, and clear errors for bad options and patterns."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from sdsopt import PairingNotice, SDSAdamW, regex_pairing
from sdsopt.naming import find_names


class Adapted(nn.Module):
    """A frozen linear layer with a LoRA branch whose factors are named ``lora_<a>``/``lora_<b>``, as
    ``nn.Linear`` children (torchtune: a/b; kohya, LyCORIS, musubi: down/up) or as bare parameters
    (loralib: A/B)."""

    def __init__(self, n: int, m: int, r: int, a: str, b: str, bare: bool = False) -> None:
        super().__init__()
        self.base = nn.Linear(n, m, bias=False).requires_grad_(False)
        self.names = (a, b)
        if bare:
            setattr(self, f"lora_{a}", nn.Parameter(torch.randn(r, n) / n**0.5))
            setattr(self, f"lora_{b}", nn.Parameter(torch.zeros(m, r)))
        else:
            setattr(self, f"lora_{a}", nn.Linear(n, r, bias=False))
            setattr(self, f"lora_{b}", nn.Linear(r, m, bias=False))
            nn.init.zeros_(getattr(self, f"lora_{b}").weight)

    def factor(self, which: str) -> torch.Tensor:
        f = getattr(self, f"lora_{which}")
        return f.weight if isinstance(f, nn.Linear) else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.names
        return self.base(x) + x @ self.factor(a).T @ self.factor(b).T


def stack(a: str, b: str, bare: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Adapted(12, 16, 3, a, b, bare), nn.Tanh(), Adapted(16, 5, 2, a, b, bare))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 8) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 12, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


STACKS = [("A", "B", False), ("a", "b", False), ("down", "up", False), ("A", "B", True)]
KW = dict(lr=1e-2, warmup_steps=2, weight_decay=0.01)


@pytest.mark.parametrize("a,b,bare", STACKS, ids=["peft-like", "torchtune", "kohya", "loralib"])
def test_unnamed_parameters_pair_as_named_and_step_bit_identically(a, b, bare):
    """model.parameters(), the trainable ones only, and unnamed param groups give the named run's pairs and its
    parameters bit for bit (past the warm-up and re-split)."""
    named_model = stack(a, b, bare)
    named = SDSAdamW(named_model.named_parameters(), **KW)
    assert len(named.lora_pairs) == 2
    train(named_model, named)
    for build in (lambda m: m.parameters(), lambda m: [p for p in m.parameters() if p.requires_grad],
                  lambda m: [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters())}]):
        model = stack(a, b, bare)
        with pytest.warns(PairingNotice, match=r"paired 2 LoRA pair\(s\) by name") as rec:
            opt = SDSAdamW(build(model), **KW)
        assert len([w for w in rec if w.category is PairingNotice]) == 1
        assert [(p.name_a, p.name_b) for p in opt.lora_pairs] == [(p.name_a, p.name_b) for p in named.lora_pairs]
        train(model, opt)
        for p, q in zip(model.parameters(), named_model.parameters()):
            assert torch.equal(p, q)


def test_peft_model_parameters_pair_by_default():
    peft = pytest.importorskip("peft")
    from sdsopt.lab.tasks.text import tiny_gpt2

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(tiny_gpt2(layers=1, width=16, heads=2, block=8, seed=0),
                                       peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))

    named_model, model = build(), build()
    named = SDSAdamW(named_model.named_parameters(), lr=1e-2, warmup_steps=1)
    with pytest.warns(PairingNotice, match="lora_A/lora_B: 1"):
        opt = SDSAdamW(model.parameters(), lr=1e-2, warmup_steps=1)
    assert [p.name_a for p in opt.lora_pairs] == [p.name_a for p in named.lora_pairs] != []
    ids = torch.arange(16).reshape(2, 8)
    for m, o in ((named_model, named), (model, opt)):
        for _ in range(4):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
    for p, q in zip(model.parameters(), named_model.parameters()):
        assert torch.equal(p, q)


def test_a_full_bottleneck_mlp_gets_no_pairs():
    """Shapes that chain (16→4→16, bias-free) are not LoRA without LoRA's names: trained in full, as AdamW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4, bias=False), nn.ReLU(), nn.Linear(4, 16, bias=False))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="no LoRA pairs.*No parameter name matched"):
        opt = SDSAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    assert opt.lora_pairs == []
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    for m, o in ((model, opt), (ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False))):
        for x in xs:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_bare_tensors_stay_unnamed():
    A, B = nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.zeros(5, 2))
    assert find_names([A, B]) == [None, None]
    with pytest.warns(UserWarning, match="no module holds them"):
        SDSAdamW([A, B])


def test_names_follow_the_outermost_module_and_survive_pickling():
    model = stack("down", "up")
    inner_only = list(model[0].parameters())
    assert find_names(inner_only) == ["0.base.weight", "0.lora_down.weight", "0.lora_up.weight"]
    with pytest.warns(PairingNotice):
        opt = SDSAdamW(model.parameters(), lr=1e-2)
    clone = pickle.loads(pickle.dumps((model, opt)))[1]
    assert [(p.name_a, p.r) for p in clone.lora_pairs] == [("0.lora_down.weight", 3), ("2.lora_down.weight", 2)]


def test_stacked_factors_of_an_unknown_layer_are_left_to_adamw_with_a_fix():
    """Stacked factors (k equal blocks of r rows) in a layer that is neither LitGPT's LoRAQKVLinear nor loralib's
    MergedLinear (those pair per block: tests/test_blocks.py): plain AdamW, and the warning says how to get SDS."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.lora_A, layer.lora_B = nn.Parameter(torch.randn(4, 12)), nn.Parameter(torch.randn(24, 2))
    with pytest.warns(UserWarning, match=r"layout of 2 LoRA pairs of rank 2 stacked .* plain AdamW"):
        opt = SDSAdamW(layer.named_parameters(), lr=1e-2)
    assert opt.lora_pairs == []
    layer.lora_A.grad, layer.lora_B.grad = torch.ones(4, 12), torch.ones(24, 2)
    twin = [p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B)]
    for p, q in zip(twin, (layer.lora_A, layer.lora_B)):
        p.grad = q.grad.clone()
    opt.step()
    torch.optim.AdamW(twin, lr=1e-2).step()
    assert all(torch.equal(p, q) for p, q in zip(twin, (layer.lora_A, layer.lora_B)))


@pytest.mark.parametrize("pattern,a", [(r"(?:^|\.)lora_(?P<factor>down|up)\.", "down"),
                                       (r"(?:^|\.)lora_(?P<factor>a|b)\.", "a"),
                                       (r"(?:^|\.)lora_(?P<factor>[ab])\.", "a")])
def test_string_patterns_read_any_two_values_first_is_a(pattern, a):
    b = {"down": "up", "a": "b"}[a]
    model = stack(a, b)
    opt = SDSAdamW(model.named_parameters(), pairing=pattern)
    assert [(p.name_a, p.name_b) for p in opt.lora_pairs] == [(f"0.lora_{a}.weight", f"0.lora_{b}.weight"),
                                                                 (f"2.lora_{a}.weight", f"2.lora_{b}.weight")]


def test_bad_patterns_name_the_pattern():
    with pytest.raises(ValueError, match=r"pairing pattern '\(\?P<factor>down' is not a valid regular"):
        SDSAdamW(stack("A", "B").named_parameters(), pairing="(?P<factor>down")
    with pytest.raises(ValueError, match=r"cannot read which value.*regex_pairing\(pattern, a="):
        regex_pairing(r"lora_(?P<factor>\w+)\.")
    with pytest.raises(ValueError, match="needs a named group"):
        regex_pairing(r"lora_(down|up)")
    with pytest.raises(ValueError, match="pairing must be None"):
        SDSAdamW(stack("A", "B").named_parameters(), pairing=3)
    assert regex_pairing(r"lora_(?P<factor>\w+)\.", a="in", b="out")(["x.lora_in.w", "x.lora_out.w"]) == \
        [("x.lora_in.w", "x.lora_out.w")]


def test_swapped_roles_warn():
    A, B = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4, 8))  # r = 8 > m = n = 4: swapped
    with pytest.warns(UserWarning, match="may be swapped"):
        SDSAdamW([{"params": [A, B], "lora_pairs": [(A, B)]}], infer_names=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A, B = nn.Parameter(torch.randn(2, 4)), nn.Parameter(torch.randn(4, 2))
        SDSAdamW([{"params": [A, B], "lora_pairs": [(A, B)]}], infer_names=False)


@pytest.mark.parametrize("option,value", [("lr", "1e-3"), ("eps", "1e-8"), ("weight_decay", "0.01"),
                                          ("betas", ("0.9", "0.999")), ("betas", "0.9"), ("step_damping", "1"),
                                          ("damping", None), ("rank_tol", "0.1"), ("amsgrad", "False"),
                                          ("maximize", 1), ("foreach", "yes"), ("mode", 3), ("warmup_steps", 2.5),
                                          ("eps", -1.0), ("infer_names", "True")])
def test_options_of_the_wrong_type_name_the_option(option, value):
    with pytest.raises(ValueError, match=rf"\b{option}="):
        SDSAdamW(stack("A", "B").named_parameters(), **{option: value})


def test_accelerate_prepare_keeps_the_pairs_and_trains():
    """accelerate (a dependency of transformers' Trainer): the optimizer built from model.parameters() before
    prepare() keeps its pairs through the AcceleratedOptimizer wrapper, and the loss goes down."""
    accelerate = pytest.importorskip("accelerate")
    model = stack("a", "b")
    with pytest.warns(PairingNotice):
        opt = SDSAdamW(model.parameters(), lr=1e-2, warmup_steps=2)
    accelerator = accelerate.Accelerator(cpu=True)
    model, wrapped = accelerator.prepare(model, opt)
    assert len(wrapped.optimizer.lora_pairs) == 2
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(10):
        wrapped.zero_grad()
        loss = (model(x) - 1).pow(2).mean()
        accelerator.backward(loss)
        wrapped.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
