"""A hand-written LoRA layer with PEFT's parameter names, for tasks and examples without PEFT."""

from __future__ import annotations

import math

from torch import Tensor, nn

__all__ = ["LoraLinear"]


class LoraLinear(nn.Module):
    """``y = base(x) + s·B(A x)`` around a frozen ``nn.Linear``; ``s = alpha / r``, ``B = 0`` at start.

    Parameter names match PEFT (``lora_A.default.weight``, ``lora_B.default.weight``), so
    :class:`sdsopt.SDSAdamW` pairs them from ``named_parameters()``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False, dtype=dtype, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False, dtype=dtype, device=device)})
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = (alpha if alpha is not None else r) / r

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.lora_B["default"](self.lora_A["default"](x))
