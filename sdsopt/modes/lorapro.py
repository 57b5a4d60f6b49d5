"""Mode ``lorapro``: LoRA-Pro's efficient mode (Wang et al., ICLR 2025), Adam on the factors' adjusted gradients,
docs/math.md (7.1)–(7.2): the gradients are rewritten so that the first-order weight-space change they make,
``s·(B·g̃A + g̃B·A)``, is the full gradient projected on the rank-r tangent space at ``BA``, and Adam steps
those.

Choices made here, where the paper and its code leave them open:

* **The scale.**  The paper divides both adjusted gradients by ``s²``; the optimizer does not know ``s`` and
  uses ``s = 1``.  The adjusted gradients are linear in ``1/s²`` (the Sylvester right-hand side too), so this
  multiplies both by the constant ``s²`` and Adam's step is unchanged up to ``eps``.
* **Rank-deficient factors** (LoRA's ``B = 0``): every ``K⁺`` of (7.1)–(7.2) is ``(K + δI)^{-1}`` with the
  absolute ``δ = damping`` (default 1e-6, the jitter of LoRA-Pro's efficient-mode code), not the pseudo-inverse
  on the numerical range (2.5): right after ``B = 0`` the Gram ``K_B ~ lr²`` has in-range directions of tiny
  eigenvalue that the pseudo-inverse amplifies, and it trails the reference code where the damped form matches
  it (measured: benchmarks/RESULTS.md, section "Against its peers").  With
  ``B = 0`` the step is ``g̃A = 0``, ``g̃B = gB·(K_A + δI)^{-1}`` (the paper's first step).
* **The Sylvester equation** (7.2) is solved exactly in the two Grams' eigenbases (both symmetric PSD:
  ``Y = (U_Bᵀ C U_A) ⊘ (λ_B,i + λ_A,j + 2δ)``), two r×r eighs per pair instead of the r²×r² Kronecker system
  of the reference code (whose default solver, in lora-pro-adamw 0.2.1, solves the transposed equation).
* A pair with a gradient on one factor only passes through unchanged (plain AdamW): the projection needs both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..buckets import stacked_factors
from ..distributed import is_dtensor
from ..linalg import algebra_precision, finite_or_zero, gram, spectral_matrix, spectrum
from .base import MapBack, Mode, StepContext, nothing

__all__ = ["LoRAPro", "adjusted_gradients"]


def adjusted_gradients(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted gradients (7.1) with ``s = 1`` for stacked pairs ``A`` ``[k, r, n]``, ``B`` ``[k, m, r]``
    and their gradients (same shapes, the algebra's dtype): ``(g̃A, g̃B)``, with ``K⁺ = (K + δI)^{-1}``."""
    spec_b = spectrum(finite_or_zero(gram(B.transpose(1, 2))), 0.0)  # K_B = BᵀB
    spec_a = spectrum(finite_or_zero(gram(A)), 0.0)  # K_A = AAᵀ
    inv_b = spectral_matrix(spec_b, 1.0 / (spec_b.lam + damping))
    inv_a = spectral_matrix(spec_a, 1.0 / (spec_a.lam + damping))
    first = inv_b @ gA  # K_B⁺ gA
    # (7.2) with K + δI: in the eigenbases, Y = Uᵀ_B C U_A ⊘ (λ_B,i + λ_A,j + 2δ)
    C = spec_b.U.transpose(1, 2) @ (-(first @ A.transpose(1, 2))) @ spec_a.U
    Y = C / (spec_b.lam.unsqueeze(-1) + spec_a.lam.unsqueeze(-2) + 2.0 * damping)
    X = spec_b.U @ Y @ spec_a.U.transpose(1, 2)
    gB_pa = gB @ inv_a  # gB K_A⁺
    g_a = first + X @ A
    g_b = gB_pa - B @ (inv_b @ (B.transpose(1, 2) @ gB_pa)) - B @ X
    return g_a, g_b


class LoRAPro(Mode):
    """``lorapro``: Adam sees LoRA-Pro's adjusted gradients (7.1); nothing after the common Adam call."""

    name = "lorapro"
    damped = True

    def transform(self, ctx: StepContext) -> MapBack:
        group, position, lists = ctx.group, ctx.position, ctx.lists
        params: list[Tensor] = group["params"]
        for bucket in self.bucketing.buckets(ctx.gi, group, position):
            if not (bucket.has_a and bucket.has_b):
                continue
            if is_dtensor(params[bucket.a[0]]) or is_dtensor(params[bucket.b[0]]):
                raise ValueError(f"SDSAdamW param group {ctx.gi}: mode 'lorapro' needs whole factors; FSDP2-sharded "
                                 "LoRA factors are supported by modes 'sds', 'sds_polar', 'scaled' and 'lora'")
            dt, _ = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"])
            A, B = stacked_factors(group, bucket.a, bucket.b, dt)
            pos_a, pos_b = [position[i] for i in bucket.a], [position[i] for i in bucket.b]
            gA = torch.stack([lists["grads"][q] for q in pos_a]).to(dt).view_as(A)
            gB = torch.stack([lists["grads"][q] for q in pos_b]).to(dt).view_as(B)
            g_a, g_b = adjusted_gradients(A, B, gA, gB, group["damping"])
            for pos, new, shape, like in ((pos_a, g_a, bucket.a_shape, params[bucket.a[0]]),
                                          (pos_b, g_b, bucket.b_shape, params[bucket.b[0]])):
                for q, g in zip(pos, new.to(like.dtype).unbind(0)):
                    lists["grads"][q] = g.view(shape)
        return nothing
