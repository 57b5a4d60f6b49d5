"""Synthetic low-rank regression (the LoRSum paper's linear task).

A frozen ``W0`` (m×n) must be adapted to ``W* = W0 + Δ`` with ``Δ`` of rank ``r*`` and condition
number ``κ``: targets ``Y = X W*ᵀ + noise`` for Gaussian inputs ``X``.  The LoRA model is
``W0 + s·B A`` (rank r); full fine-tuning trains ``W`` itself.  Loss: ``‖X Wᵀ − Y‖² / (2N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .lora import LoraLinear

__all__ = ["LinearTask", "SyntheticLowRankTask"]


class _FrozenLinearBase:
    """The models of the linear tasks: a frozen ``nn.Linear`` holding ``W0`` (m×n), adapted by a rank-``rank``
    LoRA, or trained itself (full fine-tuning)."""

    m: int
    n: int
    rank: int
    W0: Tensor

    def _base(self) -> nn.Linear:
        layer = nn.Linear(self.n, self.m, bias=False)
        with torch.no_grad():
            layer.weight.copy_(self.W0)
        return layer

    def lora_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return LoraLinear(self._base(), self.rank)

    def full_model(self, seed: int) -> nn.Module:
        return self._base()


@dataclass
class LinearTask(_FrozenLinearBase):
    m: int = 64
    n: int = 64
    rank: int = 4
    target_rank: int = 4
    kappa: float = 100.0
    noise: float = 0.0
    samples: int = 1024
    batch: int = 0  # 0: full batch
    name: str = "linear"

    def setup(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(1000 + seed)
        m, n, k = self.m, self.n, self.target_rank
        self.W0 = torch.randn(m, n, generator=gen) / n**0.5
        U = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
        sigma = self.kappa ** (-torch.linspace(0, 1, k))
        self.delta = U @ torch.diag(sigma) @ V.T
        X = torch.randn(self.samples + 256, n, generator=gen)
        Y = X @ (self.W0 + self.delta).T + self.noise * torch.randn(self.samples + 256, m, generator=gen)
        self.train, self.test = (X[: self.samples], Y[: self.samples]), (X[self.samples :], Y[self.samples :])

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        X, Y = self.train
        while True:
            if self.batch <= 0:
                yield X, Y
            else:
                idx = torch.randint(0, len(X), (self.batch,), generator=gen)
                yield X[idx], Y[idx]

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, Y = batch
        return 0.5 * ((model(X) - Y) ** 2).sum(-1).mean()

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        device = next(model.parameters()).device
        return float(self.loss(model, tuple(t.to(device) for t in self.test)))


@dataclass
class SyntheticLowRankTask(_FrozenLinearBase):
    """PSI-LoRA's synthetic task (its ``linear_dataset.py`` with ``input_type: eye``): fit a Gaussian ``W``
    (``out × in``, 600 × 200 in the paper) with a rank-r LoRA on a zero base from the identity inputs, loss
    ``‖X Wᵀ_model − X Wᵀ‖²`` summed over outputs and over the batch (the paper's ``MSELoss(reduction="sum")``).
    On all inputs it is ``‖W_model − W‖²_F``; the best rank-r fit leaves ``f* = Σ_{i>r} σ_i(W)²``, and
    :meth:`eval_loss` reports the suboptimality ``f − f*``.
    """

    n: int = 200
    m: int = 600
    rank: int = 8
    batch: int = 0  # 0: full batch (all n inputs); else random rows of the identity
    name: str = "psi_linear"

    def setup(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.W = torch.randn(self.m, self.n, generator=gen)
        S = torch.linalg.svdvals(self.W)
        self.f_opt = float((S[self.rank:] ** 2).sum())
        self.X = torch.eye(self.n)
        self.W0 = torch.zeros(self.m, self.n)  # the paper's LoRA starts from a zero base

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        Y = self.X @ self.W.T
        while True:
            if self.batch <= 0:
                yield self.X, Y
            else:
                idx = torch.randint(0, self.n, (self.batch,), generator=gen)
                yield self.X[idx], Y[idx]

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, Y = batch
        return ((model(X) - Y) ** 2).sum()

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        device = next(model.parameters()).device
        return float(self.loss(model, (self.X.to(device), (self.X @ self.W.T).to(device)))) - self.f_opt
