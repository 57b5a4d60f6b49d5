"""Long runs (issue 12): thousands of steps of SDSAdamW, logging loss, conditioning and balance.

    python benchmarks/long_run.py --tasks digits textlm --modes sds sds_polar scaled --dtypes fp32 bf16 \\
        --steps 5000 --device cuda --out benchmarks/results/long_run.json

For each (task, mode, dtype) one run from the task's seed-0 base and LoRA initialisation (parameters cast to
``dtype``; the r×r algebra stays float32 inside the optimizer).  Every ``--log-every`` steps it records the mean
training loss since the last record, whether every parameter is finite, and over the model's LoRA pairs: the
largest condition number of ``A`` and ``B`` (float64 singular values), of the r×r Cholesky factors ``R_A``,
``R_B`` the optimizer inverts (of ``K + τ·trace K·I``, τ = 1e-5, as mode ``sds`` uses; with ``step_damping`` the
optimizer's shift is larger, so these are upper bounds), and the largest and smallest balance ``‖A‖_F / ‖B‖_F``.
The held-out loss is taken at the end (in float32, on a copy).  Prints a summary table (markdown) last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from sdsopt import SDSAdamW
from sdsopt.lab.tasks import TaskConfig, make_task
from sdsopt.linalg import cholesky_lower, gram
from sdsopt.pairing import a_rows, b_matrix

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LRS = {"digits": 1e-2, "textlm": 1e-2}  # the best lr of sds, sds_polar and lora in RESULTS.md's 5-point grids


def cond(X: Tensor) -> float:
    s = torch.linalg.svdvals(X.double())
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def pair_stats(opt: SDSAdamW) -> dict[str, float]:
    """Worst condition numbers and balance extremes over the optimizer's LoRA pairs."""
    rows = []
    for pair in opt.lora_pairs:
        group = opt.param_groups[pair.group]
        A = a_rows(group["params"][pair.index_a].detach()).double()
        B = b_matrix(group["params"][pair.index_b].detach()).double()
        R = {side: cholesky_lower(gram(X.float()[None]), 1e-5)[0].double() for side, X in (("A", A), ("B", B.T))}
        rows.append({"cond_A": cond(A), "cond_B": cond(B), "cond_R_A": cond(R["A"]), "cond_R_B": cond(R["B"]),
                     "balance": float(A.norm() / B.norm()) if B.norm() > 0 else math.inf})
    return {"cond_A": max(r["cond_A"] for r in rows), "cond_B": max(r["cond_B"] for r in rows),
            "cond_R": max(max(r["cond_R_A"], r["cond_R_B"]) for r in rows),
            "balance_max": max(r["balance"] for r in rows), "balance_min": min(r["balance"] for r in rows)}


def cast_batch(batch, dtype: torch.dtype, device: str):
    items = batch if isinstance(batch, tuple) else (batch,)
    out = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in items)
    return out if isinstance(batch, tuple) else out[0]


def run(task, mode: str, dtype_name: str, args: argparse.Namespace) -> dict:
    dtype = DTYPES[dtype_name]
    model = task.lora_model(0).to(device=args.device, dtype=dtype)
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=LRS[task.name],
                   mode=mode, fused=args.device == "cuda")
    batches = task.batches(0)
    log, window, t0 = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = task.loss(model, cast_batch(next(batches), dtype, args.device))
        loss.backward()
        opt.step()
        window.append(float(loss.detach()))
        if step % args.log_every == 0 or step == 1:
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            log.append({"step": step, "loss": statistics.fmean(window), "finite": finite, **pair_stats(opt)})
            window = []
            if not finite or not math.isfinite(log[-1]["loss"]):
                break
    evaluation = task.eval_loss(copy.deepcopy(model).float())
    return {"task": task.name, "mode": mode, "dtype": dtype_name, "lr": LRS[task.name], "steps": args.steps,
            "seconds": time.perf_counter() - t0, "eval": evaluation, "log": log,
            "all_finite": all(r["finite"] and math.isfinite(r["loss"]) for r in log)}


def summary_table(runs: list[dict]) -> str:
    lines = ["| task | mode | dtype | held-out | finite | max cond A / B (steps ≥ log-every) | max cond R | "
             "‖A‖/‖B‖ start → end (max) | ‖A‖/‖B‖ end (min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        first, last = r["log"][0], r["log"][-1]
        later = r["log"][1:] or r["log"]  # step 1's B is LoRA's near-zero start: its condition number says nothing
        ca = max(x["cond_A"] for x in later)
        cb = max(x["cond_B"] for x in later)
        cr = max(x["cond_R"] for x in later)
        finite = "yes" if r["all_finite"] else "NO"
        lines.append(f"| {r['task']} | {r['mode']} | {r['dtype']} | {r['eval']:.4f} | {finite}"
                     f" | {ca:.3g} / {cb:.3g} | {cr:.3g} | {first['balance_max']:.3g} → {last['balance_max']:.3g}"
                     f" | {last['balance_min']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "textlm"])
    parser.add_argument("--modes", nargs="+", default=["sds", "sds_polar", "scaled"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/long_run.json"))
    args = parser.parse_args(argv)
    runs = []
    for name in args.tasks:
        sizes = {"digits": dict(rank=4, pretrain_steps=300), "textlm": dict(rank=8, pretrain_steps=600)}[name]
        task = make_task(TaskConfig(name=name, width=64, layers=2, block=64, **sizes), args.device)
        task.setup(0)
        for mode in args.modes:
            for dtype_name in args.dtypes:
                runs.append(run(task, mode, dtype_name, args))
                r = runs[-1]
                print(f"{name} {mode} {dtype_name}: eval {r['eval']:.4f} finite {r['all_finite']} "
                      f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(runs, indent=1))
    print(summary_table(runs))
    return runs


if __name__ == "__main__":
    main()
