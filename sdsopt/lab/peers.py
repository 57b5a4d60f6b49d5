"""The LoRA optimizers sdsopt is compared with in the A/B harness (docs/math.md §7), built from a model with
sdsopt's pairing, so every peer finds the same ``(A, B)`` pairs as :class:`sdsopt.SDSAdamW`.

* ``loraplus``: LoRA+ (Hayou et al. 2024), torch AdamW with ``lr_B = λ·lr`` (:func:`loraplus`; as PEFT's groups);
* ``rite``: LoRA-RITE (Yen et al. 2025), ``pytorch_optimizer.LoRARite`` on the pairs in the ``A, B`` order it
  requires, AdamW on the other trainable parameters (:func:`rite`);
* ``peft_riemannian``: PEFT's ``create_riemannian_optimizer`` around AdamW (:func:`peft_riemannian`).

LoRA-Pro is a mode of :class:`sdsopt.SDSAdamW` (``mode="lorapro"``): it changes only what Adam sees.

``pytorch-optimizer`` (RITE) and ``peft`` come with the ``ablate`` and ``hf`` extras.  Kept as they are
published: RITE's defaults are its authors' (``eps=1e-6``, clipping of the unmagnified gradients' global norm at
1, skipping of updates whose RMS exceeds 1; ``options`` overrides them), PEFT's ``reg=1e-2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..pairing import default_pairing

__all__ = ["Chained", "PEERS", "is_peer", "lora_factors", "loraplus", "make_peer", "peft_riemannian", "rite"]


def lora_factors(model: nn.Module) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """``(pairs, rest)``: the trainable ``(A, B)`` pairs of ``model`` by :data:`sdsopt.pairing.default_pairing`,
    and its other trainable parameters."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pairs = [(named[a], named[b]) for a, b in default_pairing(list(named))]
    if not pairs:
        raise ValueError("no LoRA pairs among the model's trainable parameters (names such as "
                         "'…lora_A.default.weight' / '…lora_B.default.weight'); see sdsopt.pairing")
    paired = {id(t) for pair in pairs for t in pair}
    return pairs, [p for p in named.values() if id(p) not in paired]


class Chained:
    """Several optimizers stepped as one: a peer's optimizer of the LoRA pairs and AdamW for the rest."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)


def _rest(rest: list[Tensor], lr: float, betas: tuple[float, float], weight_decay: float
          ) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay)] if rest else []


def loraplus(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, ratio: float = 16.0
             ) -> torch.optim.AdamW:
    """LoRA+: AdamW with the ``B`` factors at ``ratio·lr`` and every other trainable parameter at ``lr``, except
    1-D ones (biases, norms), also at ``ratio·lr`` as in the authors' code and PEFT's ``create_loraplus_optimizer``."""
    if ratio <= 0:
        raise ValueError(f"loraplus ratio λ={ratio} must be > 0 (the LoRA+ paper uses 2–80, PEFT's docs 16)")
    pairs, rest = lora_factors(model)
    slow = [a for a, _ in pairs] + [p for p in rest if p.dim() != 1]
    fast = [b for _, b in pairs] + [p for p in rest if p.dim() == 1]
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": ratio * lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def rite(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, **options: Any) -> Chained:
    """LoRA-RITE (``pytorch_optimizer.LoRARite``, its authors' defaults unless ``options`` says otherwise) on the
    pairs, AdamW on the rest."""
    from pytorch_optimizer import LoRARite

    pairs, rest = lora_factors(model)
    for a, b in pairs:
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"rite: LoRARite takes Linear pairs (2-D factors); got A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)} (a Conv or merged layout): use modes 'sds' or 'lora' there")
        if a.dtype not in (torch.float32, torch.float64) or b.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"rite: LoRARite needs float32/float64 LoRA factors (it takes torch.linalg.qr of "
                             f"them, which has no {a.dtype if a.dtype.is_floating_point else b.dtype} kernel); keep "
                             "the adapter in float32 under autocast, or use mode 'sds'")
    ordered = [t for pair in pairs for t in pair]  # its required order: A₁, B₁, A₂, B₂, …
    return Chained(LoRARite(ordered, lr=lr, betas=betas, weight_decay=weight_decay, **options),
                   *_rest(rest, lr, betas, weight_decay))


def _peft_view(pairs: list[tuple[Tensor, Tensor]], rest: list[Tensor]) -> nn.Module:
    """A module holding the same tensors under PEFT's names, ``pair<i>.lora_A.weight`` / ``pair<i>.lora_B.weight``
    (and ``rest<j>``), so that PEFT's name-based pairing finds exactly sdsopt's pairs (a top-level ``lora_A``, a
    ``lora_down``/``lora_up`` or torchtune's ``lora_a`` included)."""
    view = nn.Module()
    for i, (a, b) in enumerate(pairs):
        holder = nn.Module()
        holder.lora_A, holder.lora_B = nn.Module(), nn.Module()
        holder.lora_A.weight, holder.lora_B.weight = a, b
        view.add_module(f"pair{i}", holder)
    for j, p in enumerate(rest):
        view.register_parameter(f"rest{j}", p)
    return view


def peft_riemannian(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    reg: float = 1e-2) -> torch.optim.Optimizer:
    """PEFT's Riemannian-preconditioned AdamW (``peft.optimizers.create_riemannian_optimizer``) on sdsopt's pairs;
    raises ``ImportError`` where the installed PEFT lacks it."""
    try:
        from peft.optimizers import create_riemannian_optimizer
    except ImportError as err:
        raise ImportError("peft_riemannian needs a PEFT with peft.optimizers.create_riemannian_optimizer "
                          "(0.18 or later): pip install -U peft") from err
    return create_riemannian_optimizer(_peft_view(*lora_factors(model)), torch.optim.AdamW, lr=lr, reg=reg,
                                       betas=betas, weight_decay=weight_decay)


PEERS = ("loraplus", "rite", "peft_riemannian")


def is_peer(mode: str) -> bool:
    """Is ``mode`` one of :data:`PEERS` (``loraplus<λ>`` included), not an SDSAdamW mode?"""
    return mode in PEERS or mode.startswith("loraplus")


def make_peer(mode: str, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
              options: dict[str, Any] | None = None) -> torch.optim.Optimizer | Chained:
    """The optimizer of peer ``mode`` (``loraplus<λ>``, e.g. ``loraplus4``, sets LoRA+'s ratio in the name)."""
    options = dict(options or {})
    if mode.startswith("loraplus"):
        ratio = float(mode[len("loraplus"):] or options.pop("ratio", 16.0))
        return loraplus(model, lr, betas, weight_decay, ratio=ratio)
    if mode == "rite":
        return rite(model, lr, betas, weight_decay, **options)
    if mode == "peft_riemannian":
        return peft_riemannian(model, lr, betas, weight_decay, **options)
    raise ValueError(f"unknown peer {mode!r}; choose one of {PEERS} (or loraplus<λ>, e.g. loraplus4)")
