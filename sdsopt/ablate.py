"""A/B harness: every comparison mode on identical data and initialisation, with the paper's metrics.

    python -m sdsopt.ablate --task linear                    # or: sdsopt-ablate --task linear
    python -m sdsopt.ablate --task digits --seeds 3
    python -m sdsopt.ablate --task textlm --steps 400 --device cuda
    python -m sdsopt.ablate --task smollm_math --rank 8 --device cuda --autocast bf16   # pip install "sdsopt[smollm]"

For each seed the task builds one pre-trained base and one LoRA initialisation; every (mode, lr) run
starts from a copy of them and sees the same batches in the same order, so an A/B changes exactly
the optimizer's rewrite.  Modes are :data:`sdsopt.MODES` plus ``sds_sigma`` (``sds_polar`` with the
singular-value channel), the peers of docs/math.md §7 (``lorapro``, an SDSAdamW mode; ``loraplus`` with
``--loraplus-ratio`` λ, or ``loraplus<λ>`` such as ``loraplus4``; ``rite``; ``peft_riemannian``:
:mod:`sdsopt.peers`), ``sds_undamped`` (``sds`` with ``step_damping=0``), ``psi`` (:class:`sdsopt.PSILoRA`,
``--psi-iters``/``--psi-momentum``/``--psi-dampening``/``--psi-lmbd``/``--psi-adam-lr``; ``psi_scaled`` with
the diagonal metric), ``sds_layer`` (the paper's
re-parameterised layer, :class:`sdsopt.reference.PaperSDSLayers`, with AdamW) and ``full`` (full
fine-tuning with AdamW, the reference).

Writes to ``--out``: ``curves.csv`` (train loss per step), ``metrics.csv`` (docs/math.md §5 metrics every
``--metrics-every`` steps, averaged over the model's pairs), ``summary.json``, and the plots
``loss_vs_step.png``, ``final_vs_lr.png``, ``metrics_vs_step.png``; prints a summary table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diagnostics import factor_pairs, snapshot
from .metrics import pair_metrics
from .optim import SDSAdamW
from .pairing import a_rows, b_matrix
from .peers import is_peer, make_peer
from .psi import PSILoRA
from .reference import PaperSDSLayers

__all__ = ["ABLATION_MODES", "DEFAULT_MODES", "main", "make_task", "run_grid"]

DEFAULT_MODES = ("full", "lora", "sds", "sds_undamped", "sds_polar", "sds_sigma", "scaled", "sds_layer", "psi",
                 "psi_scaled", "svd_oracle")
ABLATION_MODES = (*DEFAULT_MODES, "lorapro", "loraplus", "loraplus4", "rite", "peft_riemannian")
TASKS = ("linear", "psi_linear", "digits", "textlm", "minilm", "smollm_math", "smollm_code")
DEFAULT_LRS = {"linear": [1e-3, 3e-3, 1e-2, 3e-2], "digits": [3e-4, 1e-3, 3e-3, 1e-2], "textlm": [1e-3, 3e-3, 1e-2, 3e-2],
               "minilm": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "psi_linear": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
               "smollm_math": [1e-4, 3e-4, 1e-3, 3e-3], "smollm_code": [1e-4, 3e-4, 1e-3, 3e-3]}
DEFAULT_STEPS = {"linear": 300, "digits": 300, "textlm": 300, "minilm": 300, "psi_linear": 300, "smollm_math": 300,
                 "smollm_code": 300}


def make_task(name: str, args: argparse.Namespace):
    """Build a task of :data:`TASKS` from the command line."""
    if name == "linear":
        from .tasks.linear import LinearTask

        return LinearTask(m=args.m, n=args.n, rank=args.rank, target_rank=args.target_rank, kappa=args.kappa,
                          noise=args.noise, batch=args.batch)
    if name == "digits":
        from .tasks.digits import DigitsTask

        return DigitsTask(rank=args.rank, pretrain_steps=args.pretrain_steps)
    if name == "textlm":
        from .tasks.text import TextLMTask

        return TextLMTask(rank=args.rank, width=args.width, layers=args.layers, block=args.block,
                          pretrain_steps=args.pretrain_steps, device=args.device)
    if name == "psi_linear":
        from .tasks.linear import SyntheticLowRankTask

        return SyntheticLowRankTask(rank=args.rank, batch=args.batch)
    if name == "minilm":
        from .tasks.minilm import MiniLMTopicsTask

        return MiniLMTopicsTask(rank=args.rank, max_len=args.max_len or 128, model_dir=args.model_dir, device=args.device)
    if name in ("smollm_math", "smollm_code"):
        from .tasks.smollm import SmolLMTask

        return SmolLMTask(kind=name.split("_")[1], rank=args.rank, alpha=args.lora_alpha, rslora=args.rslora,
                          batch=args.batch or 8, max_len=args.max_len or 320, eval_examples=args.eval_examples,
                          difficulty=args.difficulty, model_dir=args.model_dir, gguf_file=args.gguf_file,
                          device=args.device)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def make_optimizer(mode: str, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   psi: dict[str, Any] | None = None, options: dict[str, Any] | None = None):
    """The optimizer of one run: a peer of :mod:`sdsopt.peers` (``options``: its own), AdamW for ``full``,
    :class:`sdsopt.PSILoRA` for ``psi`` (``psi``: its ``lookahead_iters``, ``momentum``, ``lmbd``, ``adam_lr``),
    else SDSAdamW in ``mode`` (same Adam everywhere) with ``options`` (``--opt KEY=VALUE``: e.g. ``warmup_steps``,
    ``step_damping``) on top of the mode's own."""
    if is_peer(mode):
        return make_peer(mode, model, lr, betas, weight_decay, options)
    if mode in ("psi", "psi_scaled"):
        extra = dict(metric="diagonal") if mode == "psi_scaled" else {}
        return PSILoRA(model, lr=lr, betas=betas, weight_decay=weight_decay, **{**(psi or {}), **extra})
    if mode in ("full", "sds_layer"):  # sds_layer: AdamW on the paper's layer (PaperSDSLayers in run_one)
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                                 weight_decay=weight_decay, foreach=False)
    kw: dict[str, Any] = {"sds_sigma": dict(mode="sds_polar", decouple_sigma=True),
                          "sds_undamped": dict(mode="sds", step_damping=0.0)}.get(mode, dict(mode=mode))
    if mode != "lora":  # lora is plain AdamW on the factors: an SDS option would not change it
        kw.update(options or {})
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=lr, betas=betas,
                   weight_decay=weight_decay, **kw)
    return opt


