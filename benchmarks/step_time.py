"""Optimizer step time of SDSAdamW against torch.optim.AdamW (foreach and fused), same run, same tensors.

    python benchmarks/step_time.py                      # GPU if present (LLaMA-7B LoRA shapes), else CPU (small)
    python benchmarks/step_time.py --ranks 16 64 --dtypes fp32 --out results.json

Shapes: ``llama7b`` = 32 layers × {q,k,v,o: 4096×4096; gate, up: 11008×4096; down: 4096×11008}
(224 LoRA pairs); ``small`` = 4 layers of the same structure at width 1024 (for CPUs).
Each variant steps on the same parameters and random gradients; the median of ``--steps`` timed
steps after ``--warmup`` is reported (CUDA events on GPU, perf_counter on CPU), with the ratio to
fused AdamW (foreach AdamW on CPU if fused is unavailable), the peak extra memory allocated during
the step (GPU: the allocator's peak; CPU: the profiler's allocation events, one more untimed step) and the
optimizer state size.  ``--check`` compares the rewritten gradients on the
device (default route) with the float64 eigh route on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from sdsopt import SDSAdamW, rewrite_pair
from sdsopt.lab.peers import make_peer

SHAPES = {
    "llama7b": dict(layers=32, width=4096, ffn=11008),
    "small": dict(layers=4, width=1024, ffn=2752),
    # llama7b's structure (224 pairs in 3 shape buckets) with tiny matrices: the step is all host overhead
    "host": dict(layers=32, width=64, ffn=172),
    # benchmarks/e2e_step.py's model at issue 40/46's size (--layers 4 --hidden 4096): 28 pairs in 3 shape buckets
    "e2e": dict(layers=4, width=4096, ffn=11008),
    # one layer of toy matrices: plumbing checks (kernel_blocks.py --device cpu under TRITON_INTERPRET=1)
    "tiny": dict(layers=1, width=64, ffn=172),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lora_params(shape: str, r: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Named LoRA factors (PEFT names) with random values and gradients."""
    s = SHAPES[shape]
    w, f = s["width"], s["ffn"]
    modules = {"q_proj": (w, w), "k_proj": (w, w), "v_proj": (w, w), "o_proj": (w, w),
               "gate_proj": (f, w), "up_proj": (f, w), "down_proj": (w, f)}
    gen = torch.Generator(device=device).manual_seed(seed)
    named = []
    for layer in range(s["layers"]):
        for mod, (m, n) in modules.items():
            prefix = f"model.layers.{layer}.{mod}"
            A = torch.randn(r, n, generator=gen, device=device, dtype=dtype) / n**0.5
            B = torch.randn(m, r, generator=gen, device=device, dtype=dtype) / r**0.5
            for name, t in ((f"{prefix}.lora_A.default.weight", A), (f"{prefix}.lora_B.default.weight", B)):
                p = torch.nn.Parameter(t)
                p.grad = torch.randn(t.shape, generator=gen, device=device, dtype=dtype) * 1e-3
                named.append((name, p))
    return named


class _Named:
    """The named factors as a model for :mod:`sdsopt.lab.peers` (which reads only ``named_parameters()``)."""

    def __init__(self, named):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


