"""Optimizer step time under FSDP2: SDSAdamW against torch.optim.AdamW (foreach, fused) on the same shards.

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_step.py --out fsdp.json

LLaMA-7B LoRA shapes (as ``step_time.py``: 32 layers × q,k,v,o,gate,up,down, 224 pairs), float32
factors sharded by ``fully_shard`` with ``lora_shard_placement_fn`` (A along n, B along m), one
GPU per rank and NCCL.  Gradients are random DTensors laid out like the parameters; only
``opt.step()`` is timed (CUDA events, median of ``--steps`` after ``--warmup``, taken on rank 0
with a barrier before each step).  The r×r all-reduce moves ``2·pairs·r²·4`` bytes a step
(``4·pairs·r²·4`` with the singular-value channel); gathering the factors instead would move
``Σ (m + n)·r·4`` bytes, both reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from torch import nn

from sdsopt import SDSAdamW
from sdsopt.distributed import lora_shard_placement_fn

WIDTH, FFN, LAYERS = 4096, 11008, 32
MODULES = {"q_proj": (WIDTH, WIDTH), "k_proj": (WIDTH, WIDTH), "v_proj": (WIDTH, WIDTH), "o_proj": (WIDTH, WIDTH),
           "gate_proj": (FFN, WIDTH), "up_proj": (FFN, WIDTH), "down_proj": (WIDTH, FFN)}


class Lora(nn.Module):
    def __init__(self, m: int, n: int, r: int) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False)})


class Layer(nn.Module):
    """One transformer layer's LoRA factors (``fully_shard`` needs a module, not a bare ModuleDict)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        for name, (m, n) in MODULES.items():
            self.add_module(name, Lora(m, n, r))


def sharded_model(r: int, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    with torch.device(device):
        model = nn.Module()
        model.layers = nn.ModuleList(Layer(r) for _ in range(LAYERS))
    placement = lora_shard_placement_fn(model)
    for layer in model.layers:
        fully_shard(layer, shard_placement_fn=placement)
    return fully_shard(model, shard_placement_fn=placement)


def allreduce_bytes(label: str, pairs: int, r: int) -> int:
    """Bytes SDSAdamW all-reduces a step: the stacked float32 r×r Grams, and G̃Xᵀ with the σ channel."""
    if not label.startswith("SDSAdamW") or "lora" in label:
        return 0
    return (4 if "sigma" in label else 2) * pairs * r * r * 4


def time_steps(opt: torch.optim.Optimizer, warmup: int, steps: int) -> float:
    times = []
    for k in range(warmup + steps):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        if k >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    variants = {
        "AdamW foreach": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-4, foreach=True),
        "AdamW fused": lambda ps: torch.optim.AdamW([p for _, p in ps], lr=1e-4, fused=True),
        "SDSAdamW lora (Adam on local shards)": lambda ps: SDSAdamW(ps, lr=1e-4, mode="lora", fused=True),
        "SDSAdamW sds": lambda ps: SDSAdamW(ps, lr=1e-4),
        "SDSAdamW sds fused": lambda ps: SDSAdamW(ps, lr=1e-4, fused=True),
        "SDSAdamW sds+sigma": lambda ps: SDSAdamW(ps, lr=1e-4, decouple_sigma=True),
    }
    rows = []
    for r in args.ranks:
        pairs = LAYERS * len(MODULES)
        gather_bytes = LAYERS * sum((m + n) * r * 4 for m, n in MODULES.values())
        results = {}
        for label, make in variants.items():
            model = sharded_model(r, device)
            named = list(model.named_parameters())
            for _, p in named:
                p.grad = torch.randn_like(p) * 1e-3
            results[label] = time_steps(make(named), args.warmup, args.steps)
            del model, named
            torch.cuda.empty_cache()
        fused = results["AdamW fused"]
        for label, ms in results.items():
            rows.append(dict(r=r, variant=label, median_ms=ms, ratio_to_fused=ms / fused, pairs=pairs,
                             allreduce_bytes=allreduce_bytes(label, pairs, r),
                             gather_bytes_avoided=gather_bytes))
    if dist.get_rank() == 0:
        info = dict(device=torch.cuda.get_device_name(device), world=dist.get_world_size(), torch=torch.__version__,
                    shapes="llama7b LoRA (224 pairs), float32", rows=rows)
        print(json.dumps(info, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
