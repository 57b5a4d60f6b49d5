"""The interface every mode implements, and the narrow context it receives for one param group's step.

In the spirit of optax's gradient transformations a mode is one object with three parts:

* what it accepts and keeps: :meth:`Mode.validate` checks its own options, :attr:`Mode.state_keys` declares the
  per-parameter state it adds to AdamW's (created lazily, on a pair's first step, as AdamW's);
* what Adam sees: :meth:`Mode.transform` rewrites the step's lists in place (gradients replaced, or pairs stepped
  by the mode itself and taken out of the lists);
* the map back: the function :meth:`Mode.transform` returns, run after the common Adam call.

A mode never sees the optimizer: it gets a :class:`StepContext` (the group, the step's lists, the per-parameter
state, the device tables of the fused kernels, the recorded layer inputs) and calls :func:`sdsopt.adam.adamw`
for any Adam update of its own.  An A/B between two modes changes exactly this object.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adam import AdamLists
from ..buckets import Bucketing
from ..capture import LoraCapture
from ..fused import Tables

__all__ = ["MapBack", "Mode", "StepContext", "nothing"]

MapBack = Callable[[], None]


def nothing() -> None:
    """The map back of a mode that needs none."""
    return None


@dataclass
class StepContext:
    """One param group's step as a mode sees it.

    ``position`` maps a param index of the group to its slot in ``lists`` (the Adam lists: ``params``, ``grads``,
    moments, ``state_steps``); ``state`` is the optimizer's per-parameter state; ``found_inf`` the device-side
    skip flag of ``skip_nonfinite`` (``None`` when the host decides); ``tables`` the fused kernels' entry tables;
    ``capture`` the recorded layer inputs (:meth:`sdsopt.SDSAdamW.attach`), if any."""

    gi: int
    group: dict[str, Any]
    position: dict[int, int]
    lists: AdamLists
    state: MutableMapping[Tensor, dict[str, Any]]
    tables: Tables
    found_inf: Tensor | None = None
    capture: LoraCapture | None = None


class Mode:
    """A mode of :class:`sdsopt.SDSAdamW`; subclasses override what they change.  One instance per optimizer and
    mode: it may keep caches (:attr:`bucketing`), which copies and checkpoints never carry."""

    name: str = ""
    routes: tuple[str, ...] = ()  # the r×r routes it takes besides 'auto' (sdsopt.modes.resolve_route)
    state_keys: tuple[str, ...] = ()
    sigma_channel: bool = False  # does it take decouple_sigma (the singular-value channel, docs/math.md (3.2))?
    sigma_note: str = ""  # why not, where the reason is the mode's own (appended to the refusal)
    damped: bool = False  # does it invert K + damping·I (the option damping)?
    coordinates_at_once: bool = False  # no warm-up: warmup_steps=None resolves to 0 (sdsopt.validation.resolve_warmup)

    def __init__(self) -> None:
        self.bucketing = Bucketing()

    @staticmethod
    def auto_route(device: torch.device) -> str:
        """The route ``route="auto"`` takes on ``device`` (modes with :attr:`routes`)."""
        return "cholesky"

    @classmethod
    def resolve_route(cls, route: str, device: torch.device) -> str:
        """``route``, with ``"auto"`` resolved by :meth:`auto_route`."""
        return cls.auto_route(device) if route == "auto" else route

    @classmethod
    def validate(cls, group: dict[str, Any]) -> str | None:
        """A message naming this mode's option that ``group`` sets wrongly, with the fix; ``None`` if all is well.
        (The options common to every mode are checked by :mod:`sdsopt.validation`, the singular-value channel by
        :func:`sdsopt.modes.validate`.)"""
        return None

    def host_decision(self, group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]]) -> bool:
        """Does this group's step need a decision read on the host (so ``skip_nonfinite`` must read its flag)?"""
        return False

    def transform(self, ctx: StepContext) -> MapBack:
        """Rewrite ``ctx.lists`` for the common Adam call; return the map back, run after it."""
        return nothing
