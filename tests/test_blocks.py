"""Stacked LoRA factors paired per block (sdsopt.blocks): loralib's MergedLinear and a layer with LitGPT's
LoRAQKVLinear layout (unequal q / v blocks, as under grouped-query attention) train exactly as the same blocks
given as explicit pairs, resume bit for bit from a checkpoint, and are refused, with the fix, where a group's
options cannot step them per block.  LitGPT itself: tests/test_litgpt.py (CI's LitGPT env)."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from torch import nn

from block_reference import train, train_explicit
from conftest import LoraLinear
from sdsopt import PairingNotice, SDSAdamW

loralib = pytest.importorskip("loralib")

N, R = 12, 2


class GroupedQKV(nn.Module):
    """LitGPT's ``LoRAQKVLinear`` layout under grouped-query attention, LoRA on q and v: ``lora_A`` holds the two
    blocks' ``r`` rows each, ``lora_B`` q's 16 rows then v's 8 (``qkv_shapes``), and each block's output lands in
    its rows of the fused q | k | v output (16 | 8 | 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(N, 32).requires_grad_(False)
        self.enable_lora = [True, False, True]
        self.qkv_shapes = [16, 8]
        self.lora_A = nn.Parameter(torch.randn(2 * R, N) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(24, R) * 0.3)
        self.register_buffer("index", torch.cat([torch.arange(16), torch.arange(24, 32)]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        after_a = x @ self.lora_A.T
        parts = [a @ b.T for a, b in zip(after_a.chunk(2, dim=-1), self.lora_B.split(self.qkv_shapes))]
        delta = torch.zeros(*x.shape[:-1], 32, dtype=x.dtype).index_copy(-1, self.index, torch.cat(parts, -1))
        return self.linear(x) + delta


def merged() -> nn.Module:
    layer = loralib.MergedLinear(N, 24, r=R, enable_lora=[True, False, True])
    loralib.mark_only_lora_as_trainable(layer)
    nn.init.normal_(layer.lora_B, std=0.3)  # (loralib starts B at 0; the blocks' Grams need both factors)
    return layer


LAYERS = {"merged": (merged, [8, 8]), "grouped_qkv": (GroupedQKV, [16, 8])}


def model_of(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[kind][0]()
    out = 32 if kind == "grouped_qkv" else 24
    return nn.Sequential(layer, nn.Tanh(), LoraLinear(out, 5, r=3, zero_b=False))


X = torch.randn(16, N, generator=torch.Generator().manual_seed(1))


def loss(model: nn.Module) -> torch.Tensor:
    return model(X).pow(2).mean()


def build(model: nn.Module, **options) -> tuple[SDSAdamW, list[str]]:
    """``SDSAdamW(model.parameters())`` as LitGPT builds it, and the UserWarnings it gave (not the notice)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = SDSAdamW([p for p in model.parameters() if p.requires_grad], **options)
    return opt, [str(w.message) for w in rec if issubclass(w.category, UserWarning)
                 and not issubclass(w.category, PairingNotice)]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_each_block_is_a_pair_and_nothing_is_left_to_adamw(kind):
    model = model_of(kind)
    opt, said = build(model, lr=1e-2)
    q, v = LAYERS[kind][1]
    assert said == []
    assert [(p.name_a, p.name_b, p.m, p.n, p.r) for p in opt.lora_pairs] == [
        ("2.lora_A.default.weight", "2.lora_B.default.weight", 5, 32 if kind == "grouped_qkv" else 24, 3),
        ("0.lora_A[0:2]", f"0.lora_B[0:{q}]", q, N, R),
        ("0.lora_A[2:4]", f"0.lora_B[{q}:{q + v}]", v, N, R),
    ]
    assert [(p.rows_a, p.rows_b) for p in opt.lora_pairs[1:]] == [((0, 2), (0, q)), ((2, 4), (q, q + v))]


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("options", [{"mode": "sds", "warmup_steps": 2}, {"mode": "sds", "warmup_steps": 0},
                                     {"mode": "sds_polar"}, {"mode": "scaled"}, {"mode": "lorapro"},
                                     {"mode": "lora", "b_lr_ratio": 4.0}, {"mode": "sds_muon", "warmup_steps": 0}],
                         ids=str)
def test_training_matches_the_blocks_as_explicit_pairs(kind, options):
    """Every step (the warm-up, its re-split, the coordinate steps) equals SDSAdamW's on the blocks given as
    separate tensors: the views step as any pair, their writes land in the parameters."""
    options = {"lr": 2e-2, **options}
    model, twin = model_of(kind), model_of(kind)
    layer, twin_layer = model[0], twin[0]
    rows = LAYERS[kind][1]
    opt, _ = build(model, **options)
    got = train(model, opt, loss, 6)
    want = train_explicit(twin, [(twin_layer.lora_A, twin_layer.lora_B, rows)], loss, 6, **options)
    assert got == pytest.approx(want, rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert got[-1] < got[0]
    assert not torch.equal(layer.lora_A, model_of(kind)[0].lora_A)  # (trained: the writes landed)


def test_a_checkpoint_resumes_bit_for_bit():
    """state_dict after 3 of 6 steps (through torch.save), loaded into a new optimizer of the model as it was then:
    the next 3 steps equal the uninterrupted run's; the state's keys are the model's parameters alone."""
    model = model_of("grouped_qkv")
    opt, _ = build(model, lr=2e-2, warmup_steps=2)
    train(model, opt, loss, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = copy.deepcopy(model)
    train(model, opt, loss, 3)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert set(saved["state"]) == set(range(len(opt.param_groups[0]["params"])))
    assert set(saved["state"][0]) == {"blocks"} and set(saved["state"][0]["blocks"]) == {0, 1}
    again, _ = build(resumed, lr=2e-2, warmup_steps=2)
    again.load_state_dict(saved)
    train(resumed, again, loss, 3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for key in ("exp_avg", "exp_avg_sq", "sds_warmup"):
        assert all(torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])) for a, b in
                   zip(opt.state[model[0].lora_A]["blocks"].values(), again.state[resumed[0].lora_A]["blocks"].values()))


def test_a_checkpoint_of_other_blocks_is_refused():
    """A checkpoint whose stacked factors hold other blocks (here loralib's 8 | 8 rows for LitGPT's 16 | 8) is
    refused before anything changes, naming the layers."""
    opt, _ = build(model_of("grouped_qkv"), lr=1e-2)
    other, _ = build(model_of("merged"), lr=1e-2)
    with pytest.raises(ValueError, match=r"param group 0 of the checkpoint has stacked LoRA factors \[\(0, 1, \(8, 8\)\)\]"):
        opt.load_state_dict(other.state_dict())


def test_the_views_keep_no_gradient_after_the_step():
    """zero_grad(set_to_none=True) frees the parameters' gradients: the blocks' views of them are dropped."""
    model = model_of("merged")
    opt, _ = build(model, lr=1e-2)
    train(model, opt, loss, 1)
    grad = weakref.ref(model[0].lora_A.grad)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert grad() is None


def test_diagnostics_report_each_block():
    model = model_of("grouped_qkv")
    opt, _ = build(model, lr=1e-2, warmup_steps=2)
    train(model, opt, loss, 3)
    rows = opt.diagnostics()["pairs"]
    assert [(r["name"], r["phase"]) for r in rows] == [("2.lora_A.default.weight", "coordinates"),
                                                        ("0.lora_A[0:2]", "coordinates"),
                                                        ("0.lora_A[2:4]", "coordinates")]


@pytest.mark.parametrize("options, named", [({"gradient_start": True}, "gradient_start=True"),
                                            ({"mode": "svd_oracle"}, "mode='svd_oracle'")])
def test_options_that_need_each_pairs_own_inputs_are_refused(options, named):
    model = model_of("merged")
    with pytest.raises(ValueError, match=rf"'0.lora_A' / '0.lora_B' stack 2 LoRA pairs .*{named}"):
        SDSAdamW(model.named_parameters(), lr=1e-2, **options)
