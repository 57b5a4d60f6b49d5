"""One rank of the distributed tests (DDP and FSDP2 on CPU/gloo): run as a script by ``test_distributed.py``.

Every rank trains the model of :func:`build_model` on its slice of the global batch of
:func:`global_batch` and rank 0 writes the results with ``torch.save`` to ``--out``.  The
unsharded reference runs in the test process itself, from the same builders.

Usage: ``python tests/dist_worker.py {ddp,fsdp,hsdp,psi} OUT`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (the test sets them).  ``SDSOPT_DIST_DEVICE=cuda`` runs on
one GPU per rank with NCCL instead of CPUs with gloo.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdsopt import SDSAdamW
from sdsopt.lab.tasks.lora import LoraLinear

DEVICE = os.environ.get("SDSOPT_DIST_DEVICE", "cpu")
STEPS = 6
LR = 3e-2
# (in, out) of the LoRA layers: A (r×in) must shard evenly along in (FSDP2 shards dims > 0 only
# evenly); B (out×r) shards along out, and the last layer's single row leaves rank 1's B shard empty.
# The two (6, 6) layers share a shape bucket (stacked rewrite).
LAYERS = [(8, 6), (6, 6), (6, 6), (6, 1)]
RANKS = [3, 2, 2, 3]  # LoRA rank per layer: two Gram sizes, still one all-reduce
BATCH = 8  # global batch; each of 2 ranks gets 4 rows
GUARD_STEP = 3  # the step whose gradient rank 1 makes NaN (skip_nonfinite)

# (label, SDSAdamW options): every mode that runs on shards, and both r×r routes
CASES: list[tuple[str, dict[str, Any]]] = [
    ("sds", {"warmup_steps": 0}),  # coordinates from step one
    ("sds_sigma", {"mode": "sds_polar", "decouple_sigma": True}),
    ("sds_warmup", {"warmup_steps": 2}),  # two AdamW steps, the re-split, then coordinates
    ("sds_polar", {"mode": "sds_polar"}),
    ("sds_polar_newton_schulz", {"mode": "sds_polar", "route": "newton_schulz"}),
    ("scaled", {"mode": "scaled", "damping": 1e-3}),
    ("lora", {"mode": "lora"}),
    ("sds_muon", {"mode": "sds_muon", "b_lr_ratio": 2.0}),
]


# (label, PSILoRA options) for DDP: Gauss–Seidel sweeps with low-rank momentum, the diagonal metric with
# momentum, and clipping that binds (the full gradient's norm is ~1 here)
PSI_CASES: list[tuple[str, dict[str, Any]]] = [
    ("psi", {"lookahead_iters": 2, "momentum": 0.8, "dampening": 0.8}),
    ("psi_scaled", {"metric": "diagonal", "momentum": 0.5}),
    ("psi_clip", {"lookahead_iters": 0, "max_grad_norm": 0.05}),
]
PSI_LR = 0.2


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LoraLinear(nn.Linear(i, o, dtype=torch.float64), r, alpha=6.0)
                                    for (i, o), r in zip(LAYERS, RANKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def build_model(seed: int = 0) -> Model:
    """The same float64 model on every rank; B ≠ 0 so that every rewrite is exercised from step one."""
    torch.manual_seed(seed)
    model = Model()
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_(0.0, 0.3)
    return model.to(_device())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, LAYERS[0][0], generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, LAYERS[-1][1], generator=g, dtype=torch.float64)
    return x.to(_device()), y.to(_device())


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          collectives: list[list[tuple[str, int]]] | None = None) -> None:
    """Mean-squared-error steps on this rank's rows of each global batch (mean: DDP/FSDP average grads).

    With ``collectives``, each ``opt.step()``'s c10d calls (:class:`CollectiveLog`) are appended to it.
    """
    for step in steps:
        x, y = global_batch(step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = (model(x[rows]) - y[rows]).pow(2).mean()
        loss.backward()
        if collectives is None:
            opt.step()
        else:
            with CollectiveLog() as log:
                opt.step()
            collectives.append(log.calls)
        opt.zero_grad(set_to_none=True)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, gathered to full tensors, with DDP's ``module.`` prefix removed."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().cpu().clone()
    return out


class CollectiveLog(TorchDispatchMode):
    """Records every c10d collective (eager or functional) with the bytes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.", "c10d_functional.")) and "wait" not in name:
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            self.calls.append((name, nbytes))
        return func(*args, **(kwargs or {}))


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """``fully_shard`` every layer and the root, LoRA ``A`` along n; a 2-D ``mesh`` makes it HSDP."""
    from torch.distributed.fsdp import fully_shard

    from sdsopt.distributed import lora_shard_placement_fn

    shards = mesh.size(mesh.ndim - 1) if mesh is not None else None
    placement = lora_shard_placement_fn(model, mesh_size=shards)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    return fully_shard(model, mesh=mesh, shard_placement_fn=placement)


