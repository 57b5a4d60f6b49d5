"""Finished runs on disk, one JSON file each, so that a grid resumes where it stopped (``--resume``) and several
processes can fill one grid (``--workers``).

Layout under the output folder: ``runs/recipe.json`` (what every run of the grid shares: the options but the
grid's own, modes, lrs and seeds) and ``runs/<mode>-lr<lr>-s<seed>.json`` (a run as :func:`sdsopt.lab.runs.run_one`
returns it, curves included; non-finite losses as JSON's ``NaN``).  Resuming with another recipe is refused:
its runs would not compare.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .data import InputError

__all__ = ["RunStore"]


class RunStore:
    """The finished runs of one grid, in ``folder / "runs"``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder) / "runs"

    def path(self, mode: str, lr: float, seed: int) -> Path:
        """The file of the run ``(mode, lr, seed)``."""
        return self.folder / f"{mode}-lr{lr!r}-s{seed}.json"

    def check_recipe(self, recipe: dict[str, Any], resume: bool) -> None:
        """Record ``recipe``; with ``resume``, first refuse one that differs from the recipe already recorded
        (naming the options that differ); without, forget the runs stored before (a fresh grid)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "recipe.json"
        fresh = json.loads(json.dumps(recipe, default=str))
        if resume and path.exists():
            old = json.loads(path.read_text())
            changed = sorted(k for k in set(old) | set(fresh) if old.get(k) != fresh.get(k))
            if changed:
                raise InputError(f"--resume: {self.folder.parent} was run with other options ("
                                 + ", ".join(f"{k}: {old.get(k)!r} then, {fresh.get(k)!r} now" for k in changed)
                                 + "); its runs would not compare: pass the same options or another --out")
        if not resume:
            for old_run in self.folder.glob("*-s*.json"):
                old_run.unlink()
        path.write_text(json.dumps(fresh, indent=1))

    def count(self) -> int:
        """How many finished runs the store holds."""
        return sum(1 for _ in self.folder.glob("*-s*.json"))

    def load(self, mode: str, lr: float, seed: int) -> dict[str, Any] | None:
        """The finished run, or None."""
        path = self.path(mode, lr, seed)
        return json.loads(path.read_text()) if path.exists() else None

    def save(self, run: dict[str, Any]) -> None:
        """Write ``run`` atomically (a second process never reads half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(run["mode"], run["lr"], run["seed"])
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(run))
        tmp.replace(path)
