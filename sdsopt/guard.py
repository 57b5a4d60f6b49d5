"""The non-finite guard of ``SDSAdamW(skip_nonfinite=True)``: find NaN/Inf gradients without a host sync.

A step is skipped as ``torch.amp.GradScaler`` skips one: parameters, moments and step counts are left
untouched.  On CUDA with ``fused=True`` the decision stays on the device (torch's fused Adam kernel takes a
``found_inf`` tensor and does nothing when it is non-zero) and the warning that names the offending
parameter is issued once the flag has reached the host by a non-blocking copy; elsewhere the flag is read
on the host at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .distributed import process_group, reduce_parts
from .pairing import param_label


def nonfinite_flags(tensors: list[Tensor]) -> Tensor:
    """Bool vector on ``tensors[0]``'s device: ``flags[i]`` is True iff ``tensors[i]`` holds a NaN or ±Inf.

    One ``_foreach_norm(·, ∞)`` launch per device and dtype: ``max|x|`` is finite iff every entry is (NaN
    propagates through the max), and unlike a 2-norm it cannot overflow on large finite values.  Empty
    tensors are finite.  Nothing is copied from the host, so on CUDA nothing waits.
    """
    device = tensors[0].device
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            kinds.setdefault((t.device, t.dtype), []).append(i)
    if len(kinds) == 1 and sum(map(len, kinds.values())) == len(tensors):  # the common case: one stack, no scatter
        return ~torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))))
    norms: list[Tensor] = [torch.zeros((), device=device)] * len(tensors)
    for idx in kinds.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], float("inf"))):
            norms[i] = n.to(device=device, dtype=torch.float32)
    return ~torch.isfinite(torch.stack(norms))


@dataclass
class SkipLog:
    """Count of skipped steps and the once-per-optimizer warning.

    ``host`` counts steps decided on the host; ``device`` (a float32 scalar on the GPU, created on first
    use) accumulates the ``found_inf`` flags of sync-free steps.  ``pending`` holds, per sync-free step, a
    pinned host copy of ``(found_inf, index of the first offending gradient, local flag)`` still in
    flight, the CUDA event that completes it and the step's gradient labels.
    """

    host: int = 0
    device: Tensor | None = None
    warned: bool = False
    pending: list[tuple[Tensor, torch.cuda.Event, Callable[[int], str]]] = field(default_factory=list)

    def skipped_on_host(self, label: str) -> None:
        self.host += 1
        self.warn(label)

    def skipped_on_device(self, found_inf: Tensor, bad: Tensor, labels: Callable[[int], str]) -> None:
        """Record a sync-free step's flag: added to the device count, copied to the host without waiting."""
        self.device = found_inf.clone() if self.device is None else self.device + found_inf
        first = torch.argmax(bad.to(torch.uint8)).to(torch.float32)
        info = torch.stack([found_inf, first, bad.any().to(torch.float32)])
        host = torch.empty(3, dtype=torch.float32, pin_memory=True)
        host.copy_(info, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, labels))

    def poll(self, wait: bool = False) -> None:
        """Issue the warning for sync-free steps whose flag has reached the host (all of them if ``wait``)."""
        still = []
        for host, event, labels in self.pending:
            if not (wait or event.query()):
                still.append((host, event, labels))
                continue
            event.synchronize()
            found, first, local_bad = host.tolist()
            if found:
                self.warn(labels(int(first)) if local_bad else "a parameter on another rank")
        self.pending = still

    @property
    def total(self) -> int:
        self.poll(wait=True)
        return self.host + (int(self.device.item()) if self.device is not None else 0)

    def reset(self, count: int) -> None:
        self.host, self.device, self.pending = count, None, []

    def warn(self, label: str) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"SDSAdamW(skip_nonfinite=True) skipped a step: the gradient of {label} is not finite. Parameters, "
            "moments and step counts were left as they were; further skips are counted in opt.skipped_steps "
            "without another warning.",
            RuntimeWarning, stacklevel=4,
        )


def guard_step(prepared: list[tuple[Any, ...]], param_groups: list[dict[str, Any]], host_decisions: bool,
               skips: SkipLog) -> tuple[bool, Tensor | None]:
    """``skip_nonfinite``: is any gradient this step would use NaN/Inf?  Returns ``(skip now, found_inf)``.

    ``prepared``: per group ``(gi, group, position, lists, has_complex)``.  Under FSDP2 a shard's flag is summed
    over its process group (one all-reduce of one number per group), so that all ranks skip together; DDP's
    gradients are equal on all ranks already.  The decision stays on the device (``found_inf`` for torch's fused
    Adam, no host sync) when every gradient is on CUDA and no group needs a host decision (``host_decisions``:
    a group without ``fused=True``, ``sds``'s warm-up counts, the σ channel's Adam, the oracle); otherwise it is
    read on the host and a skipped step returns at once.
    """
    grads, where, groups_of = [], [], []
    for gi, group, position, lists, _ in prepared:
        for i, q in position.items():
            grads.append(lists["grads"][q])
            where.append((gi, i))
            groups_of.append(process_group(group["params"][i]))
    if not grads:
        return False, None

    def label(j: int) -> str:
        gi, i = where[j]
        return param_label(param_groups[gi], i, gi)

    bad = nonfinite_flags(grads)
    found = bad.any().to(torch.float32)
    sharded = {pg: torch.stack([bad[j] for j, g in enumerate(groups_of) if g is pg]).any().to(torch.float32)
               .reshape(1) for pg in {g for g in groups_of if g is not None}}
    for flag in reduce_parts(sharded, lambda pg: (pg, torch.float32, bad.device)).values():
        found = torch.maximum(found, (flag > 0).to(torch.float32).reshape(()))
    if not host_decisions and all(g.is_cuda for g in grads):
        skips.poll()
        skips.skipped_on_device(found, bad, label)
        return False, found
    if not found.item():
        return False, None
    skips.skipped_on_host(label(int(torch.argmax(bad.to(torch.uint8)))) if bad.any()
                          else "a parameter on another rank")
    return True, None

