"""The modes of :class:`sdsopt.SDSAdamW`, one module each, named as the user names them, and their one registry.

======================  =====================================================================  ==============
mode                    what Adam sees                                                         module
======================  =====================================================================  ==============
``lora``                the factors' own gradients (plain AdamW)                               ``plain``
``sds`` (default)       the coordinates of the factors in their orthonormal bases (§2)         ``sds``
``sds_polar``           the gradients rewritten by ``K^{-1/2}`` of the partner (3.1)           ``polar``
``scaled``              the gradients rewritten by ``(K + δI)^{-1}`` of the partner (3.1)      ``scaled``
``svd_oracle``          the full product ``BA`` with the true gradient (3.4)                   ``oracle``
``lorapro``             LoRA-Pro's adjusted gradients (tangent-space projection, (7.1))        ``lorapro``
======================  =====================================================================  ==============

(Equations: docs/math.md.)  The interface is :class:`sdsopt.modes.base.Mode`.
"""

from __future__ import annotations

import torch

from .base import MapBack, Mode, StepContext
from .lorapro import LoRAPro
from .oracle import Oracle
from .plain import Plain
from .polar import Polar
from .scaled import Scaled
from .sds import SDS

__all__ = ["MODES", "MODE_CLASSES", "ROUTES", "MapBack", "Mode", "StepContext", "create", "resolve_route"]

MODE_CLASSES: dict[str, type[Mode]] = {cls.name: cls for cls in (Plain, SDS, Polar, Scaled, Oracle, LoRAPro)}
MODES = tuple(MODE_CLASSES)
ROUTES = ("auto", *dict.fromkeys(route for cls in MODE_CLASSES.values() for route in cls.routes))


def create(name: str) -> Mode:
    """A fresh mode object (its own caches) for the mode called ``name``."""
    return MODE_CLASSES[name]()


def resolve_route(route: str, device: torch.device, mode: str) -> str:
    """The r×r route ``mode`` takes for ``route`` on ``device`` (``"auto"`` resolved)."""
    return MODE_CLASSES[mode].resolve_route(route, device)