class MetricsRecorder:
    """Records docs/math.md §5 metrics of one optimizer step, averaged over the LoRA pairs (off unless asked).
    The pairs and the copies before the step are :mod:`sdsopt.diagnostics`' (what ``opt.track_step()`` keeps)."""

    def __init__(self, opt: SDSAdamW) -> None:
        self.opt = opt
        self.capture = opt.capture
        self.pairs = factor_pairs(opt.param_groups)

    def before(self) -> None:
        self._before = [(A0, B0, self.capture.full(A, B, torch.float64))
                        for (A, B), (A0, B0) in zip(self.pairs, snapshot(self.opt.param_groups))]

    def after(self) -> dict[str, float]:
        rows = [pair_metrics(a_rows(A0), b_matrix(B0), a_rows(A.detach()) - a_rows(A0),
                             b_matrix(B.detach()) - b_matrix(B0), G)
                for (A, B), (A0, B0, G) in zip(self.pairs, self._before)]
        finite = lambda v: v if math.isfinite(v) else float("nan")  # noqa: E731
        return {k: statistics.fmean(finite(r[k]) for r in rows) for k in rows[0]}


def run_one(task, mode: str, lr: float, seed: int, args: argparse.Namespace, progress=None) -> dict[str, Any]:
    """One training run; returns its curve, metrics and final losses."""
    model = (task.full_model(seed) if mode == "full" else task.lora_model(seed)).to(args.device)
    betas = (args.beta1, 0.999)
    opt = make_optimizer(mode, model, lr, betas, args.weight_decay,
                         psi=dict(lookahead_iters=getattr(args, "psi_iters", 1),
                                  momentum=getattr(args, "psi_momentum", 0.0),
                                  dampening=getattr(args, "psi_dampening", 0.0), lmbd=getattr(args, "psi_lmbd", 1e-2),
                                  adam_lr=getattr(args, "psi_adam_lr", None)),
                         options=peer_options(mode, args) if is_peer(mode) else getattr(args, "opt", None))
    recorder = None
    layers = PaperSDSLayers(model, total_steps=args.steps) if mode == "sds_layer" else None
    if isinstance(opt, SDSAdamW) and (mode == "svd_oracle" or args.metrics_every):
        opt.attach(model)
        recorder = MetricsRecorder(opt) if args.metrics_every else None
    batches = task.batches(seed)
    curve, metrics = [], []
    for step in range(1, args.steps + 1):
        batch = next(batches)
        batch = tuple(t.to(args.device) for t in batch) if isinstance(batch, tuple) else batch.to(args.device)
        opt.zero_grad()
        with autocast(args):
            loss = task.loss(model, batch)
        loss.backward()
        record = recorder is not None and (step == 1 or step % args.metrics_every == 0)
        if record:
            recorder.before()
        opt.step()
        if layers is not None:
            layers.after_step(opt)
        if record:
            metrics.append({"step": step, **recorder.after()})
        value = float(loss.detach())
        curve.append(value if math.isfinite(value) else float("nan"))
        if progress is not None:
            progress.update(1)
        if not math.isfinite(value):
            curve += [float("nan")] * (args.steps - step)
            if progress is not None:
                progress.update(args.steps - step)
            break
    tail = [v for v in curve[-max(1, args.steps // 20):]]
    with autocast(args):
        extra = {"accuracy": task.eval_accuracy(model)} if hasattr(task, "eval_accuracy") else {}
        held_out = task.eval_loss(model)
    return {"mode": mode, "lr": lr, "seed": seed, "curve": curve, "metrics": metrics,
            "final_train": statistics.fmean(tail), "eval": held_out, **extra}


def peer_options(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The peer's own options from the command line (LoRA+'s ratio λ)."""
    return {"ratio": getattr(args, "loraplus_ratio", 16.0)} if mode == "loraplus" else {}


def mode_name(text: str) -> str:
    """A ``--modes`` entry: one of :data:`ABLATION_MODES`, or ``loraplus<λ>`` (e.g. ``loraplus8``)."""
    import re

    if text in ABLATION_MODES or re.fullmatch(r"loraplus\d+(\.\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown mode {text!r}; choose from {', '.join(ABLATION_MODES)} "
                                     "or loraplus<λ> (e.g. loraplus8)")


def autocast(args: argparse.Namespace):
    """``torch.autocast`` on ``--device`` in ``--autocast``'s dtype (``bf16``/``fp16``), or nothing (``none``)."""
    import contextlib

    name = getattr(args, "autocast", "none")
    if name == "none":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name])


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--opt``: the value read as a Python literal (``10``, ``0.5``, ``False``), else a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--opt {text!r}: write KEY=VALUE, e.g. --opt warmup_steps=50")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_grid(task, modes: Iterable[str], lrs: list[float], seeds: int, args: argparse.Namespace) -> list[dict]:
    """Every mode × lr × seed on ``task``; seeds outermost so each base/initialisation is built once."""
    from tqdm.auto import tqdm

    modes = list(modes)
    runs = []
    with tqdm(total=len(modes) * len(lrs) * seeds * args.steps, desc=task.name, unit="step",
              disable=args.quiet, file=sys.stderr) as progress:
        first = getattr(args, "first_seed", 0)
        for seed in range(first, first + seeds):
            task.setup(seed)
            for mode in modes:
                for lr in lrs:
                    progress.set_postfix(mode=mode, lr=lr, seed=seed)
                    runs.append(run_one(task, mode, lr, seed, args, progress))
    return runs


def _spread(values: list[float]) -> float:
    """Population standard deviation over seeds; NaN when a run diverged (non-finite), 0 for one seed."""
    if not all(math.isfinite(v) for v in values):
        return float("nan")
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Best lr per mode (by mean held-out loss over seeds), and the gap to full fine-tuning closed."""
    by = defaultdict(list)
    for run in runs:
        by[(run["mode"], run["lr"])].append(run)
    table: dict[str, dict[str, Any]] = {}
    for (mode, lr), group in by.items():
        evals = [r["eval"] for r in group]
        score = statistics.fmean(evals) if all(math.isfinite(e) for e in evals) else float("inf")
        entry = table.get(mode)
        if entry is None or score < entry["eval"]:
            table[mode] = {"lr": lr, "eval": score,
                           "eval_std": _spread(evals),
                           "final_train": statistics.fmean(r["final_train"] for r in group)}
            if all("accuracy" in r for r in group):
                accuracy = [r["accuracy"] for r in group]
                table[mode]["accuracy"] = statistics.fmean(accuracy)
                table[mode]["accuracy_std"] = _spread(accuracy)
    for mode in table:
        table[mode]["lr_sensitivity"] = {lr: statistics.fmean(r["eval"] for r in group)
                                         for (m, lr), group in sorted(by.items()) if m == mode}
    if "lora" in table and "full" in table:
        gap = table["lora"]["eval"] - table["full"]["eval"]
        for entry in table.values():
            entry["gap_closed"] = (table["lora"]["eval"] - entry["eval"]) / gap if gap != 0 else float("nan")
    return table


def write_outputs(task_name: str, runs: list[dict], table: dict, out: Path) -> None:
    """CSV of curves and metrics, JSON summary, PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "mode", "lr", "seed", "step", "loss"])
        for r in runs:
            w.writerows([task_name, r["mode"], r["lr"], r["seed"], i + 1, v] for i, v in enumerate(r["curve"]))
    keys = sorted({k for r in runs for m in r["metrics"] for k in m if k != "step"})
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "mode", "lr", "seed", "step", *keys])
        for r in runs:
            w.writerows([task_name, r["mode"], r["lr"], r["seed"], m["step"], *(m.get(k, "") for k in keys)]
                        for m in r["metrics"])
    with open(out / "summary.json", "w") as fh:
        json.dump({"task": task_name, "table": table,
                   "runs": [{k: v for k, v in r.items() if k not in ("curve", "metrics")} for r in runs]}, fh, indent=1)
    plot(task_name, runs, table, out)


