"""Quickstart: a plain PyTorch loop with a hand-written LoRA layer; the one-line swap AdamW -> SDSAdamW.

    python examples/quickstart.py [--steps 200]

Needs no extra: the user install (``pip install .``) runs it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from sdsopt import SDSAdamW
from sdsopt.lab.tasks.lora import LoraLinear


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # frozen "pre-trained" layers with LoRA adapters (PEFT-style names: lora_A/lora_B.default.weight)
    model = nn.Sequential(LoraLinear(nn.Linear(32, 64), r=4), nn.Tanh(), LoraLinear(nn.Linear(64, 8), r=4))
    x = torch.randn(256, 32)
    y = torch.randn(256, 8)

    opt = SDSAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.01)  # was: torch.optim.AdamW(...)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    print("paired:", [(p.name_a, p.name_b, f"{p.m}x{p.n} r={p.r}") for p in opt.lora_pairs])
    for step in range(args.steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
