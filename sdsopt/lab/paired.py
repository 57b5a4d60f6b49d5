"""Paired-seed statistics of a grid: each mode at its best lr, and its per-seed difference to another mode.

Every mode of a seed starts from the same initialisation and sees the same batches, so the difference of two
modes' held-out losses on one seed is free of the seed's own luck; its mean and sd over the seeds, and on how
many seeds a mode is ahead, are what an A/B is read by (``benchmarks/RESULTS.md`` reads them so).

Runs are keyed ``(mode, lr, seed)``.  A mode's best lr is the one of lowest mean held-out loss over the seeds
that ran at every lr of that mode (a grid point with a non-finite run ranks last); sds are population sds over
seeds, as the lab's summaries.  ``benchmarks/paired.py`` prints these tables from saved summaries.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

__all__ = ["ab_rows", "best", "by_key", "format_ab", "format_paired", "paired", "sd"]


def by_key(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, float, int], dict[str, Any]]:
    """The runs keyed ``(mode, lr, seed)`` (a key seen twice keeps the last run)."""
    return {(r["mode"], float(r["lr"]), int(r["seed"])): r for r in runs}


def sd(values: list[float]) -> float:
    """Population sd over seeds, 0 for one seed."""
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def best(runs: dict[tuple[str, float, int], dict[str, Any]], mode: str) -> dict[str, Any]:
    """The mode's best lr over the seeds common to all its lrs: ``lr``, ``edge`` (the best is the grid's
    smallest or largest lr, of several), ``grid``, the best lr's per-seed ``eval`` and ``accuracy``, and
    ``curve`` (each lr's mean held-out loss over the common seeds)."""
    by_lr: dict[float, dict[int, dict[str, Any]]] = defaultdict(dict)
    for (m, lr, seed), run in runs.items():
        if m == mode:
            by_lr[lr][seed] = run
    if not by_lr:
        raise KeyError(f"no run of mode {mode!r}")
    seeds = set.intersection(*(set(s) for s in by_lr.values()))

    def score(lr: float) -> float:
        evals = [by_lr[lr][s]["eval"] for s in seeds]
        return statistics.fmean(evals) if evals and all(math.isfinite(e) for e in evals) else math.inf

    lrs = sorted(by_lr)
    lr = min(lrs, key=score)
    # the best lr's own seeds (may be more than the common ones: e.g. extra seeds run at the best lr only)
    per_seed = {s: r["eval"] for s, r in by_lr[lr].items()}
    acc = {s: r["accuracy"] for s, r in by_lr[lr].items() if "accuracy" in r}
    return {"lr": lr, "edge": lr in (lrs[0], lrs[-1]) and len(lrs) > 1, "grid": lrs, "eval": per_seed,
            "accuracy": acc, "curve": {x: score(x) for x in lrs}}


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """``a`` − ``b`` per seed (two :func:`best` entries, the seeds both ran): ``mean``, ``sd``, ``wins`` (seeds
    where ``a`` has the lower loss), ``seeds`` and the per-seed ``differences``; None without a common seed or
    with a non-finite difference."""
    seeds = sorted(set(a["eval"]) & set(b["eval"]))
    d = [a["eval"][s] - b["eval"][s] for s in seeds]
    if not d or not all(math.isfinite(x) for x in d):
        return None
    return {"mean": statistics.fmean(d), "sd": sd(d), "wins": sum(x < 0 for x in d), "seeds": len(d),
            "differences": dict(zip(seeds, d))}


def format_paired(diff: dict[str, Any] | None) -> str:
    """``+0.35 ± 0.05 (0/2)``: mean ± sd of the per-seed differences (seeds ahead / seeds), or ``–``."""
    if diff is None:
        return "–"
    return f"{diff['mean']:+.4g} ± {diff['sd']:.2g} ({diff['wins']}/{diff['seeds']})"


def ab_rows(runs: Iterable[dict[str, Any]], modes: list[str]) -> list[dict[str, Any]]:
    """One row per mode of ``modes`` (the first is the reference): best lr, whether it is the grid's edge, the
    seeds, held-out loss and accuracy mean ± sd at that lr, and the paired difference to the reference."""
    keyed = by_key(runs)
    table = {m: best(keyed, m) for m in modes}
    ref = table[modes[0]]
    rows = []
    for mode in modes:
        e = table[mode]
        ev, acc = list(e["eval"].values()), list(e["accuracy"].values())
        finite = all(math.isfinite(x) for x in ev)
        rows.append({"mode": mode, "lr": e["lr"], "edge": e["edge"], "grid": e["grid"], "seeds": sorted(e["eval"]),
                     "eval": statistics.fmean(ev) if finite else float("nan"), "eval_sd": sd(ev) if finite
                     else float("nan"), "eval_per_seed": e["eval"], "lr_curve": e["curve"],
                     **({"accuracy": statistics.fmean(acc), "accuracy_sd": sd(acc)} if acc else {}),
                     "vs_first": paired(e, ref) if mode != modes[0] else None})
    return rows


def format_ab(task_name: str, rows: list[dict[str, Any]]) -> str:
    """The A/B table in markdown: per mode its best lr, seeds, held-out loss and accuracy mean ± sd, and the
    paired difference to the first mode (negative: lower loss than it)."""
    ref = rows[0]["mode"]
    lines = [f"{task_name}: each mode at its best lr, paired over seeds against {ref} "
             f"(difference < 0: lower held-out loss than {ref}; (k/n): ahead on k of n seeds)",
             f"| mode | best lr | seeds | held-out loss ± sd | accuracy ± sd | vs {ref} (per seed) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['lr']:g}" + (" (edge)" if r["edge"] else "")
        loss = f"{r['eval']:.4g} ± {r['eval_sd']:.2g}" if math.isfinite(r["eval"]) else "non-finite"
        acc = f"{r['accuracy']:.3f} ± {r['accuracy_sd']:.2g}" if "accuracy" in r else "–"
        vs = format_paired(r["vs_first"]) if r["mode"] != ref else "–"
        lines.append(f"| {r['mode']} | {lr} | {len(r['seeds'])} | {loss} | {acc} | {vs} |")
    return "\n".join(lines)
