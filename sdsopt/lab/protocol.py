"""The task protocol: what :func:`sdsopt.lab.run_grid` needs of a task, for people who bring their own.

A task is any object with these members (no base class to inherit; :class:`Task` is a ``typing.Protocol`` to
check against).  The grid calls ``setup(seed)`` once per seed, then for each mode × lr of that seed builds a
fresh model, draws ``batches(seed)`` and steps ``loss`` on them, and scores ``eval_loss`` (and
``eval_accuracy``, where the task has it) at the end and every ``RunConfig.eval_every`` steps.  An A/B is
paired when every mode of a seed starts from the same model and sees the same batches: build the adapter after
``torch.manual_seed(seed)`` and draw the batches from a generator seeded by ``seed`` (never the global one,
which the optimizers' own draws move).

``examples/own_task.py`` is such a task in about 30 lines; :class:`sdsopt.lab.tasks.causal_lm.CausalLMTask`
builds one from a causal LM and records (``from_records``), as ``python -m sdsopt.lab --model --data`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Task"]


@runtime_checkable
class Task(Protocol):
    """What a task of the lab offers (``full_model`` only for mode ``full``, ``eval_accuracy`` optional)."""

    name: str  # the task's name in tables and plots

    def setup(self, seed: int) -> None:
        """Build what every run of ``seed`` shares (data, a pre-trained base); called once per seed."""

    def lora_model(self, seed: int) -> nn.Module:
        """A fresh model with LoRA pairs (PEFT's names ``lora_A``/``lora_B``, or any sdsopt pairs), the same for
        every mode of ``seed``; only the adapter's parameters require gradients."""

    def full_model(self, seed: int) -> nn.Module:
        """The base model itself, every weight trainable (mode ``full``, the reference)."""

    def batches(self, seed: int) -> Iterator[Any]:
        """Endless training batches (a tensor or a tuple of tensors, moved to the device by the lab), in an
        order fixed by ``seed``."""

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The scalar training loss of ``model`` on ``batch``."""

    def eval_loss(self, model: nn.Module) -> float:
        """The held-out loss (what the A/B ranks by)."""
