"""Where `sds`'s share of an end-to-end LoRA training step goes at high rank (issue 40), and what the candidate
fixes would buy, on the shapes of ``benchmarks/e2e_step.py``.

    python benchmarks/e2e_profile.py --ranks 128 256 --batch 1 8 --out DIR          # the step's split
    python benchmarks/e2e_profile.py --ranks 256 --products                          # the factor products alone
    python benchmarks/e2e_profile.py --ranks 256 --batch 8 --overlap                 # a side stream under fwd/bwd

Per rank and batch (``--layers 4 --hidden 4096 --heads 32`` by default, the issue's model), for fused AdamW and
``SDSAdamW(fused=True)`` (mode ``sds``; ``--modes`` for more), after the warm-up: the median over ``--steps`` of
the forward + backward (CUDA events), of the optimizer step's device time (events before and after
``opt.step()``: a host-bound step shows as its host time), of its host time (until ``opt.step()`` returns), and a
torch.profiler table of one optimizer step's kernels summed by kind (products, Adam, copies and stacks,
triangular algebra, elementwise), written to ``DIR/profile_r<r>_b<batch>.txt`` with the full operator table.

``--products``: the products of the torch path on the model's shape buckets (Grams ``X Xᵀ``, coordinate gradients
``L^{-1} g``, the map back ``X + M Δ``), each as IEEE float32 (torch's default), TF32, tf32x3 (three TF32
products of the operands' TF32 halves, float32 accuracy, the split included) and bf16, in ms and TFLOP/s.
``--overlap``: the forward + backward alone, and with the Grams of every factor computed on a second CUDA stream
at the same time (does a side stream hide them under the model's kernels?).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch

from e2e_step import SDS_WARMUP, build
from sdsopt import SDSAdamW
from sdsopt.linalg import float32_matmul, gram

KINDS = (("products", ("gemm", "bmm", "sgemm", "xmma", "cutlass", "gemv")),
         ("Adam", ("adam",)),
         ("stacks and copies", ("cat", "copy", "memcpy", "memset")),
         ("triangular algebra", ("trsm", "potrf", "cholesky", "getrf", "triangular", "syrk")),
         ("Triton kernels", ("_kernel",)),
         ("elementwise and reductions", ("elementwise", "reduce", "fill", "where", "mul", "add")))


PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
"""The products ``--products`` times: IEEE float32 (the library's), TF32, tf32x3 (three TF32 passes over exact
splits), bf16 operands."""


def kind_of(kernel: str) -> str:
    """The kind of a device kernel's name (first match in :data:`KINDS`, else ``other``)."""
    low = kernel.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def _optimizers(modes: list[str]):
    out = {"AdamW fused": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                                                      fused=True)}
    for mode in modes:
        out[f"SDSAdamW ({mode})"] = lambda m, mode=mode: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True, mode=mode)
    return out


