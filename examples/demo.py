"""AdamW vs SDSAdamW on the same offline PEFT LoRA model: prints both loss curves side by side.

A byte-level GPT-2 (from a transformers config) is pre-trained briefly on Python's standard-library
source, then LoRA-adapted (PEFT) to Python's English reference docs (pydoc_data) twice, from the same
LoRA initialisation and with the same batches: once with torch.optim.AdamW, once with sdsopt.SDSAdamW.

    python examples/demo.py            # ~1 min on 2 CPU cores
    python examples/demo.py --help
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sdsopt import SDSAdamW
from sdsopt.tasks.text import batch_iterator, lm_loss, load_corpus, split, tiny_gpt2


def pretrain(model, data, steps, args):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = batch_iterator(data, args.block, args.batch, torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(model, next(batches)).backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model, data, args, n_batches=8):
    batches = batch_iterator(data, args.block, args.batch, torch.Generator().manual_seed(2))
    return sum(lm_loss(model, next(batches)).item() for _ in range(n_batches)) / n_batches


def adapt(model, make_opt, data, args):
    opt = make_opt(model)
    batches = batch_iterator(data, args.block, args.batch, torch.Generator().manual_seed(3))
    curve = []
    for _ in range(args.steps):
        opt.zero_grad()
        loss = lm_loss(model, next(batches))
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def main(argv=None):
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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    source, (target_train, target_eval) = load_corpus("stdlib"), split(load_corpus("pydoc"))
    base = pretrain(tiny_gpt2(width=args.width, block=args.block), source, args.pretrain_steps, args)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj", "c_fc"],
                        lora_dropout=0.0, fan_in_fan_out=True)
    torch.manual_seed(0)
    lora_model = get_peft_model(base, config)
    n_modules = sum(1 for n, _ in lora_model.named_modules() if n.endswith("lora_A.default"))
    print(f"pre-trained on stdlib source ({len(source):,} bytes) in {time.time() - t0:.0f}s; "
          f"LoRA r={args.rank} on {n_modules} modules; adapting to pydoc text ({len(target_train):,} bytes)")

    optimizers = {
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01),
        "SDSAdamW": lambda m: SDSAdamW(m.named_parameters(), lr=args.lr, weight_decay=0.01),
    }
    curves, evals = {}, {}
    for name, make_opt in optimizers.items():
        model = copy.deepcopy(lora_model)
        curves[name] = adapt(model, make_opt, target_train, args)
        evals[name] = evaluate(model, target_eval, args)

    print(f"\n{'step':>6} | " + " | ".join(f"{n:>9}" for n in curves))
    print("-" * (9 + 12 * len(curves)))
    for i in range(0, args.steps, args.every):
        window = slice(max(0, i - args.every + 1), i + 1)
        row = [sum(c[window]) / len(c[window]) for c in curves.values()]
        print(f"{i + 1:>6} | " + " | ".join(f"{v:9.4f}" for v in row))
    print(f"\nheld-out loss on pydoc text (nats/byte): " + ", ".join(f"{n} {v:.4f}" for n, v in evals.items()))
    print(f"total {time.time() - t0:.0f}s")
    return curves, evals


if __name__ == "__main__":
    main()
