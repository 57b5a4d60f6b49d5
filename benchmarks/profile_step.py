"""Where an SDSAdamW step spends its time: torch.profiler's top operators for one configuration.

    python benchmarks/profile_step.py --rank 16 --mode sds_polar --route newton_schulz
    python benchmarks/profile_step.py --rank 16 --mode sds        # coordinate steps (no warm-up)

Prints the top operators by device time, then by host time (a host-bound step shows there); ``--host`` prints
cProfile's top Python functions of 20 steps instead (where the host time of a step goes); on CUDA it ends with
the compiled Triton kernels' registers, spills, shared memory and the programs an SM holds by those.
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
    if device.type == "cuda":
        kernel_resources(device)


def kernel_resources(device: torch.device) -> None:
    """Registers per thread, spills, warps and shared memory of every compiled Triton kernel of
    :mod:`sdsopt.kernels`, and the programs one SM holds by its register file and shared memory."""
    from sdsopt import kernels

    props = torch.cuda.get_device_properties(device)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    for name in ("gram_kernel", "gram_sum_kernel", "frames_kernel", "adam_kernel"):
        fn = getattr(kernels, name)
        caches = getattr(fn, "device_caches", None) or getattr(fn, "cache", {})
        for entry in caches.values():
            for compiled in (entry[0] if isinstance(entry, tuple) else entry).values():
                warps = compiled.metadata.num_warps
                regs, spills, shared = compiled.n_regs, compiled.n_spills, compiled.metadata.shared
                by_regs = regs_sm // max(regs * 32 * warps, 1)
                by_smem = smem_sm // shared if shared else by_regs
                print(f"{name}: {regs} registers/thread, {spills} spills, {warps} warps, {shared} B shared: "
                      f"{min(by_regs, by_smem)} programs/SM (registers {by_regs}, shared memory {by_smem})")


if __name__ == "__main__":
    main()
