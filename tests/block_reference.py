"""The reference for per-block pairing (sdsopt.blocks): the same training with every block of the stacked
factors given to ``SDSAdamW`` as an explicit pair of separate tensors (``lora_pairs``), their gradients copied
from the model's and their values written back into it after each step.  Shared by tests/test_blocks.py
(loralib's MergedLinear, a LitGPT-like layer) and tests/test_litgpt.py (LitGPT itself, in CI's LitGPT env)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sdsopt import SDSAdamW

Stacked = list[tuple[nn.Parameter, nn.Parameter, list[int]]]
"""Per stacked layer: ``(lora_A, lora_B, rows of lora_B per block)``."""


def train_explicit(model: nn.Module, stacked: Stacked, loss: Callable[[nn.Module], Tensor], steps: int,
                   **options) -> list[float]:
    """``steps`` steps of ``SDSAdamW(**options)`` on ``model``'s trainable parameters, each block of ``stacked`` an
    explicit pair of its own tensors; the other parameters are given with their names (paired by name).
    Returns the losses."""
    taken = {id(t) for A, B, _ in stacked for t in (A, B)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    copies: list[tuple[nn.Parameter, slice, Tensor]] = []
    pairs = []
    for A, B, rows in stacked:
        r, start = A.shape[0] // len(rows), 0
        for i, m in enumerate(rows):
            block = []
            for whole, span in ((A, slice(i * r, (i + 1) * r)), (B, slice(start, start + m))):
                block.append(whole.detach()[span].clone().requires_grad_(True))
                copies.append((whole, span, block[-1]))
            pairs.append(tuple(block))
            start += m
    shadows = [t for _, _, t in copies]
    group = {"params": [p for _, p in named] + shadows, "lora_pairs": pairs,
             "param_names": [n for n, _ in named] + [f"block{k}" for k in range(len(shadows))]}
    opt = SDSAdamW([group], **options)
    losses = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        value = loss(model)
        value.backward()
        for whole, span, shadow in copies:
            shadow.grad = whole.grad[span].clone()
        opt.step()
        with torch.no_grad():
            for whole, span, shadow in copies:
                whole[span].copy_(shadow)
        losses.append(value.item())
    return losses


def train(model: nn.Module, opt: torch.optim.Optimizer, loss: Callable[[nn.Module], Tensor], steps: int
          ) -> list[float]:
    """``steps`` plain steps of ``opt`` on ``model``; returns the losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(model)
        value.backward()
        opt.step()
        losses.append(value.item())
    return losses
