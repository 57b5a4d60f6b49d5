"""End-to-end LoRA training step (forward + backward + optimizer) with fused AdamW vs SDSAdamW.

    python benchmarks/e2e_step.py                   # GPU: a LLaMA-style model from a config, bf16 autocast
    python benchmarks/e2e_step.py --layers 2 --hidden 256 --batch 2 --seq 64    # CPU-sized
    python benchmarks/e2e_step.py --layers 4 --hidden 4096 --heads 32 --rank 128 --batch 1 8 --rounds 3 \\
        --variants adamw sds sds_torch --json e2e_r128.json                      # issue 46's table, with its noise
    python benchmarks/e2e_step.py --device cpu --layers 1 --hidden 64 --heads 2 --vocab 128 --seq 16 --batch 2 \\
        --steps 2 --warmup 1 --rank 4                                            # smoke (seconds)

The model is ``transformers.LlamaForCausalLM`` built from a config (random weights, bf16 on GPU),
with PEFT LoRA on every projection (q, k, v, o, gate, up, down; adapters kept in float32 by PEFT).
Each optimizer runs the same batches; the median wall time of ``--steps`` whole steps after
``--warmup`` is reported (CUDA-synchronised), and the overhead of each optimizer over fused AdamW, for every
``--batch`` (e.g. ``--batch 1 8``: 1×seq and 8×seq).  The default warm-up is ``sds``'s plain-AdamW steps
(``SDSAdamW``'s ``warmup_steps``) plus 5, so the median times coordinate steps only, as the label says; a
shorter ``--warmup`` is allowed (tests) but named in the output.

Variants (``--variants``, short names; the default is every one but ``sds_torch_unsplit``):

* ``adamw``: ``torch.optim.AdamW(fused=True)``, the baseline of the overhead column (which is left out
  when ``adamw`` does not run);
* ``sds``: ``SDSAdamW(fused=True)``, mode ``sds`` (the Triton kernels for the ranks :func:`sdsopt.fused.supported`
  takes, the torch path above);
* ``sds_torch``: the same with the kernels disabled (``SDSOPT_KERNELS=0`` in the environment while this variant is
  built and stepped, restored after; :func:`sdsopt.fused.available` reads it at every step): the torch-ops path.
  Where the kernels are not available anyway (the CPU without ``TRITON_INTERPRET``) it is ``sds`` again, so the
  default leaves it out there (name it to run it);
* ``scaled``: ``SDSAdamW(fused=True, mode="scaled")``;
* ``sds_torch_unsplit``: ``sds_torch`` with the Grams over the factors' whole width, one bmm each
  (``linalg.GRAM_SPLIT_MIN_COLS`` set out of reach while it runs): the in-process control of the split-K Grams of
  ``benchmarks/gram_split.patch``; refused unless that patch is applied (``sdsopt.linalg.gram_splits`` exists).

Noise (``--rounds N``): each variant's model and optimizer are built once and kept for the whole run (every batch
size and round), and the variants are timed in interleaved rounds, ``A B C, A B C, …``, per batch size: a drift of
the GPU's clocks or of the host's load during the run then falls on every variant alike instead of on whichever ran
last.  Kept rather than rebuilt because a build costs ~10 s per variant at the issue's shapes (the device time is
the budget), and keeping them costs memory only: ~3 GB per variant there (the 1 B-parameter bf16 model, 2.1 GB, and
its adapters with their optimizer states; the activations are freed after each step); with ``--rebuild`` each
variant is instead built again for every batch size (a fresh optimizer per batch size, as before ``--rounds``).  The
first round of the first batch size runs ``--warmup`` untimed steps; every later round (and batch size) runs
``--rewarm`` untimed steps first, since the optimizer is past its warm-up by then and only the caches (and, for a new
batch size, the shapes' first launches) need it.  The reported time is the median over all rounds' timed steps;
the spread printed beside it is the lowest and highest of the per-round medians.  A variant that fails (an
exception while building or stepping, e.g. a kernel that does not compile) is reported as failed and dropped; the
others go on.  ``--json PATH``: the results (device, torch, arguments, per batch and variant the median, the
per-round medians, overhead, final loss), written after every batch size, so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sdsopt import SDSAdamW, fused, linalg
from sdsopt.validation import DEFAULT_WARMUP_STEPS

SDS_WARMUP = DEFAULT_WARMUP_STEPS  # (SDSAdamW's warmup_steps=None: this, without gradient_start)

VARIANTS = {  # short name: (label, make(model))
    "adamw": ("AdamW fused",
              lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)),
    "sds": ("SDSAdamW (sds)", lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True)),
    "sds_torch": ("SDSAdamW (sds, torch ops)", lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True)),
    "scaled": ("SDSAdamW (scaled)", lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True, mode="scaled")),
    "sds_torch_unsplit": ("SDSAdamW (sds, torch ops, unsplit Grams)",
                          lambda m: SDSAdamW(m.named_parameters(), lr=1e-4, fused=True)),
}
DEFAULT_VARIANTS = ["adamw", "sds", "sds_torch", "scaled"]
TORCH_OPS = {"sds_torch", "sds_torch_unsplit"}  # run with SDSOPT_KERNELS=0


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


@contextlib.contextmanager
def variant_env(key: str):
    """The process state variant ``key`` runs under: ``SDSOPT_KERNELS=0`` for the torch-ops variants, the Grams
    unsplit for ``sds_torch_unsplit``; restored after."""
    before = os.environ.get("SDSOPT_KERNELS")
    min_cols = getattr(linalg, "GRAM_SPLIT_MIN_COLS", None)
    try:
        if key in TORCH_OPS:
            os.environ["SDSOPT_KERNELS"] = "0"
        if key == "sds_torch_unsplit":
            linalg.GRAM_SPLIT_MIN_COLS = 2**62
        yield
    finally:
        if before is None:
            os.environ.pop("SDSOPT_KERNELS", None)
        else:
            os.environ["SDSOPT_KERNELS"] = before
        if min_cols is not None:
            linalg.GRAM_SPLIT_MIN_COLS = min_cols


def run(model, opt, batches, device, steps, warmup):
    """``(per-step ms of the timed steps, final loss)``: ``warmup`` untimed steps, then ``steps`` timed."""
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
    return times, loss.item()


def kernels_available(device: torch.device) -> bool:
    return fused.available(torch.empty(0, device=device))


def default_variants(device: torch.device) -> list[str]:
    """Every variant but ``sds_torch_unsplit``; without the kernels (the CPU) ``sds_torch`` is ``sds``: left out."""
    return [v for v in DEFAULT_VARIANTS if v != "sds_torch" or kernels_available(device)]


def source_ids() -> dict[str, str]:
    """sha256 (12 hex digits) of the library files whose version the timings depend on (the kernels are being
    rewritten; linalg.py tells whether ``gram_split.patch`` was applied)."""
    root = Path(linalg.__file__).resolve().parent
    out = {}
    for name in ("fused.py", "kernels.py", "linalg.py", "modes/sds_steps.py"):
        path = root / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
    return out


def use_launch(choices: dict[str, dict]) -> None:
    """``sdsopt.fused.launch`` with ``choices`` (per ``"r/dtype"``) applied over its defaults, printed."""
    from dataclasses import replace

    default = fused.launch
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def launch(r, device, dtype=torch.float32):
        return replace(default(r, device, dtype), **choices.get(f"{r}/{names.get(dtype)}", {}))

    fused.launch = launch
    print(f"kernel settings from --launch: {choices}", flush=True)


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
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=SDS_WARMUP + 5,
                    help=f"untimed steps first (default {SDS_WARMUP + 5}: sds's {SDS_WARMUP} plain-AdamW steps and 5)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                    help="which variants run, in this order (default: " + " ".join(DEFAULT_VARIANTS)
                    + "; sds_torch only where the kernels are available)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per batch size (A B C, A B C, ...)")
    ap.add_argument("--rewarm", type=int, default=3,
                    help="untimed steps at the start of every round after the first (default 3)")
    ap.add_argument("--rebuild", action="store_true",
                    help="build every variant again for each batch size (default: built once, kept)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here")
    ap.add_argument("--launch", default=None,
                    help="JSON {'r/fp32': {Launch field: value}} (kernel_blocks.py --best): the kernels' settings "
                         "for those ranks instead of sdsopt.fused.launch's defaults")
    args = ap.parse_args(argv)
    if args.launch:
        use_launch(json.loads(Path(args.launch).read_text()))
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    device = torch.device(args.device)
    args.variants = args.variants or default_variants(device)
    if "sds_torch_unsplit" in args.variants and not hasattr(linalg, "gram_splits"):
        ap.error("variant sds_torch_unsplit needs the split-K Grams (apply benchmarks/gram_split.patch first)")
    if len(set(args.variants)) != len(args.variants):
        ap.error("--variants: a variant named twice")
    return time_all(args, device)


def _fmt_overhead(ms: float, base: float | None) -> str:
    return f"({ms / base * 100 - 100:+6.1f}% vs fused AdamW)" if base else "(no AdamW in this run)"


def time_all(args: argparse.Namespace, device: torch.device) -> dict:
    """Every variant on the same ``batch × seq`` batches per batch size, in interleaved rounds; prints, returns
    (and with ``--json`` writes) the results."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "args": vars(args), "sources": source_ids(),
              "kernels_available": kernels_available(device), "fused_max_rank": fused.max_rank(),
              "gram_split": hasattr(linalg, "gram_splits"), "batches": {}}
    if device.type == "cuda":
        report["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
    live: dict[str, tuple] = {}  # key: (model, opt, trainable)
    failed: dict[str, str] = {}
    done_steps = 0  # optimizer steps the kept models have taken before the current batch size

    def fail(key: str, err: BaseException) -> None:
        failed[key] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"  {VARIANTS[key][0]:<40} failed ({failed[key][:160]})", flush=True)
        live.pop(key, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def build_all() -> None:
        for key in args.variants:
            if key in failed:
                continue
            try:
                with variant_env(key):
                    model = build(args, device)
                    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                    live[key] = (model, VARIANTS[key][1](model), trainable)
            except Exception as err:  # noqa: BLE001 (out of memory, a refused option: report, go on)
                fail(key, err)

    for bi, batch in enumerate(args.batch):
        if args.rebuild or bi == 0:
            live.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            build_all()
            done_steps = 0
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, args.vocab, (batch, args.seq), generator=gen).to(device)
                   for _ in range(args.steps + max(args.warmup, args.rewarm))]
        first_warm = args.warmup if done_steps == 0 else args.rewarm
        before = done_steps + first_warm  # optimizer steps before the first timed one
        print(f"device {name} | torch {torch.__version__} | llama layers={args.layers} hidden={args.hidden} "
              f"LoRA r={args.rank} on 7 projections | batch {batch}x{args.seq} | median of {args.steps} steps"
              + (f" x {args.rounds} interleaved rounds" if args.rounds > 1 else "")
              + f" after {first_warm}" + (f" (later rounds after {args.rewarm})" if args.rounds > 1 else "")
              + ("" if done_steps == 0 else f", optimizers {done_steps} steps in")
              + ("" if before >= SDS_WARMUP else f" (below sds's {SDS_WARMUP} plain-AdamW steps: "
                                                   "its median mixes AdamW steps in)"), flush=True)
        times: dict[str, list[float]] = {k: [] for k in live}
        rounds: dict[str, list[float]] = {k: [] for k in live}
        losses: dict[str, float] = {}
        for rnd in range(args.rounds):
            warm = first_warm if rnd == 0 else args.rewarm
            for key in args.variants:
                if key not in live:
                    continue
                model, opt, _ = live[key]
                try:
                    with variant_env(key):
                        t, losses[key] = run(model, opt, batches, device, args.steps, warm)
                except Exception as err:  # noqa: BLE001 (a kernel that fails at this rank: report, go on)
                    fail(key, err)
                    continue
                times[key] += t
                rounds[key].append(statistics.median(t))
            done_steps += args.steps + warm
        rows = {}
        base = statistics.median(times["adamw"]) if times.get("adamw") else None
        for key in args.variants:
            if key in failed or not times.get(key):
                rows[key] = {"label": VARIANTS[key][0], "failed": failed.get(key, "no steps")}
                continue
            ms = statistics.median(times[key])
            rows[key] = {"label": VARIANTS[key][0], "median_ms": ms, "round_medians_ms": rounds[key],
                         "min_round_ms": min(rounds[key]), "max_round_ms": max(rounds[key]),
                         "overhead_pct": ms / base * 100 - 100 if base else None, "final_loss": losses[key],
                         "trainable": live[key][2], "timed_steps": len(times[key])}
            spread = (f"  rounds {min(rounds[key]):.2f}..{max(rounds[key]):.2f}" if args.rounds > 1 else "")
            print(f"  {VARIANTS[key][0]:<40} {ms:9.2f} ms/step  {_fmt_overhead(ms, base)}{spread}  "
                  f"final loss {losses[key]:.3f}  trainable {live[key][2] / 1e6:.1f}M", flush=True)
        report["batches"][str(batch)] = rows
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
    live.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
