"""A hand-written LoRA module with its own parameter names, paired explicitly (or by a custom pattern).

    python examples/custom_lora.py [--steps 200]

Needs no extra: the user install (``pip install .``) runs it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from sdsopt import SDSAdamW, regex_pairing


class LowRankAdapter(nn.Module):
    """y = W0 x + up(down(x)): kohya-style names `down` (A, r×n) and `up` (B, m×r)."""

    def __init__(self, n: int, m: int, r: int):
        super().__init__()
        self.frozen = nn.Linear(n, m).requires_grad_(False)
        self.down = nn.Parameter(torch.randn(r, n) / n**0.5)
        self.up = nn.Parameter(torch.zeros(m, r))

    def forward(self, x):
        return self.frozen(x) + (x @ self.down.T) @ self.up.T


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x, y = torch.randn(512, 24), torch.randn(512, 16)

    # 1. explicit pairs in a param group: (A, B) = (down, up)
    model = LowRankAdapter(24, 16, 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SDSAdamW([{"params": trainable, "lora_pairs": [(model.down, model.up)]}], lr=1e-2)
    print(f"explicit pairs: {len(opt.lora_pairs)} pair(s); final loss {train(model, opt, x, y, args.steps):.4f}")

    # 2. the same pairing from names, with a pattern whose `factor` group reads down/up
    torch.manual_seed(0)
    model = LowRankAdapter(24, 16, 4)
    pairing = regex_pairing(r"(?:^|\.)(?P<factor>down|up)$", a="down", b="up")
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2, pairing=pairing)
    print(f"pattern pairs: {[(p.name_a, p.name_b) for p in opt.lora_pairs]}; "
          f"final loss {train(model, opt, x, y, args.steps):.4f}")


if __name__ == "__main__":
    main()
