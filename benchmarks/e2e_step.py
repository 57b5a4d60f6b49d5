"""End-to-end LoRA training step (forward + backward + optimizer) with fused AdamW vs SDSAdamW.

    python benchmarks/e2e_step.py                   # GPU: a LLaMA-style model from a config, bf16 autocast
    python benchmarks/e2e_step.py --layers 2 --hidden 256 --batch 2 --seq 64    # CPU-sized

The model is ``transformers.LlamaForCausalLM`` built from a config (random weights, bf16 on GPU),
with PEFT LoRA on every projection (q, k, v, o, gate, up, down; adapters kept in float32 by PEFT).
Each optimizer runs the same batches; the median wall time of ``--steps`` whole steps after
``--warmup`` is reported (CUDA-synchronised), and the overhead of each optimizer over fused AdamW, for every
``--batch`` (e.g. ``--batch 1 8``: 1×seq and 8×seq).  The default warm-up is ``sds``'s plain-AdamW steps
(``SDSAdamW``'s ``warmup_steps``) plus 5, so the median times coordinate steps only, as the label says; a
shorter ``--warmup`` is allowed (tests) but named in the output.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdsopt import SDSAdamW
from sdsopt.validation import DEFAULT_WARMUP_STEPS

SDS_WARMUP = DEFAULT_WARMUP_STEPS  # (SDSAdamW's warmup_steps=None: this, without gradient_start)


def build(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: a 1B-parameter init on the host takes ~10 s
        model = LlamaForCausalLM(config).to(dtype=dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def run(model, opt, batches, device, steps, warmup):
    times = []
    for i, tokens in enumerate(batches[: steps + warmup]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes, each timed")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=SDS_WARMUP + 5,
                    help=f"untimed steps first (default {SDS_WARMUP + 5}: sds's {SDS_WARMUP} plain-AdamW steps and 5)")
    args = ap.parse_args(argv)
    for batch in args.batch:
        time_batch(args, batch)


def time_batch(args: argparse.Namespace, batch: int) -> dict[str, tuple[float, float]]:
    """Every variant on the same ``batch × seq`` batches; prints and returns ``{label: (median ms, final loss)}``."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (batch, args.seq), generator=gen).to(device)
               for _ in range(args.steps + args.warmup)]
    variants = {
        "AdamW fused": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True),
        "SDSAdamW (sds)": lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True),
        "SDSAdamW (scaled)": lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True, mode="scaled"),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} | torch {torch.__version__} | llama layers={args.layers} hidden={args.hidden} "
          f"LoRA r={args.rank} on 7 projections | batch {batch}x{args.seq} | median of {args.steps} steps after "
          f"{args.warmup}" + ("" if args.warmup >= SDS_WARMUP else f" (below sds's {SDS_WARMUP} plain-AdamW steps: "
                                                                   "its median mixes AdamW steps in)"))
    results = {}
    for label, make in variants.items():
        model = build(args, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = make(model)
        results[label] = run(model, opt, batches, device, args.steps, args.warmup)
        print(f"  {label:<22} {results[label][0]:9.2f} ms/step  "
              f"({results[label][0] / results['AdamW fused'][0] * 100 - 100:+6.1f}% vs fused AdamW)  "
              f"final loss {results[label][1]:.3f}  trainable {trainable / 1e6:.1f}M", flush=True)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
