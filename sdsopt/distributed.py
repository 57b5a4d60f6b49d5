"""Sharded LoRA factors (FSDP2 DTensors): layout checks, local views, and the r×r all-reduce.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) parameters and gradients are DTensor shards.
The rewrite needs only the r×r Grams of whole factors, which are sums of per-shard Grams when each
factor is sharded along its *long* dimension:

    K_A = A Aᵀ = Σ_i A_i A_iᵀ      (A, r×n, sharded along n: ``Shard(1)``)
    K_B = Bᵀ B = Σ_i B_iᵀ B_i      (B, m×r, sharded along m: ``Shard(0)``, FSDP2's default)

so one all-reduce of the stacked r×r Grams per step suffices, and ``g̃A_i = P_B gA_i``,
``g̃B_i = gB_i P_A`` are then computed locally.  The singular-value channel's ``G̃ Xᵀ`` is likewise
a sum over shards (one more r×r all-reduce).  Adam, being elementwise, then runs on the local
shards of parameters, gradients and state (:func:`local`, :func:`local_grad`).

FSDP2 shards dim 0 by default, which for ``A`` is r: pass
``shard_placement_fn=lora_shard_placement_fn(model)`` to ``fully_shard``.

DeepSpeed ZeRO flattens parameters into partitions, which destroys the pairing; it is detected and
refused (see :func:`check_not_deepspeed`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .pairing import PairingFn, resolve_pairing

__all__ = [
    "all_reduce_coalesced",
    "check_not_deepspeed",
    "check_pair_layout",
    "local",
    "local_grad",
    "lora_shard_placement_fn",
    "process_group",
    "reduce_parts",
]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def local_grad(param: Tensor, label: str) -> Tensor:
    """``param.grad``'s local shard, checked to be laid out as ``param``'s (so that Adam, which is
    elementwise, can run on local shards: the same numbers without DTensor dispatch per op)."""
    grad = param.grad
    if not is_dtensor(param):
        return grad
    if not is_dtensor(grad) or grad.device_mesh != param.device_mesh or grad.placements != param.placements:
        raise ValueError(
            f"SDSAdamW: {label} is a DTensor with placements {param.placements} but its gradient is "
            f"{getattr(grad, 'placements', 'a plain tensor')}; SDSAdamW needs gradients sharded like their "
            "parameters, as FSDP2 leaves them after its reduce-scatter (redistribute the gradient first)."
        )
    return grad.to_local()


def process_group(t: Tensor):
    """The process group over which ``t``'s shards are spread: that of the mesh dimension holding its
    ``Shard`` placement (HSDP: the shard dimension; replicas hold equal sums already).  ``None`` for
    plain or replicated tensors and for a shard group of one rank (nothing to sum)."""
    if not is_dtensor(t):
        return None
    dims = [d for d, p in enumerate(t.placements) if isinstance(p, Shard)]
    if not dims:
        return None
    group = t.device_mesh.get_group(mesh_dim=dims[0])
    return group if torch.distributed.get_world_size(group) > 1 else None


def check_pair_layout(A: Tensor, B: Tensor, name_a: str, name_b: str) -> None:
    """Refuse shardings whose Grams are not sums of per-shard Grams (``A`` along r, ``B`` along r,
    a factor sharded over two mesh dimensions as in tensor parallelism, or a non-DTensor partner)."""
    if is_dtensor(A) != is_dtensor(B):
        raise ValueError(f"LoRA pair {name_a} / {name_b}: one factor is a DTensor and the other is not; "
                         "shard both factors of a pair with the same fully_shard call.")
    if not is_dtensor(A):
        return
    if A.device_mesh != B.device_mesh:
        raise ValueError(f"LoRA pair {name_a} / {name_b}: both factors must live on the same device mesh.")

    def sharded_along(t: Tensor, dim: int) -> bool:
        shards = [p for p in t.placements if isinstance(p, Shard)]
        return (all(isinstance(p, (Replicate, Shard)) for p in t.placements) and len(shards) <= 1
                and all(p.dim == dim for p in shards))

    if not (sharded_along(A, 1) and sharded_along(B, 0)):
        raise ValueError(
            f"LoRA pair {name_a} {A.placements} / {name_b} {B.placements}: SDSAdamW needs A (r×n) sharded along n "
            "(Shard(1)) and B (m×r) along m (Shard(0)), over one mesh dimension (FSDP2 or HSDP; other mesh "
            "dimensions Replicate), so that the r×r Grams are sums over shards. Use "
            "fully_shard(module, shard_placement_fn=sdsopt.distributed.lora_shard_placement_fn(model))."
        )


def lora_shard_placement_fn(
    model: nn.Module, pairing: str | PairingFn | None = None, mesh_size: int | None = None
) -> Callable[[nn.Parameter], object]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards every LoRA ``A`` (r×n) along n (``Shard(1)``).

    Other parameters keep FSDP2's default (``None`` → ``Shard(0)``, which is what ``B`` needs).
    ``pairing`` is the rule given to :class:`sdsopt.SDSAdamW` (default: PEFT names).  FSDP2 shards dimensions other than 0 only evenly, so n must be divisible by the mesh size
    (``mesh_size``, default: the world size); a factor where it is not raises ``ValueError``
    naming it, when ``fully_shard`` asks for its placement.
    """
    params = dict(model.named_parameters())
    a_names = {id(params[a]): a for a, _ in resolve_pairing(pairing)(list(params))}

    def placement(param: nn.Parameter):
        name = a_names.get(id(param))
        if name is None:
            return None
        size = mesh_size if mesh_size is not None else torch.distributed.get_world_size()
        if param.shape[1] % size:
            raise ValueError(
                f"LoRA factor {name!r} has shape {tuple(param.shape)}: SDSAdamW shards A along n = {param.shape[1]}, "
                f"which FSDP2 can only do when n is divisible by the mesh size {size}. Leave this module out of "
                "fully_shard (wrap its parent instead) or choose a mesh size that divides n."
            )
        return Shard(1)

    return placement


def check_not_deepspeed(param: Tensor, label: str) -> None:
    """DeepSpeed ZeRO-3 parameters carry ``ds_id``; their data lives in flat partitions: refuse them."""
    if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
        raise ValueError(
            f"SDSAdamW: {label} is a DeepSpeed ZeRO parameter. ZeRO flattens and partitions parameters, "
            "so LoRA pairs cannot be found or kept; use DDP or FSDP2 (see the README's 'Distributed training')."
        )


def all_reduce_coalesced(tensors: list[Tensor], group) -> list[Tensor]:
    """Each tensor summed over ``group``, by *one* all-reduce of their flat concatenation.

    The tensors must share dtype and device; ``group=None`` (plain or replicated tensors) returns
    them unchanged, without copying.
    """
    if group is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def reduce_parts(parts: dict[Any, Tensor], collective: Callable[[Any], tuple[Any, ...]]) -> dict[Any, Tensor]:
    """``parts`` summed over their process groups: one all-reduce per ``collective(key)`` =
    ``(process group, dtype, device)``; parts without a group come back unchanged."""
    by_collective: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for key in parts:
        by_collective[collective(key)].append(key)
    out = dict(parts)
    for (pg, *_), keys in by_collective.items():
        out.update(zip(keys, all_reduce_coalesced([parts[k] for k in keys], pg)))
    return out