def variants(device: torch.device, modes: list[str], routes: list[str], guard: bool = False,
             torch_ops: tuple[str, ...] = (), graphs: bool = False, peers: tuple[str, ...] = ()):
    """AdamW foreach/fused, then SDSAdamW per mode (and sds_polar route), ``fused=True`` (on CUDA: the Triton
    kernels); with ``guard`` each SDSAdamW variant also with ``skip_nonfinite=True`` (the cost of the non-finite
    check); the modes in ``torch_ops`` also without the kernels (``SDSOPT_KERNELS=0``: the torch-ops step); with
    ``graphs`` fused AdamW (``capturable=True``) and the ``sds``/``scaled`` steps also captured in a CUDA graph;
    ``peers``: the peers of :mod:`sdsopt.lab.peers` as the harness builds them (e.g. ``loraplus rite peft_riemannian``;
    mode ``lorapro`` is an SDSAdamW mode: ``--modes``)."""
    out = {"AdamW foreach": lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-4, foreach=True),
           "AdamW fused": lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-4, fused=True)}
    if graphs:
        out["AdamW fused (CUDA graph)"] = lambda named: torch.optim.AdamW(
            [p for _, p in named], lr=1e-4, fused=True, capturable=True)
    for mode in modes:  # sds measured in its coordinate phase (warmup_steps=0); its route is Cholesky
        for route in routes if mode == "sds_polar" else ["auto"]:
            for skip in (False, True) if guard else (False,):
                label = f"SDSAdamW {mode}" + (f" {route}" if mode == "sds_polar" else "") + (" + guard" if skip else "")
                extra = {"warmup_steps": 0} if mode == "sds" else {}
                out[label] = (lambda mode, route, extra, skip: lambda named: SDSAdamW(
                    named, lr=1e-4, mode=mode, route=route, fused=True, skip_nonfinite=skip, **extra)
                )(mode, route, extra, skip)
            if graphs and mode in ("sds", "scaled"):
                extra = {"warmup_steps": 0} if mode == "sds" else {}
                out[f"SDSAdamW {mode} (CUDA graph)"] = (lambda mode, extra: lambda named: SDSAdamW(
                    named, lr=1e-4, mode=mode, fused=True, **extra))(mode, extra)
            if mode in torch_ops:  # fused=True without the kernels (SDSOPT_KERNELS=0 while it is timed)
                extra = {"warmup_steps": 0} if mode == "sds" else {}
                out[f"SDSAdamW {mode} (torch ops)"] = (lambda mode, extra: lambda named: SDSAdamW(
                    named, lr=1e-4, mode=mode, fused=True, **extra))(mode, extra)
    for peer in peers:
        out[f"peer {peer}"] = (lambda peer: lambda named: make_peer(peer, _Named(named), 1e-4, (0.9, 0.999), 0.0))(peer)
    return out



@dataclass
class Row:
    variant: str
    rank: int
    dtype: str
    median_ms: float
    ratio_to_fused: float
    peak_extra_mb: float
    state_mb: float
    host_ms: float = float("nan")


def time_steps(opt, device, steps: int, warmup: int) -> tuple[float, float, float]:
    """``(median step time, peak extra MB, median host time)``: on CUDA the step between two events (the GPU's
    time, or the host's where the host is slower), and the time until ``opt.step()`` returns, without a sync."""
    for _ in range(warmup):
        opt.step()
    times, host = [], []
    peak = 0.0
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            opt.step()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cpu":
        peak = cpu_peak_extra_mb(opt)
    return statistics.median(times), peak, statistics.median(host) if host else float("nan")


