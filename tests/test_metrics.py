"""The lab's docs/math.md §5 metrics (:mod:`sdsopt.lab.metrics`) on matrices with known answers."""

from __future__ import annotations

import pytest
import torch

from sdsopt.lab.metrics import (
    alignment,
    captured_fraction,
    condition_number,
    effective_rank,
    first_order_step,
    stable_rank,
)

pytestmark = pytest.mark.slow  # a lab test: outside the library's inner loop (pytest -m "not slow")

F64 = torch.float64


def test_metrics_on_matrices_with_known_answers():
    eye = torch.eye(4, dtype=F64)
    assert effective_rank(eye) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.ones(3, dtype=F64), torch.arange(1.0, 5.0, dtype=F64))) == pytest.approx(1.0)
    assert stable_rank(eye) == pytest.approx(4.0) and stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.25)
    assert condition_number(torch.diag(torch.tensor([1.0, 0.01], dtype=F64))) == pytest.approx(100.0)
    G = torch.randn(5, 6, dtype=F64)
    assert alignment(G, 3 * G) == pytest.approx(1.0) and alignment(G, -G) == pytest.approx(-1.0)
    # tangent space at B A with B = [e1], A = [e1ᵀ]: G captured iff it lives in row 1 or column 1
    A = torch.zeros(1, 6, dtype=F64)
    A[0, 0] = 1.0
    B = torch.zeros(5, 1, dtype=F64)
    B[0, 0] = 1.0
    inside = torch.zeros(5, 6, dtype=F64)
    inside[0, :] = 1.0
    inside[:, 0] = 2.0
    outside = torch.zeros(5, 6, dtype=F64)
    outside[2:, 3:] = 1.0
    assert captured_fraction(inside, A, B) == pytest.approx(1.0)
    assert captured_fraction(outside, A, B) == pytest.approx(0.0)
    assert captured_fraction(inside + outside, A, B) == pytest.approx(
        inside.norm().item() ** 2 / (inside + outside).norm().item() ** 2)
    dA, dB = torch.randn(1, 6, dtype=F64), torch.randn(5, 1, dtype=F64)
    torch.testing.assert_close(first_order_step(A, B, dA, dB), dB @ A + B @ dA)
