"""Paired-seed comparison of lab runs: each mode at its best lr against a reference mode and the best LoRA+.

    python benchmarks/paired.py benchmarks/ablation/gradient_start/digits --ref sds --peers loraplus4 loraplus16

The statistics are :mod:`sdsopt.lab.paired`'s (what ``python -m sdsopt.lab`` prints for one grid).  Reads every
``summary.json`` under the folders given (``python -m sdsopt.lab`` outputs; a run seen twice, same
mode, lr and seed, keeps the last one read) and prints one markdown table: per mode its best lr (lowest mean
held-out loss over the seeds that ran at every lr of that mode; a grid point with a non-finite run ranks last),
whether that lr is the grid's edge, held-out loss mean ± sd (population sd over seeds, as the harness's
summaries), accuracy where the task has one, and the paired per-seed difference of held-out loss against
``--ref`` at its best lr and against the best of ``--peers`` (the peer with the lowest mean at its best lr):
mean ± sd of the per-seed differences, and on how many seeds the mode is ahead (lower loss).  Differences use
only the seeds both modes ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdsopt.lab.paired import best, by_key, format_paired, paired, sd  # noqa: E402


def load(folders: list[Path]) -> dict[tuple[str, float, int], dict]:
    """Every run of every ``summary.json`` under ``folders``, keyed ``(mode, lr, seed)`` (the last read wins)."""
    return by_key(run for folder in folders for path in sorted(folder.rglob("summary.json"))
                  for run in json.loads(path.read_text())["runs"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--ref", default="sds")
    p.add_argument("--peers", nargs="*", default=["loraplus4", "loraplus16"])
    p.add_argument("--modes", nargs="*", help="order of the rows (default: every mode found, sorted)")
    p.add_argument("--curves", action="store_true", help="also print every mode's mean held-out loss per lr")
    args = p.parse_args(argv)
    runs = load(args.folders)
    modes = args.modes or sorted({m for m, _, _ in runs})
    table = {m: best(runs, m) for m in modes}
    peers = [m for m in args.peers if m in table]
    peer = min(peers, key=lambda m: statistics.fmean(table[m]["eval"].values())) if peers else None
    print(f"reference: {args.ref}; best LoRA+: {peer}\n")
    print(f"| mode | best lr | seeds | held-out loss | accuracy | vs {args.ref} (per seed) | vs {peer} (per seed) |")
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        e = table[m]
        ev = list(e["eval"].values())
        acc = list(e["accuracy"].values())
        loss = f"{statistics.fmean(ev):.4g} ± {sd(ev):.2g}" if all(math.isfinite(x) for x in ev) else "non-finite"
        accs = f"{statistics.fmean(acc):.3f} ± {sd(acc):.2g}" if acc else "–"
        lr = f"{e['lr']:g}" + (" (edge)" if e["edge"] else "")
        vs_ref = format_paired(paired(e, table[args.ref])) if args.ref in table and m != args.ref else "–"
        vs_peer = format_paired(paired(e, table[peer])) if peer and m != peer else "–"
        print(f"| {m} | {lr} | {len(ev)} | {loss} | {accs} | {vs_ref} | {vs_peer} |")
    if args.curves:
        print("\nmean held-out loss per lr (seeds common to the mode's grid):\n")
        for m in modes:
            print(f"- {m}: " + ", ".join(f"{lr:g}: {v:.4g}" for lr, v in table[m]["curve"].items()))


if __name__ == "__main__":
    main()
