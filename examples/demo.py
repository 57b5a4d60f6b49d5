"""AdamW vs SDSAdamW on the same offline PEFT LoRA model: prints both loss curves side by side.

A byte-level GPT-2 (from a transformers config) is pre-trained briefly on Python's standard-library
source, then LoRA-adapted (PEFT) to Python's English reference docs (pydoc_data) twice, from the same
LoRA initialisation and with the same batches: once with torch.optim.AdamW, once with sdsopt.SDSAdamW.

    python examples/demo.py            # ~1 min on 2 CPU cores
    python examples/demo.py --help

Needs the extra ``hf`` (transformers, PEFT): ``pip install ".[hf]"`` in the checkout.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdsopt import SDSAdamW
from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab.tasks.text import TextLMTask


def adapt(task: TextLMTask, make_opt, steps: int) -> tuple[list[float], float]:
    """LoRA-adapt a fresh copy of the task's model (seed 0: same init and batches for every optimizer)."""
    model = task.lora_model(seed=0)
    opt = make_opt(model)
    batches = task.batches(seed=0)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(model, next(batches))
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve, task.eval_loss(model)


def main(argv=None):
    exit_if_missing(["transformers", "peft"], "examples/demo.py")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="LoRA adaptation steps per optimizer")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--every", type=int, default=25, help="print every N steps")
    args = parser.parse_args(argv)

    t0 = time.time()
    task = TextLMTask(rank=args.rank, width=args.width, block=args.block, batch=args.batch,
                      pretrain_steps=args.pretrain_steps)
    task.setup(seed=0)
    print(f"pre-trained on stdlib source for {args.pretrain_steps} steps in {time.time() - t0:.0f}s; "
          f"LoRA r={args.rank} (PEFT); adapting to pydoc text ({len(task.train):,} bytes)")

    optimizers = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01),
        "SDSAdamW": lambda m: SDSAdamW(m.named_parameters(), lr=args.lr, weight_decay=0.01),
    }
    curves, evals = {}, {}
    for name, make_opt in optimizers.items():
        curves[name], evals[name] = adapt(task, make_opt, args.steps)

    print(f"\n{'step':>6} | " + " | ".join(f"{n:>9}" for n in curves))
    print("-" * (9 + 12 * len(curves)))
    for i in range(0, args.steps, args.every):
        window = slice(max(0, i - args.every + 1), i + 1)
        row = [sum(c[window]) / len(c[window]) for c in curves.values()]
        print(f"{i + 1:>6} | " + " | ".join(f"{v:9.4f}" for v in row))
    print("\nheld-out loss on pydoc text (nats/byte): " + ", ".join(f"{n} {v:.4f}" for n, v in evals.items()))
    print(f"total {time.time() - t0:.0f}s")
    return curves, evals


if __name__ == "__main__":
    main()
