"""What the stack callbacks share: finding the :class:`sdsopt.SDSAdamW` inside a wrapper, which steps log, and
the diagnostics as a flat ``{key: float}`` dict for a logger.  No third-party import."""

from __future__ import annotations

from typing import Any

from ..optim import SDSAdamW

__all__ = ["due", "find_sdsadamw", "log_keys"]


def find_sdsadamw(optimizer: Any) -> SDSAdamW | None:
    """The :class:`sdsopt.SDSAdamW` that ``optimizer`` is or wraps through ``.optimizer`` attributes (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or ``None``."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, SDSAdamW):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def due(step: int, every: int) -> bool:
    """Is optimizer step ``step`` (1-based, as ``global_step`` after it) one whose diagnostics are logged?"""
    return step > 0 and step % every == 0


def log_keys(opt: SDSAdamW, prefix: str = "sds/", per_pair: bool = False) -> dict[str, float]:
    """``opt.diagnostics()``'s summary with keys ``<prefix><key>``; ``per_pair=True`` adds every pair's numbers as
    ``<prefix><pair name>/<key>`` (many keys: 8 per pair)."""
    report = opt.diagnostics()
    out = {f"{prefix}{k}": v for k, v in report["summary"].items()}
    if per_pair:
        for row in report["pairs"]:
            out.update({f"{prefix}{row['name']}/{k}": v for k, v in row.items() if isinstance(v, float)})
    return out


def check_every(every: int) -> int:
    """``every`` as a positive int, or a ``ValueError`` naming it."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (log the diagnostics every N optimizer steps), got {every!r}")
    return every
