"""Mode ``lora``: plain AdamW on the factors (the identity transformation; docs/math.md §3)."""

from __future__ import annotations

from .base import Mode

__all__ = ["LoRA"]


class LoRA(Mode):
    """``lora``: Adam sees the factors' own gradients; nothing before or after the common Adam call."""

    name = "lora"
