"""What a grid of runs (:func:`sdsopt.lab.runs.run_grid`) leaves behind: the summary table, its files and plots.

Files written to the output folder: ``curves.csv`` (train loss per step), ``metrics.csv`` (docs/math.md §5
metrics, averaged over the model's pairs), ``summary.json`` (the table, the paired A/B table of
:mod:`sdsopt.lab.paired`, the recipe and every run but its curves), ``tables.md`` (both tables in markdown), and
the plots ``loss_vs_step.png``, ``final_vs_lr.png`` and, with metrics, ``metrics_vs_step.png``; runs scored
during training (``eval_every``) add ``eval_curves.csv`` and ``eval_vs_step.png``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .extras import require
from .optimizers import ABLATION_MODES, warmup_note
from .paired import ab_rows, format_ab, sd

__all__ = ["format_table", "format_tables", "plot", "summarise", "write_outputs"]


def _spread(values: list[float]) -> float:
    """Population standard deviation over seeds; NaN when a run diverged (non-finite), 0 for one seed."""
    return sd(values) if all(math.isfinite(v) for v in values) else float("nan")


def summarise(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Best lr per mode (by mean held-out loss over seeds; a grid point with a non-finite run ranks last), each
    lr's mean held-out loss, and the gap to full fine-tuning closed where ``lora`` and ``full`` both ran."""
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


def _modes_in_order(runs: list[dict]) -> list[str]:
    """The modes of ``runs`` in the order they first ran (the first is the A/B's reference)."""
    return list(dict.fromkeys(r["mode"] for r in runs))


def warmup_notes(runs: list[dict]) -> list[str]:
    """:func:`sdsopt.lab.optimizers.warmup_note` of each mode of ``runs`` that spends all or most of its steps in
    its warm-up (runs recorded before the key: none)."""
    notes = {r["mode"]: warmup_note(r["mode"], r.get("sds_warmup"), len(r["curve"])) for r in runs}
    return [note for note in notes.values() if note]


def format_tables(task_name: str, runs: list[dict], table: dict) -> str:
    """``tables.md``: the warm-up notes (:func:`warmup_notes`), the summary table (:func:`format_table`) and the
    paired A/B table (:func:`sdsopt.lab.paired.format_ab`, the first mode run as reference)."""
    notes = "".join(f"{note}\n\n" for note in warmup_notes(runs))
    return (notes + format_table(task_name, table) + "\n\n" + format_ab(task_name, ab_rows(runs, _modes_in_order(runs)))
            + "\n")


def _write_records(task_name: str, runs: list[dict], field: str, path: Path) -> None:
    """One CSV row per record ``{"step": ..., name: value, ...}`` of each run's list ``run[field]``."""
    keys = sorted({k for r in runs for e in r.get(field, []) for k in e if k != "step"})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "mode", "lr", "seed", "step", *keys])
        for r in runs:
            w.writerows([task_name, r["mode"], r["lr"], r["seed"], e["step"], *(e.get(k, "") for k in keys)]
                        for e in r.get(field, []))


