"""Thin integrations of :meth:`sdsopt.SDSAdamW.diagnostics` with training stacks, imported lazily: ``import sdsopt``
imports none of them, and ``sdsopt.integrations.X`` imports only the library that ``X`` needs.

* :class:`SDSDiagnosticsCallback` (transformers ``TrainerCallback``, :mod:`sdsopt.integrations.hf`);
* :class:`SDSDiagnosticsLightningCallback` (Lightning ``Callback``, :mod:`sdsopt.integrations.lightning`);
* :func:`find_sdsadamw`, :func:`log_keys` (:mod:`sdsopt.integrations.common`, no third-party import).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SDSDiagnosticsCallback", "SDSDiagnosticsLightningCallback", "find_sdsadamw", "log_keys"]

_WHERE = {"SDSDiagnosticsCallback": "hf", "SDSDiagnosticsLightningCallback": "lightning",
          "find_sdsadamw": "common", "log_keys": "common"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sdsopt.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
