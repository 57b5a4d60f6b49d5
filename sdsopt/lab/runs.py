"""One training run of the harness and the grid of them, from a typed :class:`RunConfig`.

For each seed a task builds one pre-trained base and one LoRA initialisation; every (mode, lr) run starts from a
copy of them and sees the same batches in the same order, so an A/B changes exactly the optimizer's rewrite.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..diagnostics import factor_pairs, snapshot
from ..optim import SDSAdamW
from ..pairing import a_rows, b_matrix
from ..reference import PaperSDSLayers
from .extras import require
from .metrics import pair_metrics
from .optimizers import make_optimizer, needs_capture, sds_warmup
from .peers import is_peer
from .store import RunStore

__all__ = ["AUTOCAST", "SCHEDULES", "MetricsRecorder", "RunConfig", "autocast", "grid_keys", "make_schedulers",
           "run_grid", "run_one"]

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunConfig:
    """The recipe of every run of a grid; the defaults are the CLI's.

    Attributes:
        steps: optimizer steps per run.
        schedule, warmup_ratio: the lr schedule of :data:`SCHEDULES` after a linear warm-up over
            ``ceil(warmup_ratio·steps)`` steps (:func:`make_schedulers`).
        beta1, weight_decay: Adam's first beta (the second is 0.999) and the decoupled weight decay, in every mode.
        metrics_every: record docs/math.md §5 metrics at step 1 and every this many steps (0: off, no capture).
        device, autocast: where the models run, and the forward/backward's mixed precision (:data:`AUTOCAST`).
        accuracy: score the task's held-out accuracy too, where it has one (the LLM tasks' greedy exact match
            generates: off saves a third of a short run's time; the held-out loss is always scored).
        opt: SDSAdamW options for every SDS mode (``warmup_steps``, ``step_damping``, …); read, never written.
        grad_accum: micro-batches per optimizer step (their mean loss is what each step descends).
        eval_every: also score the held-out loss (and accuracy) every this many steps (0: at the end only).
        loraplus_ratio: λ of the peer mode ``loraplus`` (``loraplus<λ>`` names its own).
        psi_iters, psi_momentum, psi_dampening, psi_lmbd, psi_adam_lr: :class:`sdsopt.PSILoRA`'s
            ``lookahead_iters``, ``momentum``, ``dampening``, ``lmbd`` and ``adam_lr`` (None: the run's lr).
    """

    steps: int = 300
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    beta1: float = 0.9
    weight_decay: float = 0.0
    metrics_every: int = 10
    device: str = "cpu"
    autocast: str = "none"
    accuracy: bool = True
    opt: Mapping[str, Any] = field(default_factory=dict)
    grad_accum: int = 1
    eval_every: int = 0
    loraplus_ratio: float = 16.0
    psi_iters: int = 1
    psi_momentum: float = 0.0
    psi_dampening: float = 0.0
    psi_lmbd: float = 1e-2
    psi_adam_lr: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RunConfig: steps={self.steps} must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"RunConfig: schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"RunConfig: autocast={self.autocast!r}; choose one of {', '.join(AUTOCAST)}")
        if self.grad_accum < 1 or self.eval_every < 0:
            raise ValueError(f"RunConfig: grad_accum={self.grad_accum} must be >= 1 and eval_every="
                             f"{self.eval_every} >= 0")

    def psi_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`sdsopt.PSILoRA` for the modes ``psi`` and ``psi_scaled``."""
        return dict(lookahead_iters=self.psi_iters, momentum=self.psi_momentum, dampening=self.psi_dampening,
                    lmbd=self.psi_lmbd, adam_lr=self.psi_adam_lr)

    def options_for(self, mode: str) -> dict[str, Any]:
        """The ``options`` of :func:`~sdsopt.lab.optimizers.make_optimizer` in ``mode``: a peer's own (LoRA+'s
        ratio λ for ``loraplus``), else :attr:`opt`."""
        if is_peer(mode):
            return {"ratio": self.loraplus_ratio} if mode == "loraplus" else {}
        return dict(self.opt)


class MetricsRecorder:
    """Records docs/math.md §5 metrics of one optimizer step, averaged over the LoRA pairs: :meth:`before` the
    step, :meth:`after` it.  Needs an SDSAdamW attached to its model (the capture gives the full gradient); the
    pairs and the copies before the step are :mod:`sdsopt.diagnostics`' (what ``opt.track_step()`` keeps)."""

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


def make_schedulers(opt: Any, config: RunConfig) -> list[Any]:
    """``config.schedule`` with its warm-up on every optimizer of the run, by ``transformers.get_scheduler`` (the
    schedule HF Trainer and TRL users get): a linear warm-up over ``ceil(warmup_ratio·steps)`` steps (Trainer's
    rounding), then constant, linear or cosine decay to 0 at ``steps``.  Empty for a constant lr (and then
    ``transformers`` is not imported)."""
    warm = math.ceil(config.warmup_ratio * config.steps)
    if config.schedule == "constant" and warm == 0:
        return []
    from transformers import get_scheduler

    return [get_scheduler(SCHEDULES[config.schedule], o, num_warmup_steps=warm, num_training_steps=config.steps)
            for o in getattr(opt, "optimizers", [opt])]


def autocast(config: RunConfig) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``config.device`` in ``config.autocast``'s dtype, or nothing (``none``)."""
    dtype = AUTOCAST[config.autocast]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def _held_out(task: Any, model: nn.Module, config: RunConfig) -> dict[str, float]:
    """The held-out loss and, where the task has one and ``config.accuracy``, its accuracy (under autocast)."""
    with autocast(config):
        extra = {"accuracy": task.eval_accuracy(model)} if config.accuracy and hasattr(task, "eval_accuracy") else {}
        return {"eval": task.eval_loss(model), **extra}


def _to(batch: Any, device: str) -> Any:
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def run_one(task: Any, mode: str, lr: float, seed: int, config: RunConfig, progress: Any = None,
            on_step: Callable[[int, nn.Module, Any], None] | None = None) -> dict[str, Any]:
    """One training run of ``mode`` at ``lr`` on ``task`` (set up for ``seed``): its train-loss curve (NaN from
    the first non-finite loss on), its §5 metrics, the mean train loss of the last 5 % of steps, the held-out loss
    and, where the task has one, the held-out accuracy (with ``config.eval_every``, also their curve
    ``eval_curve``).  Each step averages ``config.grad_accum`` micro-batches.  ``progress`` (a tqdm bar) advances
    one per step; ``on_step(step, model, opt)``, if given, is called after every optimizer step and its
    schedulers' step (e.g. ``benchmarks/delta_alignment.py`` reads the weights there)."""
    model = (task.full_model(seed) if mode == "full" else task.lora_model(seed)).to(config.device)
    opt = make_optimizer(mode, model, lr, (config.beta1, 0.999), config.weight_decay, psi=config.psi_options(),
                         options=config.options_for(mode))
    schedulers = make_schedulers(opt, config)
    recorder = None
    layers = PaperSDSLayers(model, total_steps=config.steps) if mode == "sds_layer" else None
    if isinstance(opt, SDSAdamW) and (needs_capture(mode) or config.metrics_every):
        opt.attach(model, keep=True if config.metrics_every else None)  # (None: stops after the start)
        recorder = MetricsRecorder(opt) if config.metrics_every else None
    batches = task.batches(seed)
    curve, metrics, eval_curve = [], [], []
    for step in range(1, config.steps + 1):
        opt.zero_grad()
        value = 0.0
        for _ in range(config.grad_accum):
            batch = _to(next(batches), config.device)
            with autocast(config):
                loss = task.loss(model, batch) / config.grad_accum
            loss.backward()
            value += float(loss.detach())
        record = recorder is not None and (step == 1 or step % config.metrics_every == 0)
        if record:
            recorder.before()
        opt.step()
        for scheduler in schedulers:
            scheduler.step()
        if layers is not None:
            layers.after_step(opt)
        if record:
            metrics.append({"step": step, **recorder.after()})
        if on_step is not None:
            on_step(step, model, opt)
        curve.append(value if math.isfinite(value) else float("nan"))
        if progress is not None:
            progress.update(1)
        if not math.isfinite(value):
            curve += [float("nan")] * (config.steps - step)
            if progress is not None:
                progress.update(config.steps - step)
            break
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            eval_curve.append({"step": step, **_held_out(task, model, config)})
    held_out = _held_out(task, model, config)
    if config.eval_every:
        eval_curve.append({"step": config.steps, **held_out})
    return {"mode": mode, "lr": lr, "seed": seed, "schedule": config.schedule, "warmup_ratio": config.warmup_ratio,
            "sds_warmup": sds_warmup(mode, config.opt), "curve": curve, "metrics": metrics, "final_train": statistics.fmean(curve[-max(1, config.steps // 20):]),
            **held_out, **({"eval_curve": eval_curve} if config.eval_every else {})}


def grid_keys(modes: Iterable[str], lrs: list[float], seeds: int, first_seed: int = 0
              ) -> list[tuple[int, str, float]]:
    """The grid's runs as ``(seed, mode, lr)``, seeds outermost (each seed's base and initialisation built once)."""
    modes = list(modes)
    return [(seed, mode, lr) for seed in range(first_seed, first_seed + seeds) for mode in modes for lr in lrs]


def run_grid(task: Any, modes: Iterable[str], lrs: list[float], seeds: int, config: RunConfig, *,
             first_seed: int = 0, quiet: bool = False, store: RunStore | None = None,
             shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """:func:`run_one` for every mode × lr × seed (seeds ``first_seed`` … ``first_seed + seeds − 1``) on ``task``,
    in :func:`grid_keys`' order.  With ``store``, each finished run is saved there and a run found there is read
    instead of run (resume).  ``shard=(k, n)`` runs only every n-th run from the k-th (one of n worker
    processes filling one store: :mod:`sdsopt.lab.workers`).  Progress bars on stderr, over the runs and over
    each run's steps, unless ``quiet``."""
    tqdm = require("tqdm", "the lab's progress bar").tqdm

    keys = grid_keys(modes, lrs, seeds, first_seed)
    if shard is not None:
        keys = keys[shard[0]::shard[1]]
    runs, ready = [], None
    with tqdm(total=len(keys), desc=task.name, unit="run", disable=quiet, file=sys.stderr, position=0) as outer:
        for seed, mode, lr in keys:
            run = store.load(mode, lr, seed) if store is not None else None
            if run is None:
                if ready != seed:
                    task.setup(seed)
                    ready = seed
                outer.set_postfix(mode=mode, lr=lr, seed=seed)
                with tqdm(total=config.steps, desc=f"{mode} lr {lr:g} seed {seed}", unit="step", disable=quiet,
                          file=sys.stderr, position=1, leave=False) as steps:
                    run = run_one(task, mode, lr, seed, config, steps)
                if store is not None:
                    store.save(run)
            runs.append(run)
            outer.update(1)
    return runs
