"""The optional packages of the lab and the one-line message that says which ``pip install`` brings each.

sdsopt is installed from a checkout (it is not on PyPI), so the fix for a missing package is an extra of the
checkout, ``pip install ".[ablate]"`` (run in the checkout's folder), or the package by its own name.  The CLI
checks what a command needs before anything trains (:func:`require_all`) and prints the message instead of a
traceback; :func:`require` is the same for one module where it is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "missing", "require", "require_all"]

# import name -> (the extra of setup.cfg that brings it, its name on PyPI)
EXTRAS = {
    "tqdm": ("ablate", "tqdm"),
    "matplotlib": ("ablate", "matplotlib"),
    "sklearn": ("ablate", "scikit-learn"),
    "pytorch_optimizer": ("ablate", "pytorch-optimizer"),
    "transformers": ("hf", "transformers"),
    "peft": ("hf", "peft"),
    "datasets": ("integrations", "datasets"),
    "gguf": ("smollm", "gguf"),
}


class MissingExtra(ModuleNotFoundError):
    """A package of an sdsopt extra is not installed; the message names the ``pip install`` that fixes it."""


def _message(module: str, purpose: str) -> str:
    extra, pypi = EXTRAS[module]
    return (f"{purpose} needs {pypi}, which is not installed: pip install \".[{extra}]\" in the sdsopt checkout "
            f"(or pip install {pypi})")


def missing(modules: list[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the extra of :data:`EXTRAS` that brings it
    (``purpose``: who needs it, e.g. ``"the lab's progress bar"``)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0]:
            raise  # (the module is there and one of its own imports failed: that traceback is the news)
        raise MissingExtra(_message(module, purpose), name=module) from None


def require_all(modules: list[str], purpose: str) -> None:
    """:class:`MissingExtra` for the first of ``modules`` that is not installed, the extras of all missing ones
    in one line; nothing is imported."""
    absent = missing(modules)
    if not absent:
        return
    extras = sorted({EXTRAS[m][0] for m in absent})
    names = " ".join(EXTRAS[m][1] for m in absent)
    spec = ",".join(extras)
    raise MissingExtra(f"{purpose} needs {', '.join(EXTRAS[m][1] for m in absent)}, not installed: "
                       f"pip install \".[{spec}]\" in the sdsopt checkout (or pip install {names})", name=absent[0])
