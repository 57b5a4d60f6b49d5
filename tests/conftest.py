"""Shared test set-up: hypothesis profiles (deterministic by default) and float64 defaults."""

import os

import torch
from hypothesis import HealthCheck, settings

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
