"""Calls the ablation harness from Python: a small linear-task A/B of lora vs sds vs scaled, full fine-tuning as
the reference, through the lab's typed recipe (:class:`sdsopt.lab.TaskConfig`, :class:`sdsopt.lab.RunConfig`).

    python examples/ablation.py [--steps 200]
    (the CLI equivalent: python -m sdsopt.lab --task linear --modes full lora sds scaled --steps 200 ...)

Needs the extra ``ablate`` (the lab's tqdm, matplotlib): ``pip install ".[ablate]"`` in the checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab import RunConfig, TaskConfig, format_table, make_task, run_grid, summarise, write_outputs


def main(argv=None):
    exit_if_missing(["tqdm", "matplotlib"], "examples/ablation.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/example_ablation")
    args = ap.parse_args(argv)
    task = make_task(TaskConfig(name="linear"))
    runs = run_grid(task, ["full", "lora", "sds", "scaled"], [1e-3, 3e-3, 1e-2, 3e-2], seeds=1,
                    config=RunConfig(steps=args.steps), quiet=True)
    table = summarise(runs)
    write_outputs(task.name, runs, table, Path(args.out))
    print(format_table(task.name, table))
    return table


if __name__ == "__main__":
    main()
