"""LitGPT's one-line swap, ``litgpt finetune_lora ... --optimizer sdsopt.SDSAdamW``: LitGPT builds the optimizer
itself (``litgpt.utils.instantiate_torch_optimizer`` on ``model.parameters()``), and its ``LoRAQKVLinear`` stacks
the q / k / v blocks' factors in one ``lora_A`` and one ``lora_B``, which SDSAdamW pairs per block
(sdsopt.blocks).  A tiny LitGPT model with LoRA on q and v (and k, under grouped-query attention) and the MLP.

litgpt 0.5.13 pins huggingface-hub < 1.4, the project's transformers needs >= 2.4: this file runs in CI's own
LitGPT environment (.ci/run) and is skipped wherever litgpt is not installed."""

from __future__ import annotations

import warnings

import pytest
import torch

from block_reference import train, train_explicit
from sdsopt import PairingNotice, SDSAdamW

litgpt_lora = pytest.importorskip("litgpt.lora")
from litgpt.utils import instantiate_torch_optimizer  # noqa: E402

HEAD = 8  # head_size: n_embd 32 over 4 heads


def tiny(n_query_groups: int, key: bool) -> torch.nn.Module:
    """A 2-layer LitGPT with LoRA (r = 4) on q, v (k too where ``key``) and the LLaMA MLP, B drawn nonzero so that
    every factor moves from the first step; the rest frozen by LitGPT's own ``mark_only_lora_as_trainable``."""
    torch.manual_seed(0)
    config = litgpt_lora.Config(n_layer=2, n_head=4, n_query_groups=n_query_groups, n_embd=32, block_size=16,
                                vocab_size=64, padded_vocab_size=64, mlp_class_name="LLaMAMLP",
                                intermediate_size=48, bias=False, lora_r=4, lora_alpha=8, lora_query=True,
                                lora_key=key, lora_value=True, lora_mlp=True)
    model = litgpt_lora.GPT(config)
    litgpt_lora.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model


TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def loss(model: torch.nn.Module) -> torch.Tensor:
    logits = model(TOKENS[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), TOKENS[:, 1:].reshape(-1))


def qkv_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, litgpt_lora.LoRAQKVLinear)]


CASES = {"mha_qv": (4, False, [32, 32]), "gqa_qkv": (2, True, [32, 16, 16])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_litgpt_builds_sdsadamw_and_pairs_each_qkv_block(case):
    """``instantiate_torch_optimizer("sdsopt.SDSAdamW", model.parameters(), ...)``: the MLP's pairs, then one pair
    per enabled block of each ``LoRAQKVLinear`` (rows i·r… of lora_A, the block's rows of lora_B), no warning."""
    groups, key, rows = CASES[case]
    model = tiny(groups, key)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = instantiate_torch_optimizer("sdsopt.SDSAdamW", model.parameters(), lr=1e-2, warmup_steps=2)
    assert isinstance(opt, SDSAdamW)
    said = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(said) == 1 and issubclass(rec[0].category, PairingNotice), said
    assert [layer.qkv_shapes for layer in qkv_layers(model)] == [rows, rows]
    blocks = [(p.name_a, p.name_b, p.m, p.n, p.r) for p in opt.lora_pairs if p.rows_a]
    want = []
    for layer in range(2):
        start = 0
        for i, m in enumerate(rows):
            prefix = f"transformer.h.{layer}.attn.qkv"
            want.append((f"{prefix}.lora_A[{4 * i}:{4 * i + 4}]", f"{prefix}.lora_B[{start}:{start + m}]", m, 32, 4))
            start += m
    assert sorted(blocks) == sorted(want)
    by_layer = {name: layer for name, layer in model.named_modules() if isinstance(layer, litgpt_lora.LoRAQKVLinear)}
    for name, layer in by_layer.items():  # the blocks' B_i·A_i are LitGPT's own update of the layer
        spans = [(p.rows_a, p.rows_b) for p in opt.lora_pairs if p.name_a.startswith(f"{name}.lora_A[")]
        delta = torch.cat([layer.lora_B[b0:b1] @ layer.lora_A[a0:a1] for (a0, a1), (b0, b1) in spans]).detach()
        torch.testing.assert_close(layer.zero_pad(delta.T * layer.scaling).T, layer.get_lora_AB())
    whole = sorted(p.name_a for p in opt.lora_pairs if p.rows_a is None)
    assert whole == sorted(f"transformer.h.{i}.mlp.{fc}.lora_A" for i in range(2) for fc in ("fc_1", "fc_2", "proj"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_litgpt_training_matches_an_explicit_per_block_pairing(case):
    """A few steps through the warm-up into coordinates: the run of LitGPT's SDSAdamW equals the run where each
    block is an explicit pair of its own tensors (tests/block_reference.py), and its loss falls."""
    groups, key, rows = CASES[case]
    model, twin = tiny(groups, key), tiny(groups, key)
    options = {"lr": 1e-2, "warmup_steps": 2}
    opt = instantiate_torch_optimizer({"class_path": "sdsopt.SDSAdamW", "init_args": options}, model.parameters())
    got = train(model, opt, loss, 5)
    want = train_explicit(twin, [(layer.lora_A, layer.lora_B, rows) for layer in qkv_layers(twin)], loss, 5,
                          **options)
    assert got == pytest.approx(want, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert got[-1] < got[0]
