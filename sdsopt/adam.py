"""The one AdamW update of sdsopt: torch's functional ``adam(..., decoupled_weight_decay=True)``, the very
kernel behind ``torch.optim.AdamW``, so its foreach/fused kernels and exact semantics are inherited.

Every Adam step of the package goes through :func:`adamw`: the optimizer's common call, the coordinate step of
mode ``sds`` (torch path), the singular-value channel, the oracle and :class:`sdsopt.PSILoRA`'s other parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from .distributed import is_dtensor, local, local_grad
from .pairing import param_label

__all__ = ["AdamLists", "StepLists", "adamw", "adamw_sides", "side_lr"]

AdamLists = dict[str, list[Tensor]]
"""The lists of one Adam call: ``params``, ``grads``, ``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs`` (empty without
amsgrad) and ``state_steps``."""


def adamw(options: Mapping[str, Any], lists: AdamLists, *, lr: float | Tensor, weight_decay: float,
          has_complex: bool = False, found_inf: Tensor | None = None) -> None:
    """AdamW on ``lists`` in place, with ``options``' ``betas``, ``eps``, ``amsgrad``, ``maximize``, ``foreach`` and
    ``fused`` (a param group, or a copy of one with some of them replaced)."""
    beta1, beta2 = options["betas"]
    adam(
        lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
        lists.get("max_exp_avg_sqs", []), lists["state_steps"],
        foreach=options["foreach"], fused=options["fused"], has_complex=has_complex, found_inf=found_inf,
        decoupled_weight_decay=True, amsgrad=options["amsgrad"], beta1=beta1, beta2=beta2,
        lr=lr, weight_decay=weight_decay, eps=options["eps"], maximize=options["maximize"],
    )


def side_lr(group: Mapping[str, Any], side: str, lr: float | Tensor | None = None) -> float | Tensor:
    """The step size of a LoRA pair's factor ``side`` (``"A"`` or ``"B"``): ``lr`` (default: the group's) for A,
    ``b_lr_ratio·lr`` for B (docs/math.md (2.7)); the same object for B when the ratio is 1."""
    lr = group["lr"] if lr is None else lr
    ratio = group.get("b_lr_ratio", 1.0)  # (groups of checkpoints from before the option: 1)
    return lr if side == "A" or ratio == 1.0 else lr * ratio


def adamw_sides(group: Mapping[str, Any], lists: AdamLists, b_factors: set[int], *, has_complex: bool = False,
                found_inf: Tensor | None = None) -> None:
    """The common AdamW call of a param group: the entries of ``lists`` whose ``params`` are in ``b_factors``
    (the ``id`` of each of the pairs' B factors in ``lists["params"]``) at :func:`side_lr`'s ``b_lr_ratio·lr``,
    every other entry at ``lr``, both with the group's ``weight_decay`` (docs/math.md (2.7): LoRA+'s param groups,
    as PEFT's ``create_loraplus_optimizer`` builds them).  One call when the ratio is 1 or no B factor is listed."""
    ratio = side_lr(group, "B", 1.0)
    b_pos = [q for q, p in enumerate(lists["params"]) if id(p) in b_factors] if ratio != 1.0 else []
    if not b_pos:
        adamw(group, lists, lr=group["lr"], weight_decay=group["weight_decay"], has_complex=has_complex,
              found_inf=found_inf)
        return
    chosen = set(b_pos)
    for is_b in (False, True):
        sub: AdamLists = {key: [v for q, v in enumerate(values) if (q in chosen) == is_b] if values else []
                          for key, values in lists.items()}
        if sub["params"]:
            adamw(group, sub, lr=side_lr(group, "B" if is_b else "A"), weight_decay=group["weight_decay"],
                  has_complex=has_complex, found_inf=found_inf)


class StepLists:
    """Per param group, the lists of the step's common Adam call (parameters with a gradient and their AdamW
    state, created on a parameter's first step as ``torch.optim.Adam._init_group`` does).

    The lists of a step whose parameters with gradients, ``amsgrad`` and ``fused`` are those of the previous step
    are that step's (state tensors are updated in place), with this step's gradients: the per-parameter loop runs
    only when that changes, on the first steps and after :meth:`clear` (``load_state_dict``)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, ...]] = {}
        self._kinds: dict[int, list[tuple[bool, bool]]] = {}  # per group: (complex, DTensor) per parameter

    def clear(self) -> None:
        self._cache.clear()

    def forget(self, state: MutableMapping[Tensor, dict[str, Any]], params: list[Tensor]) -> None:
        """Drop the state of ``params`` (created by a step that was then skipped, so that they count as never
        stepped) and the lists that hold it."""
        if params:
            for p in params:
                state.pop(p, None)
            self.clear()

    def __call__(self, group: dict[str, Any], gi: int, state: MutableMapping[Tensor, dict[str, Any]]
                 ) -> tuple[dict[int, int], AdamLists, bool]:
        """``(position, lists, has_complex)``: ``position`` maps a param index to its slot in ``lists``."""
        now = [p.grad for p in group["params"]]
        key = (tuple(g is not None for g in now), group["amsgrad"], group["fused"])
        cached = self._cache.get(gi)
        if cached is not None and cached[0] == key:
            _, position, template, has_complex = cached
            grads = [now[i] for i in position]
            if not any(g.is_sparse for g in grads):
                lists: AdamLists = defaultdict(list, {k: list(v) for k, v in template.items()})
                lists["grads"] = grads
                return position, lists, has_complex
        position, lists, has_complex = self._collect(group, gi, state)
        if not any(sharded for _, sharded in self._kinds[gi]):  # (DTensor local views are per call)
            template = {k: list(v) for k, v in lists.items() if k != "grads"}
            self._cache[gi] = (key, position, template, has_complex)
        return position, lists, has_complex

    def _collect(self, group: dict[str, Any], gi: int, state: MutableMapping[Tensor, dict[str, Any]]
                 ) -> tuple[dict[int, int], AdamLists, bool]:
        """The per-parameter loop (creates the state of parameters stepped the first time)."""
        lists: AdamLists = defaultdict(list)
        position: dict[int, int] = {}
        has_complex = False
        device_step = bool(group["fused"])  # torch keeps `step` on the device for fused kernels
        params, grads, exp_avgs, exp_avg_sqs, steps = (lists[k] for k in
                                                      ("params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"))
        amsgrad = group["amsgrad"]
        kinds = self._kinds.get(gi)
        if kinds is None or len(kinds) != len(group["params"]):  # per parameter: (complex, DTensor), fixed
            kinds = self._kinds[gi] = [(torch.is_complex(p), is_dtensor(p)) for p in group["params"]]
        for i, (p, (complex_p, sharded)) in enumerate(zip(group["params"], kinds)):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"SDSAdamW: {param_label(group, i, gi)} has a sparse gradient; SDSAdamW (like AdamW) "
                    "needs dense gradients (e.g. nn.Embedding(sparse=False))."
                )
            has_complex |= complex_p
            pstate = state[p]
            if "step" not in pstate:  # (mode sds may have put the pair's warm-up count there)
                pstate["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if device_step
                    else torch.tensor(0.0, dtype=torch.float32)
                )
                pstate["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                pstate["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    pstate["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            position[i] = len(params)
            if sharded:  # FSDP2 shards: the update is elementwise, so Adam runs on the local shards
                params.append(local(p))
                grads.append(local_grad(p, param_label(group, i, gi)))
                exp_avgs.append(local(pstate["exp_avg"]))
                exp_avg_sqs.append(local(pstate["exp_avg_sq"]))
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(local(pstate["max_exp_avg_sq"]))
            else:
                params.append(p)
                grads.append(grad)
                exp_avgs.append(pstate["exp_avg"])
                exp_avg_sqs.append(pstate["exp_avg_sq"])
                if amsgrad:
                    lists["max_exp_avg_sqs"].append(pstate["max_exp_avg_sq"])
            steps.append(pstate["step"])
        return position, lists, has_complex
