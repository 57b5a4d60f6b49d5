"""Handwritten digits (scikit-learn's bundled 8×8 set, 1797 images): pre-train on digits 0–4, adapt to 5–9.

An MLP 64→128→128→10 is pre-trained on the classes 0–4 (full training), then LoRA-adapted on the
classes 5–9 (LoRA on all three Linear layers; the base weights frozen); full fine-tuning on 5–9 is
the reference.  Held-out loss on a fixed 25 % test split of 5–9.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .lora import LoraLinear

__all__ = ["DigitsTask"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """(images scaled to [0, 1] as 64-vectors, labels) from scikit-learn's bundled copy (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


@dataclass
class DigitsTask:
    rank: int = 4
    hidden: int = 128
    pretrain_steps: int = 300
    batch: int = 64
    name: str = "digits"
    _base: dict = field(default_factory=dict, repr=False)

    def setup(self, seed: int) -> None:
        X, y = load_digits_tensors()
        gen = torch.Generator().manual_seed(seed)
        old, new = y < 5, y >= 5
        perm = torch.randperm(int(new.sum()), generator=gen)
        Xn, yn = X[new][perm], y[new][perm]
        cut = int(0.75 * len(Xn))
        self.train, self.test = (Xn[:cut], yn[:cut]), (Xn[cut:], yn[cut:])
        if seed not in self._base:
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                                nn.Linear(self.hidden, 10))
            opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
            Xo, yo = X[old], y[old]
            for _ in range(self.pretrain_steps):
                idx = torch.randint(0, len(Xo), (self.batch,), generator=gen)
                opt.zero_grad()
                nn.functional.cross_entropy(net(Xo[idx]), yo[idx]).backward()
                opt.step()
            self._base[seed] = net

    def lora_model(self, seed: int) -> nn.Module:
        net = copy.deepcopy(self._base[seed])
        torch.manual_seed(seed)
        for i in (0, 2, 4):
            net[i] = LoraLinear(net[i], self.rank)
        return net

    def full_model(self, seed: int) -> nn.Module:
        return copy.deepcopy(self._base[seed])

    def batches(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        X, y = self.train
        while True:
            idx = torch.randint(0, len(X), (self.batch,), generator=gen)
            yield X[idx], y[idx]

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, y = batch
        return nn.functional.cross_entropy(model(X), y)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        device = next(model.parameters()).device
        return float(self.loss(model, tuple(t.to(device) for t in self.test)))