def plot(task_name: str, runs: list[dict], table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def log_scale_if_positive(ax, values: list[float]) -> None:
        """Log y-axis unless no plotted value is finite and positive (every run diverged): matplotlib refuses."""
        if any(math.isfinite(v) and v > 0 for v in values):
            ax.set(yscale="log")

    best = {mode: entry["lr"] for mode, entry in table.items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted: list[float] = []
    for mode, lr in best.items():
        curves = [r["curve"] for r in runs if r["mode"] == mode and r["lr"] == lr]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=f"{mode} (lr {lr:g})")
        plotted += mean
    ax.set(xlabel="step", ylabel="train loss", title=f"{task_name}: loss at each mode's best lr")
    log_scale_if_positive(ax, plotted)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_step.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = []
    for mode, entry in table.items():
        lrs, vals = zip(*sorted(entry["lr_sensitivity"].items()))
        ax.plot(lrs, vals, marker="o", label=mode)
        plotted += vals
    ax.set(xlabel="learning rate", ylabel="held-out loss", xscale="log",
           title=f"{task_name}: final held-out loss vs lr")
    log_scale_if_positive(ax, plotted)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_vs_lr.png", dpi=110)
    plt.close(fig)

    names = [k for k in ("step_effective_rank", "alignment") if any(k in m for r in runs for m in r["metrics"])]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
        for ax, name in zip(axes if len(names) > 1 else [axes], names):
            for mode, lr in best.items():
                rows = [r["metrics"] for r in runs if r["mode"] == mode and r["lr"] == lr and r["metrics"]]
                if rows:
                    steps = [m["step"] for m in rows[0]]
                    ax.plot(steps, [statistics.fmean(rs[i][name] for rs in rows) for i in range(len(steps))], label=mode)
            ax.set(xlabel="step", title=name.replace("_", " "))
        axes_list = axes if len(names) > 1 else [axes]
        axes_list[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "metrics_vs_step.png", dpi=110)
        plt.close(fig)


def format_table(task_name: str, table: dict) -> str:
    lines = [f"{task_name}: best lr per mode (held-out loss, mean over seeds)",
             "| mode | best lr | held-out loss | final train loss | gap to full closed |",
             "|---|---|---|---|---|"]
    for mode in [*[m for m in ABLATION_MODES if m in table], *sorted(m for m in table if m not in ABLATION_MODES)]:
        e = table[mode]
        gap = e.get("gap_closed")
        std = f" ± {e['eval_std']:.2g}" if e["eval_std"] else ""
        accuracy = f" (accuracy {e['accuracy']:.3f} ± {e['accuracy_std']:.2g})" if "accuracy" in e else ""
        lines.append(f"| {mode} | {e['lr']:g} | {e['eval']:.4g}{std}{accuracy} | {e['final_train']:.4g} | "
                     + (f"{gap:.2f} |" if gap is not None and math.isfinite(gap) else "– |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="sdsopt-ablate", description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=TASKS, default="linear")
    ap.add_argument("--modes", nargs="+", type=mode_name, default=list(DEFAULT_MODES), metavar="MODE",
                    help=f"from {', '.join(ABLATION_MODES)}, or loraplus<λ> (default: {' '.join(DEFAULT_MODES)})")
    ap.add_argument("--loraplus-ratio", type=float, default=16.0, help="λ = lr_B / lr_A of mode loraplus")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="≥ 4 per mode recommended")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed … first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--beta1", type=float, default=0.9, help="0 gives Adam without momentum")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--metrics-every", type=int, default=10, help="0 turns metrics off (no capture, no cost)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                    help="mixed precision of the forward and backward (parameters and optimizer stay float32)")
    ap.add_argument("--opt", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                    help="an SDSAdamW option for every SDS mode (repeatable): e.g. --opt warmup_steps=50")
    ap.add_argument("--out", default=None, help="output folder (default runs/<task>)")
    ap.add_argument("--quiet", action="store_true")
    g = ap.add_argument_group("task sizes")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--m", type=int, default=64)
    g.add_argument("--n", type=int, default=64)
    g.add_argument("--target-rank", type=int, default=4)
    g.add_argument("--kappa", type=float, default=100.0)
    g.add_argument("--noise", type=float, default=0.0)
    g.add_argument("--batch", type=int, default=0, help="linear: 0 = full batch")
    g.add_argument("--pretrain-steps", type=int, default=300)
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--block", type=int, default=64)
    g.add_argument("--max-len", type=int, default=None,
                   help="minilm: tokens per paragraph (128); smollm: longest example kept (320)")
    g.add_argument("--lora-alpha", type=float, default=None, help="smollm: LoRA alpha (default 2*rank)")
    g.add_argument("--rslora", action="store_true", help="smollm: scale alpha/sqrt(rank) (the SDS paper's protocol)")
    g.add_argument("--eval-examples", type=int, default=64, help="smollm: held-out examples scored")
    g.add_argument("--difficulty", type=int, default=0, help="smollm_math: extra chained operations per problem")
    g.add_argument("--gguf-file", default=None, help="smollm: GGUF file name inside --model-dir")
    g = ap.add_argument_group("psi (sdsopt.PSILoRA)")
    g.add_argument("--psi-iters", type=int, default=1, help="ALS sweeps per step (0: one Jacobi pass)")
    g.add_argument("--psi-momentum", type=float, default=0.0)
    g.add_argument("--psi-dampening", type=float, default=0.0, help="= --psi-momentum: the EMA form of the authors")
    g.add_argument("--psi-lmbd", type=float, default=1e-2, help="proximal weight λ = lr·lmbd")
    g.add_argument("--psi-adam-lr", type=float, default=None,
                   help="AdamW lr of the parameters that are not LoRA factors (a head; default: --lrs' value)")
    g.add_argument("--model-dir", default=None,
                   help="minilm/smollm: checkpoint folder (default: the sdsopt[minilm] / sdsopt[smollm] package)")
    args = ap.parse_args(argv)
    args.opt = dict(args.opt)
    args.steps = args.steps or DEFAULT_STEPS[args.task]
    lrs = args.lrs or DEFAULT_LRS[args.task]
    out = Path(args.out or f"runs/{args.task}")
    task = make_task(args.task, args)
    t0 = time.time()
    runs = run_grid(task, args.modes, lrs, args.seeds, args)
    table = summarise(runs)
    write_outputs(args.task, runs, table, out)
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f}s; curves, metrics, plots in {out}/")
    print(format_table(args.task, table))
    return table


if __name__ == "__main__":
    main()
