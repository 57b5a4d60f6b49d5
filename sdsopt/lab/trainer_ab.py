"""The A/B over Hugging Face ``Trainer``s, for people who train with their own Trainer.

The user writes one function, ``make_trainer(optimizer_cls, optimizer_kwargs, seed) -> Trainer``, that builds
their Trainer (model with a fresh adapter, data, ``TrainingArguments(seed=seed, ...)``) and passes the two to
``Trainer(optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs))``.  :func:`trainer_ab` calls it for every
mode × lr × seed, trains, reads the train loss and the eval loss from the Trainer's ``state.log_history`` (or
calls ``evaluate()`` once when the logs hold no eval loss after training), and writes the lab's files and tables
(:mod:`sdsopt.lab.report`, :mod:`sdsopt.lab.paired`).  For a paired A/B the function must make a seed's runs
start from the same adapter and see the same batches (build the adapter after ``torch.manual_seed(seed)``; the
Trainer's ``seed`` fixes its data order).

Modes: those SDSAdamW runs (:func:`sdsopt.lab.optimizers.sdsadamw_kwargs`: ``lora``, ``sds``, ``sdsplus<λ>``,
the ``_gs`` modes, ...), ``loraplus<λ>`` (SDSAdamW's ``mode="lora", b_lr_ratio=λ``: LoRA+'s update) and ``full``
(``torch.optim.AdamW``); weight decay and betas are the Trainer's business (its parameter groups).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..optim import SDSAdamW
from .optimizers import sdsadamw_kwargs
from .report import format_tables, summarise, write_outputs
from .runs import grid_keys
from .store import RunStore

__all__ = ["TrainerFactory", "trainer_ab", "trainer_optimizer", "trainer_run"]

TrainerFactory = Callable[[type, dict[str, Any], int], Any]  # (optimizer_cls, optimizer_kwargs, seed) -> Trainer


def trainer_optimizer(mode: str, lr: float, options: dict[str, Any] | None = None) -> tuple[type, dict[str, Any]]:
    """``(optimizer_cls, optimizer_kwargs)`` of ``mode`` at ``lr`` for ``Trainer(optimizer_cls_and_kwargs=...)``
    (``options``: SDSAdamW options for the SDS modes); ``ValueError`` for a mode that has no such class."""
    kw = sdsadamw_kwargs(mode, options)
    if kw is not None:
        return SDSAdamW, {"lr": lr, **kw}
    if mode.startswith("loraplus") and not mode.endswith("_gs"):
        return SDSAdamW, {"lr": lr, "mode": "lora", "b_lr_ratio": float(mode[len("loraplus"):] or 16.0)}
    if mode == "full":
        return torch.optim.AdamW, {"lr": lr}
    raise ValueError(f"trainer_ab: mode {mode!r} has no optimizer class that Trainer can build from its parameter "
                     "groups; use SDSAdamW's modes (lora, sds, sdsplus<λ>, lora_gs, ...), loraplus<λ> or full")


def _logged(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(e.get("step", 0)), float(e[key])) for e in history if key in e]


def trainer_run(make_trainer: TrainerFactory, mode: str, lr: float, seed: int,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One Trainer run: the lab's run record (:func:`sdsopt.lab.runs.run_one`'s keys): ``curve`` is the train
    loss at each logging step, ``eval`` the last eval loss logged, ``eval_curve`` every one logged."""
    optimizer_cls, optimizer_kwargs = trainer_optimizer(mode, lr, options)
    trainer = make_trainer(optimizer_cls, optimizer_kwargs, seed)
    trainer.train()
    history = trainer.state.log_history
    evals = _logged(history, "eval_loss")
    if not evals:
        trainer.evaluate()
        evals = _logged(trainer.state.log_history, "eval_loss")
    curve = [v if math.isfinite(v) else float("nan") for _, v in _logged(history, "loss")]
    last = curve[-max(1, len(curve) // 20):] or [float("nan")]
    schedule = trainer.args.lr_scheduler_type
    return {"mode": mode, "lr": lr, "seed": seed, "schedule": str(getattr(schedule, "value", schedule)),
            "warmup_ratio": float(getattr(trainer.args, "warmup_ratio", 0.0) or 0.0), "curve": curve,
            "metrics": [], "final_train": statistics.fmean(last), "eval": evals[-1][1],
            "eval_curve": [{"step": step, "eval": value} for step, value in evals]}


def trainer_ab(make_trainer: TrainerFactory, modes: Iterable[str], lrs: list[float], seeds: int = 1, *,
               first_seed: int = 0, out: str | Path | None = None, name: str = "trainer",
               options: dict[str, Any] | None = None, resume: bool = False, quiet: bool = False
               ) -> list[dict[str, Any]]:
    """Every mode × lr × seed through ``make_trainer``; with ``out``, the lab's files there (``summary.json``
    with the paired A/B table, ``tables.md``, ``curves.csv``, plots) and, with ``resume``, finished runs read
    from there instead of run again.  Prints the tables unless ``quiet``; returns the runs."""
    modes = list(modes)
    store = RunStore(out) if out is not None else None
    if store is not None:
        store.check_recipe({"name": name, "options": options or {}}, resume)
    runs = []
    for seed, mode, lr in grid_keys(modes, lrs, seeds, first_seed):
        run = store.load(mode, lr, seed) if store is not None else None
        if run is None:
            run = trainer_run(make_trainer, mode, lr, seed, options)
            if store is not None:
                store.save(run)
        runs.append(run)
    table = summarise(runs)
    if out is not None:
        write_outputs(name, runs, table, Path(out), {"modes": modes, "lrs": lrs, "seeds": seeds,
                                                     "first_seed": first_seed, "options": options or {}})
    if not quiet:
        print(format_tables(name, runs, table))
    return runs