def _forward_backward(model, tokens, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss


def split_step(args, rank: int, batch: int, out: str | None) -> dict[str, dict[str, float]]:
    """Per optimizer: median ms of forward+backward, of the optimizer step (device, host), and the kernel kinds of
    one profiled optimizer step."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.rank = rank
    gen = torch.Generator().manual_seed(0)
    warm = SDS_WARMUP + 5
    batches = [torch.randint(0, args.vocab, (batch, args.seq), generator=gen).to(device)
               for _ in range(args.steps + warm + 1)]
    results = {}
    lines = [f"r={rank} batch {batch}x{args.seq} layers={args.layers} hidden={args.hidden} "
             f"({torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__})"]
    for label, make in _optimizers(args.modes).items():
        model = build(args, device)
        opt = make(model)
        fb, dev, host = [], [], []
        for i, tokens in enumerate(batches[:-1]):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
            if cuda:
                torch.cuda.synchronize()
                ev[0].record()
            t0 = time.perf_counter()
            _forward_backward(model, tokens, device)
            if cuda:
                ev[1].record()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if cuda:
                ev[2].record()
                torch.cuda.synchronize()
            opt.zero_grad(set_to_none=True)
            if i >= warm:
                host.append((t2 - t1) * 1e3)
                if cuda:
                    fb.append(ev[0].elapsed_time(ev[1]))
                    dev.append(ev[1].elapsed_time(ev[2]))
                else:
                    fb.append((t1 - t0) * 1e3)
                    dev.append((t2 - t1) * 1e3)
        _forward_backward(model, batches[-1], device)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            opt.step()
            if cuda:
                torch.cuda.synchronize()
        kinds: dict[str, float] = defaultdict(float)
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        for e in prof.key_averages():
            if e.key.startswith("Optimizer.step#"):  # the step's own range (on the device too), not a kernel
                continue
            if not cuda or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                kinds[kind_of(e.key)] += getattr(e, attr, 0.0) / 1e3
        row = {"fwd_bwd_ms": statistics.median(fb), "opt_device_ms": statistics.median(dev),
               "opt_host_ms": statistics.median(host), **{f"kernels {k} ms": v for k, v in sorted(kinds.items())}}
        results[label] = row
        lines.append(f"  {label:<20} fwd+bwd {row['fwd_bwd_ms']:8.2f} ms | step device {row['opt_device_ms']:7.2f} ms"
                     f" host {row['opt_host_ms']:7.2f} ms | kernels of one step: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        print(lines[-1], flush=True)
        if out:
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            with open(f"{out}/profile_r{rank}_b{batch}.txt", "a") as f:
                f.write(f"== {lines[0]} | {label}\n{prof.key_averages().table(sort_by=key, row_limit=40)}\n")
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    print(lines[0])
    return results


def _shapes(hidden: int, ffn: int, layers: int) -> dict[str, tuple[int, int, int]]:
    """The model's LoRA shape buckets: ``(pairs, m, n)``."""
    return {"q/k/v/o": (4 * layers, hidden, hidden), "gate/up": (2 * layers, ffn, hidden),
            "down": (layers, hidden, ffn)}


def _tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, l)``: ``h`` TF32-representable (13 low mantissa bits cleared), ``h + l == x`` exactly."""
    hi = (x.view(torch.int32) & -8192).view(torch.float32)
    return hi, x - hi


def _matmul_x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` from three TF32 passes over the operands' exact splits (float32-level accuracy)."""
    ah, al = _tf32_split(a)
    bh, bl = _tf32_split(b)
    return (ah @ bl).add_(al @ bh).add_(ah @ bh)


def _gram_x3(x: torch.Tensor) -> torch.Tensor:
    """``x xᵀ`` from two TF32 passes (the cross term once, and its transpose)."""
    h, lo = _tf32_split(x)
    cross = h @ lo.mT
    return (cross + cross.mT).baddbmm_(h, h.mT)


