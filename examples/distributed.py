"""Distributed LoRA training with SDSAdamW: DDP or FSDP2, on CPUs (gloo) or GPUs (NCCL); PSILoRA under DDP.

    torchrun --standalone --nproc-per-node 2 examples/distributed.py --strategy fsdp
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --strategy ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed.py --strategy ddp --optimizer psi --lr 0.3

A PEFT LoRA byte-level GPT-2 (built from a config) on the stdlib's pydoc text, each rank on its own
batches.  Under FSDP2 the optimizer reduces only the r×r Grams of the factors (one all-reduce a step);
the run ends with a ``torch.distributed.checkpoint`` save of model and optimizer when ``--checkpoint``
is given.  ``--optimizer psi`` trains with :class:`sdsopt.PSILoRA` instead (DDP only: it replaces whole
factors, so FSDP2 shards are refused); its step equals one process's on the global batch.

Needs the extra ``hf`` (transformers, PEFT): ``pip install ".[hf]"`` in the checkout.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from sdsopt import PSILoRA, SDSAdamW
from sdsopt.lab.extras import exit_if_missing
from sdsopt.lab.tasks.text import batch_iterator, lm_loss, load_corpus, tiny_gpt2


def lora_gpt2(width: int, layers: int, block: int, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(layers=layers, width=width, heads=4, block=block, seed=0)  # same weights on every rank
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out
        return get_peft_model(model, config)


def main(argv=None) -> float:
    exit_if_missing(["transformers", "peft"], "examples/distributed.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    ap.add_argument("--optimizer", choices=["sds", "psi"], default="sds", help="SDSAdamW or PSILoRA (DDP only)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="per rank")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--checkpoint", default=None, help="directory for a torch.distributed.checkpoint save")
    args = ap.parse_args(argv)
    if args.optimizer == "psi" and args.strategy == "fsdp":
        ap.error("--optimizer psi needs --strategy ddp (PSILoRA replaces whole factors; FSDP2 shards them)")

    cuda = torch.cuda.is_available()
    # a collective stuck for 2 minutes raises instead of hanging the job (a DDP run hung once in CI at the end)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=2))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = lora_gpt2(args.width, 2, args.block, args.rank).to(device)

    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        from sdsopt.distributed import lora_shard_placement_fn

        placement = lora_shard_placement_fn(model)  # LoRA A (r×n) along n, everything else FSDP2's default
        for block in model.base_model.model.transformer.h:
            fully_shard(block, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)

    if args.optimizer == "psi":  # takes the model: it records the LoRA layers' inputs and output gradients
        opt = PSILoRA(model, lr=args.lr, lookahead_iters=1, momentum=0.9, dampening=0.9)
    else:
        opt = SDSAdamW(model.named_parameters(), lr=args.lr)  # was: torch.optim.AdamW(model.parameters(), lr=...)

    data = load_corpus("pydoc", max_bytes=200_000)
    batches = batch_iterator(data, args.block, args.batch, torch.Generator().manual_seed(rank))
    for step in range(args.steps):
        loss = lm_loss(model, next(batches).to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = mean.item() / dist.get_world_size()
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"{args.strategy} step {step:4d}  loss {mean:.4f}", flush=True)

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.barrier()  # no rank tears gloo down while its peer is still finishing the save (hung ~1 run in 3 without)
    # torch's gloo teardown can deadlock: destroying the process group (here with the DDP model, at return) joins
    # gloo's worker thread while holding the GIL, and that thread may still need the GIL to free the tensors of the
    # work it just finished (seen once in CI, by py-spy). Sleeping releases the GIL and lets it finish first.
    time.sleep(0.5)
    dist.destroy_process_group()
    return mean


if __name__ == "__main__":
    main()
