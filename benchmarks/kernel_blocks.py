"""The sweep behind ``sdsopt.fused._blocks``: the fused step's time for each column block and warp count.

    python benchmarks/kernel_blocks.py --ranks 16 64 --dtypes fp32 bf16      # CUDA only

For every (rank, dtype) the SDSAdamW ``sds`` and ``scaled`` steps (``fused=True``) are timed with each candidate
``(BLOCK_P, warps)`` for the Adam kernel and the Gram kernel together (median of ``--steps`` steps, CUDA events),
next to fused AdamW in the same run.  Prints one line per candidate; the default of ``_blocks`` is marked.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sdsopt import SDSAdamW, fused
from step_time import DTYPES, lora_params

CANDIDATES = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]


def timed(opt, steps: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["sds", "scaled"])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    default = fused._blocks
    print(f"device {torch.cuda.get_device_name(device)} | llama7b shapes | median of {args.steps} steps", flush=True)
    for dname in args.dtypes:
        for r in args.ranks:
            named = lora_params("llama7b", r, DTYPES[dname], device)
            ref = timed(torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True), args.steps)
            print(f"r={r} {dname}: AdamW fused {ref:.3f} ms", flush=True)
            rp = default(r)[0]
            for mode in args.modes:
                for bp, warps in CANDIDATES:
                    if rp * bp > 16384:  # tiles beyond 64 KB of float32 per operand spill
                        continue
                    fused._blocks = lambda r, bp=bp, warps=warps: (max(16, 1 << (r - 1).bit_length()), bp, warps)
                    extra = {"warmup_steps": 0} if mode == "sds" else {}
                    ms = timed(SDSAdamW(named, lr=1e-4, mode=mode, fused=True, **extra), args.steps)
                    mark = " (default)" if (bp, warps) == default(r)[1:] else ""
                    print(f"  {mode:7s} BLOCK_P={bp:3d} warps={warps}: {ms:.3f} ms = {ms / ref:.2f}x{mark}", flush=True)
                fused._blocks = default
            del named
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