def run_hsdp(world: int, rank: int) -> dict[str, Any]:
    """HSDP (2-D mesh: replicate × shard) in both shapes a world of 2 allows."""
    from torch.distributed.device_mesh import init_device_mesh

    results: dict[str, Any] = {"collectives": {}}
    for shape in ((1, world), (world, 1)):
        mesh = init_device_mesh(_device().type, shape, mesh_dim_names=("replicate", "shard"))
        for label, options in CASES[:2]:  # sds, and sds_polar with the singular-value channel
            model = shard(build_model(), mesh)
            opt = SDSAdamW(model.named_parameters(), lr=LR, **options)
            logs: list[list[tuple[str, int]]] = []
            train(model, opt, range(STEPS), rank, world, collectives=logs)
            results[(shape, label)] = full_params(model)
            results["collectives"][(shape, label)] = logs
    return results


def run_ddp(world: int, rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for label, options in CASES:
        model = DDP(build_model())
        opt = SDSAdamW(model.named_parameters(), lr=LR, **options)
        train(model, opt, range(STEPS), rank, world)
        results[label] = full_params(model)
    return results


def run_psi(world: int, rank: int) -> dict[str, Any]:
    """PSILoRA under DDP: products of G all-reduced per half-sweep; logs each step's collectives."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sdsopt import PSILoRA

    results: dict[str, Any] = {"collectives": {}}
    for label, options in PSI_CASES:
        model = DDP(build_model())
        opt = PSILoRA(model, lr=PSI_LR, **options)
        logs: list[list[tuple[str, int]]] = []
        train(model, opt, range(STEPS), rank, world, collectives=logs)
        results[label] = full_params(model)
        results["collectives"][label] = logs
        results[f"{label}_norm"] = None if opt.last_grad_norm is None else float(opt.last_grad_norm)
    return results


def run_fsdp(world: int, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    results: dict[str, Any] = {"collectives": {}}
    for label, options in CASES:
        model = shard(build_model())
        opt = SDSAdamW(model.named_parameters(), lr=LR, **options)
        logs: list[list[tuple[str, int]]] = []
        train(model, opt, range(STEPS), rank, world, collectives=logs)
        results[label] = full_params(model)
        results["collectives"][label] = logs

    # mode "lora" is AdamW on shards too, bit for bit: SDSAdamW's Adam on the local shards against
    # torch.optim.AdamW on the DTensors, every parameter trainable
    results["adamw_parity"] = []
    for make in (lambda named: SDSAdamW(named, lr=LR, mode="lora"),
                 lambda named: torch.optim.AdamW([p for _, p in named], lr=LR)):
        model = build_model().requires_grad_(True)
        model = shard(model)
        train(model, make(list(model.named_parameters())), range(STEPS), rank, world)
        results["adamw_parity"].append(full_params(model))

    # the optimizer refuses modes that need whole factors, naming the fix
    model = shard(build_model())
    for mode in ("svd_oracle",):
        opt = SDSAdamW(model.named_parameters(), lr=LR, mode=mode)
        opt.attach(model)
        try:
            train(model, opt, range(1), rank, world)
        except ValueError as err:
            results[f"refused_{mode}"] = str(err)
        opt.zero_grad(set_to_none=True)

    # skip_nonfinite: a NaN in rank 1's shard alone makes every rank skip the step (the flag is reduced)
    model = shard(build_model())
    opt = SDSAdamW(model.named_parameters(), lr=LR, warmup_steps=0, skip_nonfinite=True)
    for step in range(STEPS):
        x, y = global_batch(step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        (model(x[rows]) - y[rows]).pow(2).mean().backward()
        if step == GUARD_STEP and rank == 1:
            model.layers[0].lora_A["default"].weight.grad.to_local()[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        results.setdefault("guard_warnings", []).extend(str(w.message) for w in caught)
        opt.zero_grad(set_to_none=True)
    results["guard"] = full_params(model)
    results["guard_skipped"] = opt.skipped_steps

    # torch.distributed.checkpoint: save after 3 steps, resume in a fresh model/optimizer, compare
    ckpt = os.path.join(sys.argv[2], "dcp")
    options = {"mode": "sds_polar", "decouple_sigma": True}
    model = shard(build_model())
    opt = SDSAdamW(model.named_parameters(), lr=LR, **options)
    train(model, opt, range(3), rank, world)
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    train(model, opt, range(3, STEPS), rank, world)
    results["dcp_uninterrupted"] = full_params(model)

    model = shard(build_model(seed=123))  # different weights: everything must come from the checkpoint
    opt = SDSAdamW(model.named_parameters(), lr=LR, **options)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, range(3, STEPS), rank, world)
    results["dcp_resumed"] = full_params(model)
    results["state_placements"] = sorted({
        (type(v).__name__, str(getattr(v, "placements", None)))
        for s in opt.state.values() for k, v in s.items() if k == "exp_avg"
    })
    return results


def main() -> None:
    case, out = sys.argv[1], sys.argv[2]
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {"ddp": run_ddp, "fsdp": run_fsdp, "hsdp": run_hsdp, "psi": run_psi}[case](world, rank)
    if rank == 0:
        torch.save(results, os.path.join(out, f"{case}.pt"))
    dist.barrier()
    time.sleep(0.5)  # let gloo's worker thread free its last work before teardown (see examples/distributed.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
