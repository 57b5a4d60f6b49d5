"""How many SmolLM2-shaped LoRA training processes one GPU serves at once: ``--procs`` processes, each training
SmolLM2-135M's shapes (random weights: :func:`gs_cost.smollm2_shaped`) for ``--steps`` steps of batch 16 ×
``--seq`` tokens under bf16 autocast with one ``SDSAdamW`` mode; prints each process's steps per second and the
total, the figure that sizes a parallel sweep (``benchmarks/llm_sweep.py --workers``).  Run it once plainly and
once under CUDA MPS (``nvidia-cuda-mps-control -d``) to see what concurrent kernels buy.

    python benchmarks/parallel_runs.py --procs 14 --steps 40
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import torch

    from gs_cost import smollm2_shaped
    from sdsopt import SDSAdamW

    model = smollm2_shaped("cuda")
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                   mode=args.mode, fused=args.fused or None)
    ids = torch.randint(0, 49152, (args.batch, args.seq), device="cuda")

    def step() -> None:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    for _ in range(12):  # (past sds's warm-up and re-split)
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"{args.steps / (time.perf_counter() - t0):.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=14)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--mode", default="sds")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    argv_worker = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--mode", args.mode] + (["--fused"] if args.fused else [])
    t0 = time.time()
    procs = [subprocess.Popen(argv_worker, stdout=subprocess.PIPE, text=True, env=os.environ)
             for _ in range(args.procs)]
    rates = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    print(f"{args.procs} processes, mode {args.mode}: steps/s per process min {min(rates):.2f} max {max(rates):.2f}, "
          f"total {sum(rates):.2f} steps/s ({time.time() - t0:.0f} s wall with start-up)")


if __name__ == "__main__":
    main()
