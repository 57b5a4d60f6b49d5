"""The one-line swap on real PEFT models built from transformers configs (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from sdsopt import SDSAdamW  # noqa: E402
from sdsopt.lab.tasks.text import batch_iterator, lm_loss, load_corpus, tiny_gpt2  # noqa: E402


def lora_gpt2(**lora_kw):
    model = tiny_gpt2(layers=2, width=32, heads=2, block=32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             **lora_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def count_lora_modules(model) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A.default"))


@pytest.mark.slow  # long: outside the inner loop (pytest -m "not slow")
def test_peft_gpt2_one_line_swap_trains():
    model = lora_gpt2()
    opt = SDSAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.01)  # was: torch.optim.AdamW(...)
    assert len(opt.lora_pairs) == count_lora_modules(model) == 2 * 4
    data = load_corpus("pydoc", max_bytes=50_000)
    batches = batch_iterator(data, 32, 8, torch.Generator().manual_seed(0))
    fixed = next(batches)
    before = lm_loss(model, fixed).item()
    for _ in range(30):
        opt.zero_grad()
        lm_loss(model, next(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = lm_loss(model, fixed).item()
    assert after < before - 0.05  # random-init GPT-2, LoRA only: AdamW gets 5.51 -> 5.42 here too
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p not in opt.state for p in frozen)


def test_peft_embedding_and_conv_pairs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.conv = nn.Conv2d(3, 6, 3)
            self.head = nn.Linear(6, 2)

        def forward(self, ids, img):
            return self.head(self.conv(img).mean((-1, -2)) + self.emb(ids).mean(1)[:, :6])

    config = peft.LoraConfig(r=2, target_modules=["emb", "conv"], init_lora_weights="gaussian")
    model = peft.get_peft_model(Net(), config)
    opt = SDSAdamW(model.named_parameters(), lr=1e-2)
    shapes = sorted((p.m, p.n, p.r) for p in opt.lora_pairs)
    assert shapes == [(6, 27, 2), (8, 20, 2)]
    ids, img = torch.randint(0, 20, (4, 5)), torch.randn(4, 3, 8, 8)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(ids, img).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_several_adapters_pair_separately_and_only_active_moves():
    model = lora_gpt2()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    # PEFT freezes inactive adapters; make both trainable to check pairing across adapter names
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if "lora_" in n], lr=1e-2)
    adapters = sorted({p.name_a.split("lora_A.")[1].split(".")[0] for p in opt.lora_pairs})
    assert adapters == ["default", "other"]
    assert all(p.name_b == p.name_a.replace("lora_A", "lora_B") for p in opt.lora_pairs)
    assert {p.r for p in opt.lora_pairs if ".other." in p.name_a} == {2}
    other = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    tokens = load_corpus("pydoc", max_bytes=5_000)[:64].long().view(2, 32)
    lm_loss(model, tokens).backward()  # only the active adapter ("default") gets gradients
    opt.step()
    assert all(torch.equal(p, other[n]) for n, p in model.named_parameters() if n in other)


def test_psilora_on_peft_gpt2_jacobi_step_is_scaled_gd_on_autograd_grads():
    """PSILoRA on a PEFT model (GPT-2's Conv1D layers, lora_dropout 0.1): with K = 0 each pair moves by exactly
    scaled gradient descent on autograd's own factor gradients, A − lr(BᵀB + λI)^{-1}gA and
    B − lr·gB(AAᵀ + λI)^{-1}, which PSILoRA never reads (it rebuilds G from the recorded rows, dropout mask
    included); then training lowers the loss, also under CPU bf16 autocast."""
    from sdsopt import PSILoRA

    torch.manual_seed(0)
    model = lora_gpt2(lora_dropout=0.1)
    with torch.no_grad():  # B ≠ 0, so that both factors move at the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    lr, lmbd = 0.05, 0.01
    opt = PSILoRA(model, lr=lr, lookahead_iters=0, lmbd=lmbd)
    assert len(opt.param_groups[0]["lora_pairs"]) == count_lora_modules(model) == 8
    data = load_corpus("pydoc", max_bytes=50_000)
    batches = batch_iterator(data, 32, 8, torch.Generator().manual_seed(0))
    lm_loss(model, next(batches)).backward()
    named = dict(model.named_parameters())
    expected, lam = {}, lr * lmbd
    for name in named:
        if ".lora_A." in name:
            A, B = named[name], named[name.replace(".lora_A.", ".lora_B.")]
            eye = torch.eye(A.shape[0])
            expected[name] = A - lr * torch.linalg.solve(B.T @ B + lam * eye, A.grad)
            expected[name.replace(".lora_A.", ".lora_B.")] = B - lr * torch.linalg.solve(
                A @ A.T + lam * eye, B.grad.T).T
    opt.step()
    for name, want in expected.items():
        torch.testing.assert_close(named[name], want.detach(), rtol=1e-4, atol=1e-6, msg=name)
    fixed = next(batches)
    before = lm_loss(model, fixed).item()
    for k in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k % 2 == 1):
            loss = lm_loss(model, next(batches))
        loss.backward()
        opt.step()
    assert lm_loss(model, fixed).item() < before - 0.05
