"""Your own task in the lab: the task protocol (sdsopt.lab.protocol.Task) in ~30 lines, then an A/B on it.

A frozen random linear map is LoRA-adapted to a rank-2 change of itself; ``run_grid`` runs lora and sds from the
same adapter and batches per seed and prints the lab's tables (best lr, paired difference to the first mode).

    python examples/own_task.py [--steps 200] [--seeds 3] [--out runs/own_task]

Needs the extra ``ablate`` (the lab's tqdm, matplotlib): ``pip install ".[ablate]"`` in the checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab import RunConfig, format_tables, run_grid, summarise, write_outputs
from sdsopt.lab.tasks.lora import LoraLinear


class LowRankShift:
    """Learn ``W0 + U Vᵀ`` from inputs and outputs, with a LoRA around the frozen ``W0``."""

    name = "low_rank_shift"

    def __init__(self, n: int = 32, rank: int = 4, batch: int = 64) -> None:
        self.n, self.rank, self.batch = n, rank, batch

    def setup(self, seed: int) -> None:  # what every run of the seed shares
        gen = torch.Generator().manual_seed(seed)
        self.w0 = torch.randn(self.n, self.n, generator=gen) / self.n**0.5
        self.target = self.w0 + torch.randn(self.n, 2, generator=gen) @ torch.randn(2, self.n, generator=gen) / 4
        self.x_eval = torch.randn(256, self.n, generator=gen)

    def _base(self) -> nn.Linear:
        base = nn.Linear(self.n, self.n, bias=False)
        base.weight.data.copy_(self.w0)
        return base

    def lora_model(self, seed: int) -> nn.Module:  # the same adapter for every mode of the seed
        torch.manual_seed(seed)
        return LoraLinear(self._base(), self.rank)

    def full_model(self, seed: int) -> nn.Module:
        return self._base()

    def batches(self, seed: int):  # the same batches for every mode of the seed
        gen = torch.Generator().manual_seed(10_000 + seed)
        while True:
            yield torch.randn(self.batch, self.n, generator=gen)

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (model(x) - x @ self.target.T).pow(2).mean()

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        return float(self.loss(model, self.x_eval))


def main(argv: list[str] | None = None) -> list[dict]:
    exit_if_missing(["tqdm", "matplotlib"], "examples/own_task.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/own_task")
    args = ap.parse_args(argv)
    task = LowRankShift()
    runs = run_grid(task, ["lora", "sds"], [3e-3, 1e-2, 3e-2], args.seeds, RunConfig(steps=args.steps, metrics_every=0),
                    quiet=True)
    table = summarise(runs)
    write_outputs(task.name, runs, table, Path(args.out))
    print(format_tables(task.name, runs, table))
    return runs


if __name__ == "__main__":
    main()
