"""The sweep behind ``sdsopt.fused.launch``: the fused step's time per kernel setting (column block, warps,
pipelining stages, matmul precision) and work-item size (``ADAM_CHUNK``, ``GRAM_CHUNK``).

    python benchmarks/kernel_blocks.py --ranks 16 64 --dtypes fp32 bf16      # CUDA only

For every (rank, dtype) the SDSAdamW step (``fused=True``) is timed with the default settings, then with one
setting changed at a time (median of ``--steps`` steps, CUDA events), next to fused AdamW in the same run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from sdsopt import SDSAdamW, fused
from step_time import DTYPES, cuda_median, lora_params

# Adam (BLOCK_P, warps, stages, precision) and Gram (BLOCK_P, stages) candidates, each at the other's default
ADAM = [(16, 4, 1, "tf32x3"), (32, 4, 1, "tf32x3"), (64, 4, 1, "tf32x3"), (32, 8, 1, "tf32x3"), (32, 4, 2, "tf32x3"),
        (16, 4, 1, "ieee"), (32, 4, 1, "ieee"), (64, 4, 1, "ieee")]
# Gram (BLOCK_P, warps, stages, precision)
GRAM = [(64, 4, 2, "tf32x3"), (128, 8, 2, "tf32x3"), (128, 4, 3, "tf32x3"), (256, 8, 2, "tf32x3"),
        (16, 4, 2, "ieee"), (32, 4, 2, "ieee"), (64, 4, 2, "ieee"), (32, 8, 3, "ieee")]
CHUNKS = [(4, 2048), (16, 2048), (8, 1024), (8, 4096)]  # (ADAM_CHUNK, GRAM_CHUNK)


def timed(opt, steps: int) -> float:
    for _ in range(3):
        opt.step()
    return cuda_median(opt.step, steps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["sds", "scaled"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sweep", nargs="+", choices=["adam", "gram", "chunks"], default=["adam", "gram", "chunks"])
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    default = fused.launch
    print(f"device {torch.cuda.get_device_name(device)} | llama7b shapes | median of {args.steps} steps", flush=True)
    for dname in args.dtypes:
        for r in args.ranks:
            named = lora_params("llama7b", r, DTYPES[dname], device)
            ref = timed(torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True), args.steps)
            base = default(r, device, DTYPES[dname])
            print(f"r={r} {dname}: AdamW fused {ref:.3f} ms; default {base}", flush=True)

            def run(label: str, cfg: fused.Launch, mode: str, named=named) -> None:
                fused.launch = lambda r, device, dtype=None: cfg
                extra = {"warmup_steps": 0} if mode == "sds" else {}
                try:
                    ms = timed(SDSAdamW(named, lr=1e-4, mode=mode, fused=True, **extra), args.steps)
                    print(f"  {mode:7s} {label}: {ms:.3f} ms = {ms / ref:.2f}x", flush=True)
                except Exception as err:  # a candidate beyond the chip's shared memory: report, go on
                    print(f"  {mode:7s} {label}: failed ({type(err).__name__}: {str(err)[:80]})", flush=True)
                finally:
                    fused.launch = default

            for mode in args.modes:
                run("default", base, mode)
                for bp, warps, stages, prec in ADAM if "adam" in args.sweep else []:
                    run(f"adam BLOCK_P={bp} warps={warps} stages={stages} {prec}",
                        replace(base, adam_bp=bp, adam_warps=warps, adam_stages=stages, precision=prec), mode)
                for bp, warps, stages, prec in GRAM if "gram" in args.sweep else []:
                    run(f"gram BLOCK_P={bp} warps={warps} stages={stages} {prec}",
                        replace(base, gram_bp=bp, gram_warps=warps, gram_stages=stages, gram_precision=prec), mode)
                chunks = fused.ADAM_CHUNK, fused.GRAM_CHUNK
                for fused.ADAM_CHUNK, fused.GRAM_CHUNK in CHUNKS if "chunks" in args.sweep else []:
                    run(f"ADAM_CHUNK={fused.ADAM_CHUNK} GRAM_CHUNK={fused.GRAM_CHUNK}", base, mode)
                fused.ADAM_CHUNK, fused.GRAM_CHUNK = chunks
            del named
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
