"""The step at each rank priced with this machine's measured bandwidth and product throughput, against the
measured steps: what bounds `sds`'s torch path, and what a step built from products at that speed could do.

    python benchmarks/roofline.py --ranks 64 128 256                  # CUDA: llama7b shapes (224 pairs)
    python benchmarks/roofline.py --device cpu --shape small --ranks 2 --mb 8 --reps 1 --steps 1   # smoke test

Measured (median of ``--reps``): the copy bandwidth (one read and one write of ``--mb`` MB) and, per rank, the
throughput of the step's product shapes over the factors of the largest shape bucket — the Gram
``[k, r, n]·[k, n, r]`` and the map ``[k, r, r]·[k, r, n]`` — with float32 operands (IEEE), TF32 operands and bf16
operands (CUDA; the CPU has float32 only).  Predicted, for the ``N`` elements of all factors in float32:

* AdamW: 7 passes of ``4N`` bytes (read parameter, gradient, two moments; write parameter, two moments).
* ``sds`` at the least work: one more read (the Grams) and ``5r`` flops per element (the Gram ``r`` as a
  symmetric product, the coordinate gradient ``2r``, the map back ``2r``) at float32 accuracy: three TF32 passes
  (tf32x3) at the standalone TF32 throughput measured, overlapped with the memory traffic (``max``) or not
  (``+``).  Not a floor: a standalone skinny product pays its own memory traffic, which a fused kernel does not
  (the floor is at the GPU's TF32 peak; benchmarks/RESULTS.md §3.2).
* ``sds``'s torch path as written: ``PASSES_TORCH`` passes and ``6r`` flops per element (the Gram as a full
  product) with IEEE float32 products (torch's default matmul precision).

Then the fused AdamW step and ``sds``'s step (``warmup_steps=0``, the torch path above r = 64) are timed as in
``step_time.py`` (eager, CUDA events).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from sdsopt import SDSAdamW
from step_time import DTYPES, SHAPES, lora_params, time_steps

PASSES_ADAMW = 7
PASSES_LEAST = 8
PASSES_TORCH = 24
"""Memory passes over the factors (in units of one factor-sized float32 tensor) of ``sds``'s torch step, counted
from ``sdsopt.modes.sds_steps.step_stacked`` (chunked, float32 factors, re-balanced): Grams: stack (read + write)
and read (3); per factor: re-stack (2), stack the gradient (2), the coordinate gradient (2), the zero buffer
(1), torch's Adam on it (7: read gradient, buffer, two moments; write buffer, two moments), the re-balancing
scale (2), the ``baddbmm_`` (3), the copy back (2)."""


@contextmanager
def tf32(enabled: bool):
    """TF32 operands for float32 CUDA matmuls inside (restores the setting after)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` (ms), synchronised on CUDA; one untimed call first."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bandwidth_gbs(device: torch.device, mb: int, reps: int) -> float:
    """Copy bandwidth: bytes read + written per second (GB/s)."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / ms / 1e6


def product_tflops(device: torch.device, k: int, r: int, n: int, reps: int) -> dict[str, float]:
    """Throughput (TFLOP/s) of the Gram ``[k, r, n]·[k, n, r]`` and of the map ``[k, r, r]·[k, r, n]`` per operand
    type (float32 IEEE; on CUDA also TF32 and bf16)."""
    out = {}
    kinds = ["fp32"] + (["tf32", "bf16"] if device.type == "cuda" else [])
    for kind in kinds:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        X = torch.randn(k, r, n, device=device, dtype=dtype)
        M = torch.randn(k, r, r, device=device, dtype=dtype)
        with tf32(kind == "tf32") if device.type == "cuda" else nullcontext():
            gram = median_ms(lambda: X @ X.mT, device, reps)
            mapped = median_ms(lambda: M @ X, device, reps)
        flops = 2 * k * r * r * n
        out[f"gram {kind}"] = flops / gram / 1e9
        out[f"map {kind}"] = flops / mapped / 1e9
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=SHAPES, default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--mb", type=int, default=2048, help="buffer of the bandwidth test (MB)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (median)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("llama7b" if device.type == "cuda" else "small")
    s = SHAPES[shape]
    bw = bandwidth_gbs(device, args.mb, args.reps)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"shape {shape}; copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for r in args.ranks:
        # the largest bucket: q/k/v/o (width × width) of every layer
        k, n = 4 * s["layers"], s["width"]
        tput = product_tflops(device, k, r, n, args.reps)
        per_layer = 4 * 2 * s["width"] + 3 * (s["width"] + s["ffn"])
        N = per_layer * s["layers"] * r  # elements of all factors
        mem = lambda passes: passes * N * 4 / bw / 1e6  # noqa: E731  (ms)
        tf = min(tput.get("gram tf32", tput["gram fp32"]), tput.get("map tf32", tput["map fp32"]))
        ieee = min(tput["gram fp32"], tput["map fp32"])
        least_flops = 3 * 5 * r * N / tf / 1e9  # tf32x3 (ms)
        torch_flops = 6 * r * N / ieee / 1e9
        named = lora_params(shape, r, DTYPES["fp32"], device)
        adamw_ms = time_steps(torch.optim.AdamW([p for _, p in named], lr=1e-4,
                                                fused=device.type == "cuda", foreach=device.type != "cuda"),
                              device, args.steps, 2)[0]
        path = "fused kernels" if device.type == "cuda" and r <= 64 else "torch path"
        sds_ms, sds_peak, _ = time_steps(SDSAdamW(named, lr=1e-4, warmup_steps=0, fused=True), device, args.steps, 2)
        row = dict(rank=r, elements=N, path=path, **{f"tflops {k_}": v for k_, v in tput.items()},
                   adamw_floor_ms=mem(PASSES_ADAMW), adamw_ms=adamw_ms,
                   sds_least_overlap_ms=max(mem(PASSES_LEAST), least_flops),
                   sds_least_serial_ms=mem(PASSES_LEAST) + least_flops,
                   sds_torch_predicted_ms=mem(PASSES_TORCH) + torch_flops, sds_ms=sds_ms, sds_peak_extra_mb=sds_peak)
        rows.append(row)
        print(f"r={r}: N={N / 1e6:.0f}M elements; products (TFLOP/s) "
              + ", ".join(f"{k_} {v:.1f}" for k_, v in tput.items()), flush=True)
        print(f"  AdamW: 7 passes {row['adamw_floor_ms']:.2f} ms, measured {adamw_ms:.2f} ms | sds least work "
              f"{row['sds_least_overlap_ms']:.2f} (overlapped) – {row['sds_least_serial_ms']:.2f} (serial) ms = "
              f"{row['sds_least_overlap_ms'] / adamw_ms:.2f}–{row['sds_least_serial_ms'] / adamw_ms:.2f}x AdamW | "
              f"torch path predicted {row['sds_torch_predicted_ms']:.2f} ms; measured ({path}) {sds_ms:.2f} ms "
              f"({sds_ms / adamw_ms:.2f}x AdamW, peak +{sds_peak:.0f} MB)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(device), shape=shape, bandwidth_gbs=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
