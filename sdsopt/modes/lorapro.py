"""Mode ``lorapro``: LoRA-Pro's efficient mode (Wang et al., ICLR 2025), Adam on the factors' adjusted gradients,
docs/math.md (7.1)–(7.2): the gradients are rewritten so that the first-order weight-space change they make,
``s·(B·g̃A + g̃B·A)``, is the full gradient projected on the rank-r tangent space at ``BA``, and Adam steps
those.

Choices made here, where the paper and its code leave them open:

* **The scale.**  The paper divides both adjusted gradients by ``s²``; the optimizer does not know ``s`` and
  uses ``s = 1``.  The adjusted gradients are linear in ``1/s²`` (the Sylvester right-hand side too), so this
  multiplies both by the constant ``s²`` and Adam's step is unchanged up to ``eps``.
* **Rank-deficient factors** (LoRA's ``B = 0``): ``K⁺`` is the pseudo-inverse on the numerical range of
  (2.5) (eigh; ``τ = 1e-6`` in float32), not ``(K + jitter·I)^{-1}``: with ``B = 0`` the step is then
  ``g̃A = 0``, ``g̃B = gB·K_A⁺`` (the paper's own first step), with no ``1/jitter`` amplification.
* **The Sylvester equation** (7.2) is solved exactly in the two Grams' eigenbases (both symmetric PSD:
  ``Y = (U_Bᵀ C U_A) ⊘ (λ_B,i + λ_A,j)``), two r×r eighs per pair instead of the r²×r² Kronecker system
  of the reference code.  Entries where both eigenvalues are off the range are 0 (their right-hand side is).
* A pair with a gradient on one factor only passes through unchanged (plain AdamW): the projection needs both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..buckets import stacked_factors
from ..distributed import is_dtensor
from ..linalg import Spectrum, algebra_precision, finite_or_zero, gram, spectral_matrix, spectrum
from .base import MapBack, Mode, StepContext, nothing

__all__ = ["LoRAPro", "adjusted_gradients"]


def _pinv(spec: Spectrum) -> Tensor:
    """``K⁺`` on the numerical range (2.5)."""
    return spectral_matrix(spec, torch.where(spec.in_range, 1.0 / torch.where(spec.in_range, spec.lam, 1.0), 0.0))


def adjusted_gradients(A: Tensor, B: Tensor, gA: Tensor, gB: Tensor, rank_tol: float) -> tuple[Tensor, Tensor]:
    """LoRA-Pro's adjusted gradients (7.1) with ``s = 1`` for stacked pairs ``A`` ``[k, r, n]``, ``B`` ``[k, m, r]``
    and their gradients (same shapes, the algebra's dtype): ``(g̃A, g̃B)``."""
    spec_b = spectrum(finite_or_zero(gram(B.transpose(1, 2))), rank_tol)  # K_B = BᵀB
    spec_a = spectrum(finite_or_zero(gram(A)), rank_tol)  # K_A = AAᵀ
    pinv_b, pinv_a = _pinv(spec_b), _pinv(spec_a)
    first = pinv_b @ gA  # K_B⁺ gA
    # (7.2): K_B X + X K_A = −K_B⁺ gA Aᵀ, in the eigenbases
    C = spec_b.U.transpose(1, 2) @ (-(first @ A.transpose(1, 2))) @ spec_a.U
    lam_b = torch.where(spec_b.in_range, spec_b.lam, 0.0)
    lam_a = torch.where(spec_a.in_range, spec_a.lam, 0.0)
    denom = lam_b.unsqueeze(-1) + lam_a.unsqueeze(-2)
    Y = torch.where(denom > 0, C / torch.where(denom > 0, denom, 1.0), 0.0)
    X = spec_b.U @ Y @ spec_a.U.transpose(1, 2)
    gB_pa = gB @ pinv_a  # gB K_A⁺
    g_a = first + X @ A
    g_b = gB_pa - B @ (pinv_b @ (B.transpose(1, 2) @ gB_pa)) - B @ X
    return g_a, g_b


class LoRAPro(Mode):
    """``lorapro``: Adam sees LoRA-Pro's adjusted gradients (7.1); nothing after the common Adam call."""

    name = "lorapro"

    def transform(self, ctx: StepContext) -> MapBack:
        group, position, lists = ctx.group, ctx.position, ctx.lists
        params: list[Tensor] = group["params"]
        for bucket in self.bucketing.buckets(ctx.gi, group, position):
            if not (bucket.has_a and bucket.has_b):
                continue
            if is_dtensor(params[bucket.a[0]]) or is_dtensor(params[bucket.b[0]]):
                raise ValueError(f"SDSAdamW param group {ctx.gi}: mode 'lorapro' needs whole factors; FSDP2-sharded "
                                 "LoRA factors are supported by modes 'sds', 'sds_polar', 'scaled' and 'lora'")
            dt, tol = algebra_precision(params[bucket.a[0]].dtype, group["linalg_dtype"], group["rank_tol"])
            A, B = stacked_factors(group, bucket.a, bucket.b, dt)
            pos_a, pos_b = [position[i] for i in bucket.a], [position[i] for i in bucket.b]
            gA = torch.stack([lists["grads"][q] for q in pos_a]).to(dt).view_as(A)
            gB = torch.stack([lists["grads"][q] for q in pos_b]).to(dt).view_as(B)
            g_a, g_b = adjusted_gradients(A, B, gA, gB, tol)
            for pos, new, shape, like in ((pos_a, g_a, bucket.a_shape, params[bucket.a[0]]),
                                          (pos_b, g_b, bucket.b_shape, params[bucket.b[0]])):
                for q, g in zip(pos, new.to(like.dtype).unbind(0)):
                    lists["grads"][q] = g.view(shape)
        return nothing