def write_outputs(task_name: str, runs: list[dict], table: dict, out: Path,
                  recipe: dict[str, Any] | None = None) -> None:
    """The CSVs of curves and metrics, the JSON summary (with ``recipe``, e.g. the command line and every
    option, where given), ``tables.md`` and the PNG plots, into ``out`` (made if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "mode", "lr", "seed", "step", "loss"])
        for r in runs:
            w.writerows([task_name, r["mode"], r["lr"], r["seed"], i + 1, v] for i, v in enumerate(r["curve"]))
    if any(r.get("metrics") for r in runs):  # (metrics off: no file of a header alone)
        _write_records(task_name, runs, "metrics", out / "metrics.csv")
    if any(r.get("eval_curve") for r in runs):
        _write_records(task_name, runs, "eval_curve", out / "eval_curves.csv")
    ab = ab_rows(runs, _modes_in_order(runs)) if runs else []
    with open(out / "summary.json", "w") as fh:
        shared = {k: runs[0][k] for k in ("schedule", "warmup_ratio")} if runs else {}
        json.dump({"task": task_name, **shared, **({"recipe": recipe} if recipe is not None else {}), "table": table,
                   "ab": ab, "runs": [{k: v for k, v in r.items() if k not in ("curve", "metrics", "eval_curve")}
                                      for r in runs]}, fh, indent=1)
    if runs:
        (out / "tables.md").write_text(format_tables(task_name, runs, table))
    plot(task_name, runs, table, out)


def _log_scale_if_positive(ax: Any, values: list[float]) -> None:
    """Log y-axis unless no plotted value is finite and positive (every run diverged): matplotlib refuses."""
    if any(math.isfinite(v) and v > 0 for v in values):
        ax.set(yscale="log")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt  # (imported by plot)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_loss(plt: Any, task_name: str, runs: list[dict], best: dict[str, float], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted: list[float] = []
    for mode, lr in best.items():
        curves = [r["curve"] for r in runs if r["mode"] == mode and r["lr"] == lr]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=f"{mode} (lr {lr:g})")
        plotted += mean
    ax.set(xlabel="step", ylabel="train loss", title=f"{task_name}: loss at each mode's best lr")
    _log_scale_if_positive(ax, plotted)
    ax.legend(fontsize=7)
    _save(fig, out / "loss_vs_step.png")


def _plot_lr(plt: Any, task_name: str, table: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted: list[float] = []
    for mode, entry in table.items():
        lrs, vals = zip(*sorted(entry["lr_sensitivity"].items()))
        ax.plot(lrs, vals, marker="o", label=mode)
        plotted += vals
    ax.set(xlabel="learning rate", ylabel="held-out loss", xscale="log",
           title=f"{task_name}: final held-out loss vs lr")
    _log_scale_if_positive(ax, plotted)
    ax.legend(fontsize=7)
    _save(fig, out / "final_vs_lr.png")


def _plot_metrics(plt: Any, runs: list[dict], best: dict[str, float], out: Path) -> None:
    names = [k for k in ("step_effective_rank", "alignment") if any(k in m for r in runs for m in r["metrics"])]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
    axes_list = list(axes) if len(names) > 1 else [axes]
    for ax, name in zip(axes_list, names):
        for mode, lr in best.items():
            rows = [r["metrics"] for r in runs if r["mode"] == mode and r["lr"] == lr and r["metrics"]]
            if rows:
                steps = [m["step"] for m in rows[0]]
                ax.plot(steps, [statistics.fmean(rs[i][name] for rs in rows) for i in range(len(steps))], label=mode)
        ax.set(xlabel="step", title=name.replace("_", " "))
    axes_list[0].legend(fontsize=7)
    _save(fig, out / "metrics_vs_step.png")


def _plot_eval(plt: Any, task_name: str, runs: list[dict], best: dict[str, float], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted: list[float] = []
    for mode, lr in best.items():
        curves = [r["eval_curve"] for r in runs if r["mode"] == mode and r["lr"] == lr and r.get("eval_curve")]
        if curves:
            steps = [e["step"] for e in curves[0]]
            mean = [statistics.fmean(c[i]["eval"] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, marker=".", label=f"{mode} (lr {lr:g})")
            plotted += mean
    ax.set(xlabel="step", ylabel="held-out loss", title=f"{task_name}: held-out loss at each mode's best lr")
    _log_scale_if_positive(ax, plotted)
    ax.legend(fontsize=7)
    _save(fig, out / "eval_vs_step.png")


def plot(task_name: str, runs: list[dict], table: dict, out: Path) -> None:
    """``loss_vs_step.png`` (mean curve at each mode's best lr), ``final_vs_lr.png`` (held-out loss per lr),
    where metrics were recorded ``metrics_vs_step.png``, and where runs were scored during training
    ``eval_vs_step.png``, into ``out`` (matplotlib's Agg backend)."""
    matplotlib = require("matplotlib", "the lab's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {mode: entry["lr"] for mode, entry in table.items()}
    _plot_loss(plt, task_name, runs, best, out)
    _plot_lr(plt, task_name, table, out)
    _plot_metrics(plt, runs, best, out)
    if any(r.get("eval_curve") for r in runs):
        _plot_eval(plt, task_name, runs, best, out)


def format_table(task_name: str, table: dict) -> str:
    """The summary as a markdown table, modes in :data:`~sdsopt.lab.optimizers.ABLATION_MODES`' order first; the
    column "gap to full closed" only where a ``full`` run gives it."""
    gaps = "full" in table
    lines = [f"{task_name}: best lr per mode (held-out loss, mean over seeds)",
             "| mode | best lr | held-out loss | final train loss |" + (" gap to full closed |" if gaps else ""),
             "|---|---|---|---|" + ("---|" if gaps else "")]
    for mode in [*[m for m in ABLATION_MODES if m in table], *sorted(m for m in table if m not in ABLATION_MODES)]:
        e = table[mode]
        gap = e.get("gap_closed")
        std = f" ± {e['eval_std']:.2g}" if e["eval_std"] else ""
        accuracy = f" (accuracy {e['accuracy']:.3f} ± {e['accuracy_std']:.2g})" if "accuracy" in e else ""
        lines.append(f"| {mode} | {e['lr']:g} | {e['eval']:.4g}{std}{accuracy} | {e['final_train']:.4g} |"
                     + ((f" {gap:.2f} |" if gap is not None and math.isfinite(gap) else " – |") if gaps else ""))
    return "\n".join(lines)
