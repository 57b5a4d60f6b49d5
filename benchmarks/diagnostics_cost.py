"""What does ``opt.diagnostics()`` cost, against the optimizer step it reports on?  CPU timing, fixed gradients.

    python benchmarks/diagnostics_cost.py                     # 8 layers × 6 projections = 48 pairs, width 512, r = 16
    python benchmarks/diagnostics_cost.py --width 1024 --rank 16 --layers 8 --repeats 30 --threads 1

Times (median of ``--repeats`` after two warm-up calls, perf_counter): ``opt.step()`` alone, ``opt.diagnostics()``
(factor numbers only), ``opt.track_step()`` + ``opt.step()`` (the copy taken in the step's pre-hook) and
``opt.diagnostics()`` after a tracked step (with the step's numbers).  The pairs are past their warm-up (mode
``sds``, coordinate steps) with non-zero B.  Prints one table row per measurement and the ratios to the step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from sdsopt import SDSAdamW
from sdsopt.lab.tasks.lora import LoraLinear

PROJECTIONS = 6


def build(layers: int, width: int, rank: int) -> tuple[nn.Module, SDSAdamW]:
    """``layers × 6`` LoRA pairs of ``width × width``, B non-zero, gradients random and fixed, past the warm-up."""
    torch.manual_seed(0)
    model = nn.ModuleList(LoraLinear(nn.Linear(width, width), r=rank) for _ in range(layers * PROJECTIONS))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0.0, 0.02)
            p.grad = torch.randn_like(p) * 1e-3
    opt = SDSAdamW(model.named_parameters(), lr=1e-4, warmup_steps=1)
    for _ in range(3):
        opt.step()
    return model, opt


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, opt = build(args.layers, args.width, args.rank)
    pairs = len(opt.lora_pairs)

    def tracked_step() -> None:
        opt.track_step()
        opt.step()

    out = {"step": median_ms(opt.step, args.repeats),
           "diagnostics": median_ms(opt.diagnostics, args.repeats),
           "track_step + step": median_ms(tracked_step, args.repeats)}
    opt.track_step()
    opt.step()
    out["diagnostics after a tracked step"] = median_ms(opt.diagnostics, args.repeats)
    print(f"{pairs} pairs {args.width}x{args.width} r={args.rank}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores ({platform.machine()}), load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| measurement | ms | / step |\n|---|---|---|")
    for name, ms in out.items():
        print(f"| {name} | {ms:.2f} | {ms / out['step']:.2f} |")
    return out


if __name__ == "__main__":
    main()
