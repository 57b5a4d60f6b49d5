"""The sweep behind ``sdsopt.fused.launch``: the fused step's time per kernel setting (column block, warps,
pipelining stages, matmul precision) and work-item size (``ADAM_CHUNK``, ``GRAM_CHUNK``).

    python benchmarks/kernel_blocks.py --ranks 16 64 --dtypes fp32 bf16      # CUDA only
    python benchmarks/kernel_blocks.py --shape e2e --ranks 128 256 --modes sds --sweep adam gram   # r > 64
    TRITON_INTERPRET=1 python benchmarks/kernel_blocks.py --device cpu --shape tiny --ranks 16 --steps 1  # plumbing

For every (rank, dtype) the SDSAdamW step (``fused=True``) is timed with the default settings, then with one
setting changed at a time (median of ``--steps`` steps, CUDA events), next to fused AdamW in the same run.
``--shape``: the LoRA factors' shapes (``step_time.SHAPES``: ``llama7b``, 224 pairs, the default; ``e2e``, the
4-layer hidden-4096 model of ``e2e_step.py``, 28 pairs; ``tiny`` for plumbing checks).

Ranks above 64 (the kernels' tiled variants: Adam in two passes over ``adam_tm``-row tiles, Grams in
``gram_tile``-sized output tiles) sweep their own candidates (:data:`ADAM_TILED`, :data:`GRAM_TILED`).  A candidate
naming a field that ``sdsopt.fused.Launch`` lacks (``gram_tile``, ``adam_kt`` before the tiled kernels) is
skipped with a note, one equal to the default too; a candidate that fails (does not compile, too much shared
memory) prints ``failed`` and the sweep goes on.  A rank the kernels do not take (``fused.supported``) times only
the default (the torch path) against AdamW.  ``--device cpu`` runs the sweep under Triton's interpreter
(``TRITON_INTERPRET=1``, wall-clock times: a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import fields, replace

import torch

from sdsopt import SDSAdamW, fused
from step_time import DTYPES, SHAPES, cuda_median, lora_params

# Adam (BLOCK_P, warps, stages, precision) and Gram (BLOCK_P, stages) candidates, each at the other's default
ADAM = [(16, 4, 1, "tf32x3"), (32, 4, 1, "tf32x3"), (64, 4, 1, "tf32x3"), (32, 8, 1, "tf32x3"), (32, 4, 2, "tf32x3"),
        (16, 4, 1, "ieee"), (32, 4, 1, "ieee"), (64, 4, 1, "ieee")]
# Gram (BLOCK_P, warps, stages, precision)
GRAM = [(64, 4, 2, "tf32x3"), (128, 8, 2, "tf32x3"), (128, 4, 3, "tf32x3"), (256, 8, 2, "tf32x3"),
        (16, 4, 2, "ieee"), (32, 4, 2, "ieee"), (64, 4, 2, "ieee"), (32, 8, 3, "ieee")]
CHUNKS = [(4, 2048), (16, 2048), (8, 1024), (8, 4096)]  # (ADAM_CHUNK, GRAM_CHUNK)

TILED_RANK = 64
"""Ranks above this sweep :data:`ADAM_TILED` and :data:`GRAM_TILED` (``sdsopt.fused.HELD_RANK`` where it exists)."""
# r > 64, each a change of the default Launch (fields by name): the Adam kernel's column block, map rows per pass,
# warps and stages one at a time, then two pairs (larger and smaller tiles together)
ADAM_TILED = [{"adam_tm": tm, "adam_bp": bp, "adam_kt": kc, "adam_warps": wp, "adam_stages": st}
              # the two matrix-product passes (sdsopt.kernels.pass_kernel): rows per program, column block, the
              # maps' slice, warps, stages
              for tm, bp, kc, wp, st in ((64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2),
                                         (128, 128, 32, 8, 3), (256, 32, 32, 8, 2), (128, 64, 64, 8, 2))]
# r > 64: the Gram's output tile and warps
GRAM_TILED = [{"gram_tile": 128, "gram_warps": 8}, {"gram_bp": 32}]


def timed(opt, steps: int, device: torch.device) -> float:
    for _ in range(3):
        opt.step()
    if device.type == "cuda":
        return cuda_median(opt.step, steps)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def candidates(base, changes: list[dict]) -> list[tuple[str, object]]:
    """``(label, Launch)`` per change of ``base`` that has every field it names and differs from it; a note
    printed for each one skipped for a missing field (the kernels before the tiled r > 64 rewrite)."""
    have = {f.name for f in fields(base)}
    out, missing = [], set()
    for change in changes:
        lacking = set(change) - have
        if lacking:
            missing |= lacking
            continue
        if all(getattr(base, k) == v for k, v in change.items()):
            continue  # the default itself, timed as "default"
        out.append((" ".join(f"{k}={v}" for k, v in change.items()), replace(base, **change)))
    if missing:
        print(f"  note: sdsopt.fused.Launch has no field {', '.join(sorted(missing))}: "
              f"{sum(bool(set(c) & missing) for c in changes)} candidates skipped", flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["sds", "scaled"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sweep", nargs="+", choices=["adam", "gram", "chunks"], default=["adam", "gram", "chunks"])
    ap.add_argument("--shape", choices=SHAPES, default="llama7b",
                    help="LoRA shapes (step_time.SHAPES): llama7b (224 pairs), e2e (e2e_step.py's 4 layers, 28 pairs)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: Triton's interpreter (TRITON_INTERPRET=1), a plumbing check")
    ap.add_argument("--best", default=None,
                    help="write a JSON {'r/dtype': {field: value}}: the fastest Adam and Gram changes of mode sds "
                         "combined (e2e_step.py --launch reads it)")
    args = ap.parse_args(argv)
    best: dict[str, dict] = {}
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    device = torch.device(args.device)
    default = fused.launch
    tiled_rank = getattr(fused, "HELD_RANK", TILED_RANK)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device {name} | {args.shape} shapes {SHAPES[args.shape]} | median of {args.steps} steps", flush=True)
    for dname in args.dtypes:
        for r in args.ranks:
            named = lora_params(args.shape, r, DTYPES[dname], device)
            ref = timed(torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True), args.steps, device)
            base = default(r, device, DTYPES[dname])
            print(f"r={r} {dname}: AdamW fused {ref:.3f} ms; default {base}", flush=True)
            supported = fused.supported(DTYPES[dname], r)
            if not supported:
                print(f"  note: r={r} {dname} is beyond the kernels (fused.supported; MAX_RANK "
                      f"{getattr(fused, 'MAX_RANK', '?')}): the default is the torch path, no candidates", flush=True)

            timings: dict[str, list[tuple[float, dict]]] = {"adam": [], "gram": []}

            def run(label: str, cfg: fused.Launch, mode: str, named=named, base=base, timings=timings) -> None:
                fused.launch = lambda r, device, dtype=None: cfg
                extra = {"warmup_steps": 0} if mode == "sds" else {}
                try:
                    ms = timed(SDSAdamW(named, lr=1e-4, mode=mode, fused=True, **extra), args.steps, device)
                    print(f"  {mode:7s} {label}: {ms:.3f} ms = {ms / ref:.2f}x", flush=True)
                    change = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                              if getattr(cfg, f.name) != getattr(base, f.name)}
                    for kind in ("adam", "gram") if mode == "sds" else ():
                        if label == "default" or label.startswith(kind):
                            timings[kind].append((ms, change))
                except Exception as err:  # a candidate beyond the chip's shared memory: report, go on
                    print(f"  {mode:7s} {label}: failed ({type(err).__name__}: {str(err)[:80]})", flush=True)
                finally:
                    fused.launch = default

            for mode in args.modes:
                run("default", base, mode)
                if not supported:
                    continue
                if r > tiled_rank:  # the tiled kernels' own candidates
                    for label, cfg in candidates(base, ADAM_TILED) if "adam" in args.sweep else []:
                        run(f"adam {label}", cfg, mode)
                    for label, cfg in candidates(base, GRAM_TILED) if "gram" in args.sweep else []:
                        run(f"gram {label}", cfg, mode)
                else:
                    for bp, warps, stages, prec in ADAM if "adam" in args.sweep else []:
                        run(f"adam BLOCK_P={bp} warps={warps} stages={stages} {prec}",
                            replace(base, adam_bp=bp, adam_warps=warps, adam_stages=stages, precision=prec), mode)
                    for bp, warps, stages, prec in GRAM if "gram" in args.sweep else []:
                        run(f"gram BLOCK_P={bp} warps={warps} stages={stages} {prec}",
                            replace(base, gram_bp=bp, gram_warps=warps, gram_stages=stages, gram_precision=prec),
                            mode)
                chunks = fused.ADAM_CHUNK, fused.GRAM_CHUNK
                for fused.ADAM_CHUNK, fused.GRAM_CHUNK in CHUNKS if "chunks" in args.sweep else []:
                    run(f"ADAM_CHUNK={fused.ADAM_CHUNK} GRAM_CHUNK={fused.GRAM_CHUNK}", base, mode)
                fused.ADAM_CHUNK, fused.GRAM_CHUNK = chunks
            if timings["adam"] or timings["gram"]:
                choice = {**min(timings["adam"], key=lambda t: t[0], default=(0, {}))[1],
                          **min(timings["gram"], key=lambda t: t[0], default=(0, {}))[1]}
                best[f"{r}/{dname}"] = choice
                print(f"  best of sds's sweep (Adam and Gram changes combined): {choice or 'the default'}", flush=True)
            if args.best:
                with open(args.best, "w") as f:
                    json.dump(best, f, indent=1)
            del named
            if device.type == "cuda":
                torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
