"""Calls the ablation harness from Python: a small linear-task A/B of lora vs sds vs scaled.

    python examples/ablation.py [--steps 200]      (the CLI equivalent: python -m sdsopt.ablate --task linear ...)
"""

from __future__ import annotations

import argparse

from sdsopt.ablate import main as ablate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/example_ablation")
    args = ap.parse_args(argv)
    return ablate(["--task", "linear", "--modes", "full", "lora", "sds", "scaled", "--steps", str(args.steps),
                   "--lrs", "1e-3", "3e-3", "1e-2", "3e-2", "--out", args.out, "--quiet"])


if __name__ == "__main__":
    main()