def _timed(fn, device, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def products(args, rank: int) -> dict[str, dict[str, float]]:
    """ms of each product of the torch path on the shape buckets per precision (:data:`PRECISIONS`), and the Grams'
    and coordinate gradients' error against float64, relative to the product's norm."""
    device = torch.device(args.device)
    ffn = int(args.hidden * 2.6875)
    out = {}
    for name, (k, m, n) in _shapes(args.hidden, ffn, args.layers).items():
        for side, p in (("A", n), ("B", m)):
            # natural layouts: A [k, r, n] (products from the left), B [k, m, r] (from the right)
            X = torch.randn(k, rank, p, device=device) / p**0.5
            if side == "B":
                X = X.mT.contiguous()
            rows = X if side == "A" else X.mT  # the row form [k, r, p] whose Gram is K
            K = rows @ rows.mT
            Li = torch.linalg.inv(torch.linalg.cholesky(K + 1e-3 * torch.eye(rank, device=device)))
            g = torch.randn_like(X)
            flops = 2 * k * rank * rank * p  # each of the three products

            def precision(prec: str):
                return float32_matmul("high" if prec in ("tf32", "tf32x3") else "highest")

            def variant(prec: str) -> dict:
                if prec == "tf32x3":
                    gram_f, mul = _gram_x3, _matmul_x3
                elif prec == "bf16":
                    gram_f = lambda x: (x.bfloat16() @ x.bfloat16().mT).float()  # noqa: E731
                    mul = lambda a, b: (a.bfloat16() @ b.bfloat16()).float()  # noqa: E731
                else:
                    gram_f, mul = gram, torch.matmul
                add_ = lambda x, a, b: x.add_(mul(a, b)) if prec in ("tf32x3", "bf16") else x.baddbmm_(a, b)  # noqa: E731
                coord = (lambda: mul(Li, g)) if side == "A" else (lambda: mul(g, Li.mT))
                back = (lambda: add_(X.clone(), Li, g)) if side == "A" else (lambda: add_(X.clone(), g, Li.mT))
                return {"gram": lambda: gram_f(rows), "coord": coord, "map": back}

            refs = {"gram": rows.double() @ rows.double().mT,
                    "coord": Li.double() @ g.double() if side == "A" else g.double() @ Li.double().mT}
            for prec in PRECISIONS:
                with precision(prec):
                    for op, fn in variant(prec).items():
                        row = out.setdefault(f"r{rank} {name} {side} [{k}x{p}] {op}", {})
                        row[prec] = _timed(fn, device)
                        if op in refs:
                            row[f"{prec} rel.err"] = ((fn().double() - refs[op]).norm() / refs[op].norm()).item()
            for op in ("gram", "coord", "map"):
                key = f"r{rank} {name} {side} [{k}x{p}] {op}"
                row = out[key]
                print(f"{key:<44} " + "  ".join(
                    f"{pr} {row[pr]:.3f} ms ({flops / row[pr] / 1e9:.0f} TF/s)" for pr in PRECISIONS)
                    + "".join(f"  {pr} {row[pr]:.1e}" for pr in row if pr.endswith("err")), flush=True)
    return out


def overlap(args, rank: int, batch: int) -> dict[str, float]:
    """fwd+bwd ms alone, the side-stream Grams alone, and both at once (Grams on a second stream)."""
    device = torch.device(args.device)
    args.rank = rank
    model = build(args, device)
    tokens = torch.randint(0, args.vocab, (batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    factors = [p for n, p in model.named_parameters() if p.requires_grad]
    side = torch.cuda.Stream(priority=0)

    def grams():
        with torch.cuda.stream(side):
            for p in factors:
                x = p if p.shape[0] <= p.shape[1] else p.mT
                x @ x.mT

    def fb():
        _forward_backward(model, tokens, device)
        model.zero_grad(set_to_none=True)

    def both():
        side.wait_stream(torch.cuda.current_stream())
        grams()
        fb()
        torch.cuda.current_stream().wait_stream(side)

    def grams_alone():
        side.wait_stream(torch.cuda.current_stream())
        grams()
        torch.cuda.current_stream().wait_stream(side)

    res = {"fwd_bwd_ms": _timed(fb, device, 8), "grams_ms": _timed(grams_alone, device, 8),
           "both_ms": _timed(both, device, 8)}
    res["hidden_share"] = (res["fwd_bwd_ms"] + res["grams_ms"] - res["both_ms"]) / max(res["grams_ms"], 1e-9)
    print(f"r={rank} batch {batch}: fwd+bwd {res['fwd_bwd_ms']:.2f} ms, Grams alone {res['grams_ms']:.2f} ms, "
          f"both {res['both_ms']:.2f} ms: {res['hidden_share'] * 100:.0f} % of the Grams hidden", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=["sds"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--products", action="store_true")
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the profile tables and results.json")
    args = ap.parse_args(argv)
    if args.overlap and not args.device.startswith("cuda"):
        ap.error("--overlap times CUDA streams: it needs --device cuda")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    res: dict = {}
    for rank in args.ranks:
        if args.products:
            res[f"products r{rank}"] = products(args, rank)
        elif args.overlap:
            for batch in args.batch:
                res[f"overlap r{rank} b{batch}"] = overlap(args, rank, batch)
        else:
            for batch in args.batch:
                res[f"split r{rank} b{batch}"] = split_step(args, rank, batch, args.out)
    if args.out:
        name = "products" if args.products else "overlap" if args.overlap else "split"
        with open(f"{args.out}/{name}.json", "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
