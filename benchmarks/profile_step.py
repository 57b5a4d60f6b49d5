"""Where an SDSAdamW step spends its time: torch.profiler's top operators for one configuration.

    python benchmarks/profile_step.py --rank 16 --mode sds_polar --route newton_schulz
    python benchmarks/profile_step.py --rank 16 --mode sds        # coordinate steps (no warm-up)

Prints the top operators by device time, then by host time (a host-bound step shows there); ``--host`` prints
cProfile's top Python functions of 20 steps instead (where the host time of a step goes).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sdsopt import SDSAdamW
from step_time import DTYPES, SHAPES, lora_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=SHAPES, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--mode", default="sds")
    ap.add_argument("--route", default="auto")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--host", action="store_true", help="cProfile the Python side of 20 steps")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("llama7b" if device.type == "cuda" else "small")
    named = lora_params(shape, args.rank, DTYPES[args.dtype], device)
    extra = {"warmup_steps": 0} if args.mode == "sds" else {}
    opt = SDSAdamW(named, lr=1e-4, mode=args.mode, route=args.route, fused=True, **extra)
    for _ in range(3):
        opt.step()
    if args.host:
        import cProfile
        import pstats
        import time

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with cProfile.Profile() as prof:
            for _ in range(20):
                opt.step()
        host = (time.perf_counter() - t0) / 20 * 1e3
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{shape} r={args.rank} {args.dtype} mode={args.mode}: {host:.2f} ms of host time per step (cProfile on)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{shape} r={args.rank} {args.dtype} mode={args.mode} route={args.route} (5 steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
