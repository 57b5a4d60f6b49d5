"""What ``gradient_start=True`` costs per step: SmolLM2-135M's shapes (random weights, no checkpoint needed), PEFT
LoRA r 8 on all seven projections, batch 16 × ``--seq`` tokens, bf16 autocast, on one GPU.

    python benchmarks/gs_cost.py --out gs_cost.json                      # this checkout's sdsopt
    python benchmarks/gs_cost.py --sdsopt-path OLD_CHECKOUT --out old.json  # another version, for a before/after

For ``mode="lora"`` with and without the start (and ``"sds"`` without, ``"sds"`` + start with ``warmup_steps=0``)
it times every step of ``--steps`` (forward, backward, optimizer step; the device synchronised around each),
reports step 1 and the median of the steps after ``--skip``, and writes torch.profiler's top operators of step 1
and of a later step.  Versions before the recording stopped by itself get ``opt.capture.remove()`` after step 1,
as their docs said.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def smollm2_shaped(device: str):
    """A ``LlamaForCausalLM`` of SmolLM2-135M's configuration (30 layers, width 576, 9 heads, 3 KV heads, MLP 1536,
    vocabulary 49152, tied embeddings) with random weights, and PEFT LoRA r 8, α 16 on the seven projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.eval()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def run(label: str, kw: dict, args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sdsopt import SDSAdamW

    model = smollm2_shaped(args.device)
    opt = SDSAdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0,
                   **kw)
    if kw.get("gradient_start") and opt.capture is None:
        opt.attach(model)  # (versions that did not record by themselves)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=gen).to(args.device)
    times, tables = [], {}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for step in range(1, args.steps + 1):
        prof = profile(activities=acts) if step in (1, args.steps) else None
        sync()
        t0 = time.perf_counter()
        if prof is not None:
            prof.__enter__()
        opt.zero_grad()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sync()
        if prof is not None:
            prof.__exit__(None, None, None)
        times.append(time.perf_counter() - t0)
        if step == 1:
            recording = opt.capture is not None  # (new versions: stopped by themselves once all started)
            if kw.get("gradient_start") and opt.capture is not None:
                opt.capture.remove()  # (old versions: the docs' advice)
        if prof is not None:
            tables[f"step{step}"] = prof.key_averages().table(sort_by="device_time_total" if len(acts) > 1 else "cpu_time_total", row_limit=15) + "\n" + \
                prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    later = times[args.skip:]
    return {"label": label, "options": kw, "step1_s": times[0], "median_later_s": statistics.median(later),
            "later_min_s": min(later), "later_max_s": max(later), "recording_after_step1": recording,
            "tables": tables}


CONFIGS = {"lora": dict(mode="lora"), "lora_gs": dict(mode="lora", gradient_start=True),
           "sds": dict(mode="sds"), "sds_gs": dict(mode="sds", gradient_start=True, warmup_steps=0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=192)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=12, help="steps left out of the median (sds's warm-up, re-split)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--sdsopt-path", default=None, help="import sdsopt from this folder (another version)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.sdsopt_path:
        sys.path.insert(0, args.sdsopt_path)
    import sdsopt

    results = [run(name, CONFIGS[name], args) for name in args.configs]
    base = {r["label"]: r["median_later_s"] for r in results}
    print(f"sdsopt from {sdsopt.__file__}; batch {args.batch}x{args.seq}, {args.steps} steps")
    print("| config | step 1 (s) | median step after (ms) | vs its plain mode | recording after step 1 |")
    print("|---|---|---|---|---|")
    for r in results:
        plain = base.get(r["label"].removesuffix("_gs"))
        rel = f"{(r['median_later_s'] / plain - 1) * 100:+.1f} %" if plain else "–"
        print(f"| {r['label']} | {r['step1_s']:.2f} | {r['median_later_s'] * 1e3:.1f} | {rel} | "
              f"{r['recording_after_step1']} |")
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