def time_graph(opt, steps: int, warmup: int) -> tuple[float, float, float]:
    """As :func:`time_steps` for the step captured in a CUDA graph and replayed (the GPU's time alone: no host
    work per step; gradients and hyperparameters fixed, as in a captured training step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return cuda_median(graph.replay, steps), float("nan"), float("nan")


def cuda_median(fn, steps: int) -> float:
    """Median over ``steps`` calls of ``fn`` of the time between CUDA events around it (ms)."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_peak_extra_mb(opt) -> float:
    """Peak memory allocated during one more (untimed) step on the CPU above what was allocated at its start, from
    the profiler's allocation events (torch's CPU allocator keeps no peak counter); NaN where this torch's profiler
    does not expose them.  The same quantity as the CUDA column: on ``small`` r=64 fp32, sds's 2.45× its state
    here against 2.43× on an H100 at llama7b shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if hasattr(e, "nbytes"))
    except AttributeError:
        return float("nan")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def state_mb(opt) -> float:
    parts = getattr(opt, "optimizers", [opt])  # a peer's Chained optimizers
    return sum(t.numel() * t.element_size() for o in parts for s in o.state.values() for t in s.values()
               if torch.is_tensor(t)) / 2**20


def check_against_cpu(named, device) -> float:
    """Relative error of the rewritten gradients on ``device`` (default route) against float64 eigh on the CPU."""
    num = den = 0.0
    for (_, A), (_, B) in zip(named[0:14:2], named[1:14:2]):
        got = rewrite_pair(A.detach(), B.detach(), A.grad, B.grad)
        ref = rewrite_pair(*(t.detach().double().cpu() for t in (A, B, A.grad, B.grad)), route="eigh")
        num += sum(float((g.double().cpu() - f).norm() ** 2) for g, f in zip(got, ref))
        den += sum(float(f.norm() ** 2) for f in ref)
    return (num / den) ** 0.5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=SHAPES, default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["sds", "scaled", "sds_polar"])
    ap.add_argument("--routes", nargs="+", default=["newton_schulz"], help="routes of sds_polar")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="check the device step against float64 CPU")
    ap.add_argument("--guard", action="store_true", help="also time every SDSAdamW variant with skip_nonfinite=True")
    ap.add_argument("--torch-ops", nargs="*", default=["sds", "scaled"],
                    help="modes also timed without the kernels (SDSOPT_KERNELS=0: the torch-ops step)")
    ap.add_argument("--graphs", action="store_true", help="also time the steps captured in CUDA graphs")
    ap.add_argument("--peers", nargs="*", default=[], help="also time these peers (sdsopt.lab.peers), e.g. rite")
    ap.add_argument("--out", default=None, help="write rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("llama7b" if device.type == "cuda" else "small")
    ranks = args.ranks or ([8, 16, 64, 256] if device.type == "cuda" else [8, 16, 64])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name} | torch {torch.__version__} | shapes {shape} {SHAPES[shape]} | "
          f"threads {torch.get_num_threads()} | median of {args.steps} steps after {args.warmup}", flush=True)
    rows: list[Row] = []
    checks = {}
    for dname in args.dtypes:
        for r in ranks:
            named = lora_params(shape, r, DTYPES[dname], device)
            if args.check and dname == "fp32":
                checks[r] = check_against_cpu(named, device)
            results = {}
            for label, make in variants(device, args.modes, args.routes, args.guard, tuple(args.torch_ops),
                                          args.graphs, tuple(args.peers)).items():
                try:
                    opt = make(named)
                except ValueError as err:  # a peer that refuses these factors (rite: float32/float64 only)
                    print(f"  r={r:<4} {dname} {label:<28} n/a: {err}", flush=True)
                    continue
                os.environ["SDSOPT_KERNELS"] = "0" if label.endswith("(torch ops)") else "1"
                timer = time_graph if label.endswith("(CUDA graph)") else time_steps
                ms, peak, host = timer(opt, device, args.steps, args.warmup) if timer is time_steps else timer(
                    opt, args.steps, args.warmup)
                os.environ.pop("SDSOPT_KERNELS")
                results[label] = (ms, peak, state_mb(opt), host)
                del opt
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ref = results.get("AdamW fused", results["AdamW foreach"])[0]
            for label, (ms, peak, smb, host) in results.items():
                rows.append(Row(label, r, dname, ms, ms / ref, peak, smb, host))
                print(f"  r={r:<4} {dname} {label:<28} {ms:9.3f} ms  {ms / ref:6.2f}x  "
                      f"peak+{peak:8.1f} MB  state {smb:8.1f} MB  host {host:6.2f} ms", flush=True)
            del named
    ref_name = "AdamW fused" if any(r.variant == "AdamW fused" for r in rows) else "AdamW foreach"
    print("\n| variant | dtype | " + " | ".join(f"r={r}" for r in ranks) + " |")
    print("|---|---|" + "---|" * len(ranks))
    for dname in args.dtypes:
        for label in dict.fromkeys(r.variant for r in rows):
            cells = []
            for r in ranks:
                row = next((x for x in rows if x.variant == label and x.rank == r and x.dtype == dname), None)
                if row is None:  # (a peer that does not take this dtype)
                    cells.append("n/a")
                    continue
                host = f", host {row.host_ms:.2f}" if row.host_ms == row.host_ms else ""
                cells.append(f"{row.median_ms:.2f} ms ({row.ratio_to_fused:.2f}x{host})")
            print(f"| {label} | {dname} | " + " | ".join(cells) + " |")
    print(f"(ratios to {ref_name})")
    if checks:
        print("rewritten gradients, device vs float64 CPU eigh, relative error:", {r: f"{e:.1e}" for r, e in checks.items()})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "shape": shape, "argv": sys.argv[1:],
                       "rows": [asdict(r) for r in rows], "checks": checks}, fh, indent=1)


if __name__ == "__main__":
    main()
