"""The sweep behind ``sdsopt.fused``'s launch settings: the fused step's time per column block and warp count
(``_blocks``), then per work-item size (``ADAM_CHUNK``, ``GRAM_CHUNK``).

    python benchmarks/kernel_blocks.py --ranks 16 64 --dtypes fp32 bf16      # CUDA only

For every (rank, dtype) the SDSAdamW ``sds`` and ``scaled`` steps (``fused=True``) are timed with each candidate
``(BLOCK_P, warps)`` for the Adam kernel and the Gram kernel together, then with each work-item size at the
default blocks (median of ``--steps`` steps, CUDA events), next to fused AdamW in the same run.  Prints one line
per candidate; the defaults are marked.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sdsopt import SDSAdamW, fused
from step_time import DTYPES, lora_params

CANDIDATES = [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 4)]
CHUNKS = [(4, 2048), (16, 2048), (8, 1024), (8, 4096)]  # (ADAM_CHUNK, GRAM_CHUNK); the default is timed above


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
                    if rp * bp >= 16384:  # tiles of 64 KB of float32 per operand exceed shared memory
                        continue
                    fused._blocks = lambda r, bp=bp, warps=warps: (max(16, 1 << (r - 1).bit_length()), bp, warps)
                    extra = {"warmup_steps": 0} if mode == "sds" else {}
                    ms = timed(SDSAdamW(named, lr=1e-4, mode=mode, fused=True, **extra), args.steps)
                    mark = " (default)" if (bp, warps) == default(r)[1:] else ""
                    print(f"  {mode:7s} BLOCK_P={bp:3d} warps={warps}: {ms:.3f} ms = {ms / ref:.2f}x{mark}", flush=True)
                fused._blocks = default
                chunks = fused.ADAM_CHUNK, fused.GRAM_CHUNK
                for fused.ADAM_CHUNK, fused.GRAM_CHUNK in CHUNKS:
                    extra = {"warmup_steps": 0} if mode == "sds" else {}
                    ms = timed(SDSAdamW(named, lr=1e-4, mode=mode, fused=True, **extra), args.steps)
                    print(f"  {mode:7s} ADAM_CHUNK={fused.ADAM_CHUNK:2d} GRAM_CHUNK={fused.GRAM_CHUNK}: {ms:.3f} ms = "
                          f"{ms / ref:.2f}x", flush=True)
                fused.ADAM_CHUNK, fused.GRAM_CHUNK = chunks
            del named
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
