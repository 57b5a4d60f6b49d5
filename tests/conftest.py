"""Shared test set-up: hypothesis profiles (deterministic by default), and the tests' one LoRA layer and small
model with their data and training loop (``from conftest import ...``)."""

import os

import torch
from hypothesis import HealthCheck, settings
from torch import nn

# Without CUDA the fused kernels (sdsopt.kernels, fused=True) run under Triton's interpreter, so that the CPU test
# run checks them too (tests/test_fused.py).  Set before sdsopt is imported: triton.jit reads it at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "ci" (the default): derandomized, bounded examples and deadline, so every run draws the same cases.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=2000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
# "dev": random seeds and more examples, for hunting counter-examples locally.
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class LoraLinear(nn.Module):
    """A hand-written LoRA layer with PEFT's parameter names: W0 x + s·B(A x)."""

    def __init__(self, n: int, m: int, r: int, s: float = 2.0, dtype=torch.float32, zero_b: bool = True):
        super().__init__()
        self.base = nn.Linear(n, m, dtype=dtype)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False, dtype=dtype)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False, dtype=dtype)})
        if zero_b:
            nn.init.zeros_(self.lora_B["default"].weight)
        self.s = s

    def forward(self, x):
        return self.base(x) + self.s * self.lora_B["default"](self.lora_A["default"](x))


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, zero_b=True):
        super().__init__()
        self.l1 = LoraLinear(8, 16, 4, dtype=dtype, zero_b=zero_b)
        self.l2 = LoraLinear(16, 3, 2, dtype=dtype, zero_b=zero_b)
        self.extra = nn.Parameter(torch.randn(3, dtype=dtype))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) + self.extra


def make_data(n=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def train(model, opt, steps=5, data=None, dtype=torch.float32):
    x, y = data or make_data(dtype=dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fresh(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)
