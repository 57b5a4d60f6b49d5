"""The modes of :class:`sdsopt.SDSAdamW`, one module each named as the user names the mode (what they share:
``base``, ``precondition``, ``sds_steps``), and their one registry, :data:`MODE_CLASSES`.

======================  =====================================================================  ================
mode                    what Adam sees                                                         module
======================  =====================================================================  ================
``lora``                the factors' own gradients (plain AdamW)                               ``lora``
``sds`` (default)       the coordinates of the factors in their orthonormal bases (§2)         ``sds``
``sds_muon``            their coordinates, stepped by the matrix sign of their momentum (§8)   ``sds_muon``
``sds_polar``           the gradients rewritten by ``K^{-1/2}`` of the partner (3.1)           ``sds_polar``
``scaled``              the gradients rewritten by ``(K + δI)^{-1}`` of the partner (3.1)      ``scaled``
``svd_oracle``          the full product ``BA`` with the true gradient (3.4)                   ``svd_oracle``
``lorapro``             LoRA-Pro's adjusted gradients (tangent-space projection, (7.1))        ``lorapro``
======================  =====================================================================  ================

(Equations: docs/math.md.)  The interface is :class:`sdsopt.modes.base.Mode`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import MapBack, Mode, StepContext
from .lora import LoRA
from .lorapro import LoRAPro
from .scaled import Scaled
from .sds import SDS
from .sds_muon import SDSMuon
from .sds_polar import SDSPolar
from .svd_oracle import SVDOracle

__all__ = ["MODES", "MODE_CLASSES", "ROUTES", "MapBack", "Mode", "StepContext", "create", "modes_where", "resolve_route",
           "validate"]

MODE_CLASSES: dict[str, type[Mode]] = {cls.name: cls for cls in (LoRA, SDS, SDSMuon, SDSPolar, Scaled, SVDOracle,
                                                                  LoRAPro)}
MODES = tuple(MODE_CLASSES)
ROUTES = ("auto", *dict.fromkeys(route for cls in MODE_CLASSES.values() for route in cls.routes))


def create(name: str) -> Mode:
    """A fresh mode object (its own caches) for the mode called ``name``."""
    return MODE_CLASSES[name]()


def resolve_route(route: str, device: torch.device, mode: str) -> str:
    """The r×r route ``mode`` takes for ``route`` on ``device`` (``"auto"`` resolved)."""
    return MODE_CLASSES[mode].resolve_route(route, device)


def modes_where(has: Callable[[type[Mode]], bool]) -> tuple[str, ...]:
    """The names of the modes whose class ``has`` the property (for messages: the registry is the one list)."""
    return tuple(name for name, cls in MODE_CLASSES.items() if has(cls))


def validate(group: dict[str, Any]) -> str | None:
    """A message naming the option of ``group`` that its mode refuses, with the fix; ``None`` if all is well: the
    singular-value channel (modes with :attr:`Mode.sigma_channel`), then the mode's own :meth:`Mode.validate`."""
    cls = MODE_CLASSES[group["mode"]]
    if group["decouple_sigma"] and not cls.sigma_channel:
        sigma = modes_where(lambda c: c.sigma_channel)
        return (f"decouple_sigma=True works with modes {sigma}, not mode={cls.name!r}{cls.sigma_note}; use "
                f"mode={sigma[0]!r} for the singular-value channel")
    return cls.validate(group)
