"""Mode ``svd_oracle`` (docs/math.md (3.4)): Adam on the full product ``W = BA`` with the true gradient ``G``
(m×n moments), then the best rank-r factors of the result, balanced and closest to the current ones.  A research
mode for ablations on small models: one pair at a time, in float32 or better, needing the layers' recorded
inputs (:meth:`sdsopt.SDSAdamW.attach`)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from ..adam import adamw
from ..buckets import drop_positions
from ..distributed import local, process_group
from ..linalg import algebra_precision
from ..pairing import a_rows, b_matrix, param_label
from .base import MapBack, Mode, StepContext

__all__ = ["SVDOracle", "svd_refactor"]


class SVDOracle(Mode):
    """``svd_oracle``: Adam on the full product with the true gradient, which needs the layers' recorded inputs
    (:meth:`sdsopt.SDSAdamW.attach`)."""

    name = "svd_oracle"
    state_keys = ("oracle_exp_avg", "oracle_exp_avg_sq")

    @classmethod
    def validate(cls, group: dict[str, Any]) -> str | None:
        if group["b_lr_ratio"] != 1.0:
            return (f"b_lr_ratio={group['b_lr_ratio']} does not apply to mode='svd_oracle' (Adam steps the full "
                    "product BA, not the factors); leave it at 1.0")
        if group["gradient_start"]:
            return ("gradient_start=True does not apply to mode='svd_oracle' (it re-factorises BA from the full "
                    "gradient at every step); leave it False")
        return None

    def host_decision(self, group: dict[str, Any], state: MutableMapping[Tensor, dict[str, Any]]) -> bool:
        return True

    def transform(self, ctx: StepContext) -> MapBack:
        replaced = self._rewrite(ctx)

        def after() -> None:
            for p, value in replaced:
                p.copy_(value.reshape(p.shape))

        return after

    def _rewrite(self, ctx: StepContext) -> list[tuple[Tensor, Tensor]]:
        """``svd_oracle``: Adam on the full ``W = BA`` with the true ``G`` (state ``oracle_exp_avg``/
        ``oracle_exp_avg_sq`` on A's state, m×n); returns the new factors, which are copied in after the step
        instead of an Adam update of A and B.  A research mode for ablations on small models: one pair at a
        time, in float32 or better.
        """
        state, capture, gi, group, position, lists = ctx.state, ctx.capture, ctx.gi, ctx.group, ctx.position, ctx.lists
        mode = self.name
        params: list[Tensor] = group["params"]
        if any(process_group(p) is not None or local(p) is not p for p in params):
            raise ValueError(
                f"SDSAdamW mode={mode!r} (full matrices) cannot run on sharded (FSDP2) factors; "
                "use mode 'sds', 'sds_polar', 'scaled' or 'lora'."
            )
        if capture is None:
            raise RuntimeError(
                f"SDSAdamW mode={mode!r} needs the LoRA layers' inputs: call opt.attach(model) once before training."
            )
        replaced: list[tuple[Tensor, Tensor]] = []
        drop: set[int] = set()
        for ia, ib in group["lora_pairs"]:
            if ia not in position or ib not in position:
                continue
            A, B = params[ia], params[ib]
            dt, _ = algebra_precision(A.dtype, group["linalg_dtype"], None)
            Am, Bm = a_rows(A).to(dt), b_matrix(B).to(dt)
            m, n, r = Bm.shape[0], Am.shape[1], Am.shape[0]
            if m * n > group["oracle_max_numel"] or r > min(m, n):
                raise ValueError(
                    f"SDSAdamW mode='svd_oracle': pair {param_label(group, ia, gi)} is {m}×{n} with r={r}; the oracle "
                    f"forms m×n matrices (limit oracle_max_numel={group['oracle_max_numel']}) and needs r ≤ min(m, n). "
                    "Raise oracle_max_numel for a larger model, or use another mode."
                )
            a_state = state[A]
            W = (Bm @ Am).to(A.dtype)
            if "oracle_exp_avg" not in a_state:
                a_state["oracle_exp_avg"] = torch.zeros_like(W)
                a_state["oracle_exp_avg_sq"] = torch.zeros_like(W)
            sub = {"params": [W], "grads": [capture.full(A, B, dt).to(A.dtype)],
                   "exp_avgs": [a_state["oracle_exp_avg"]], "exp_avg_sqs": [a_state["oracle_exp_avg_sq"]],
                   "max_exp_avg_sqs": [], "state_steps": [lists["state_steps"][position[ia]].clone()]}
            adamw({**group, "amsgrad": False, "foreach": False, "fused": False}, sub,
                  lr=group["lr"], weight_decay=group["weight_decay"])
            new_a, new_b = svd_refactor(W.to(dt), Am, Bm)
            replaced += [(A, new_a.to(A.dtype)), (B, new_b.to(B.dtype))]
            drop |= {position[ia], position[ib]}
            for p in (A, B):
                state[p]["step"] += 1
        drop_positions(lists, drop)
        return replaced


def svd_refactor(W: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of ``W`` (m×n), balanced and aligned with the current ``(A, B)`` (``svd_oracle``).

    With the truncated SVD ``W_r = U Σ Vᵀ``: ``B' = U Σ^{1/2} Q``, ``A' = Qᵀ Σ^{1/2} Vᵀ``, so
    ``B' A' = W_r`` (Eckart–Young) for any orthogonal ``Q``; ``Q = polar(Σ^{1/2}(Uᵀ B + Vᵀ Aᵀ))``
    minimises ``‖B' − B‖² + ‖A' − A‖²`` over ``Q`` so that the factors do not jump between
    equivalent bases from one step to the next.  Needs ``r ≤ min(m, n)``.
    """
    r = A.shape[0]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, root, Vh = U[:, :r], S[:r].sqrt(), Vh[:r]
    Um, _, Vmh = torch.linalg.svd(root[:, None] * (U.T @ B + Vh @ A.T))
    Q = Um @ Vmh
    return Q.T @ (root[:, None] * Vh), (U * root) @ Q
