"""PSILoRA's step time and memory against torch.optim.AdamW (fused) and SDSAdamW (sds), same run, same model.

    python benchmarks/psi_step.py                                   # GPU: LLaMA-7B LoRA shapes, 1024 tokens
    python benchmarks/psi_step.py --shape small --tokens 64         # CPU smoke run
    python benchmarks/psi_step.py --ranks 16 64 --dtypes fp32 bf16 --out results.json

The model is the 224 LoRA pairs of LLaMA-7B (``step_time.py``'s shapes) without the frozen weights: each layer's
q/k/v read one hidden state, gate/up another, o and down their own inputs, as in the real network, so the rows
PSILoRA records are shared where the model's are.  Every timed step is preceded by an untimed forward and backward
of ``--tokens`` rows (PSILoRA needs a fresh recording per step); the median of ``--steps`` steps after
``--warmup`` is reported (CUDA events on GPU), with the ratio to fused AdamW (foreach on CPU), the peak memory
allocated during a timed step above what was allocated before it (the warm-up steps allocate the state), the
memory the recording keeps alive after backward (``rows``: inputs and output gradients the hooks hold, which
plain training frees), and the state.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from step_time import DTYPES, SHAPES

from sdsopt import PSILoRA, SDSAdamW


class Pair(nn.Module):
    """A PEFT-named LoRA branch ``B(A(x))`` without its frozen base weight."""

    def __init__(self, n: int, m: int, r: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, r, bias=False, dtype=dtype)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, m, bias=False, dtype=dtype)})
        nn.init.normal_(self.lora_B["default"].weight, std=r**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B["default"](self.lora_A["default"](x))


class LoraStack(nn.Module):
    """LLaMA's seven LoRA targets per layer; ``inputs[layer]`` = (attention in, o in, mlp in, down in)."""

    MODULES = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}

    def __init__(self, shape: str, r: int, dtype: torch.dtype) -> None:
        super().__init__()
        s = SHAPES[shape]
        w, f = s["width"], s["ffn"]
        dims = {"q_proj": (w, w), "k_proj": (w, w), "v_proj": (w, w), "o_proj": (w, w),
                "gate_proj": (w, f), "up_proj": (w, f), "down_proj": (f, w)}
        self.layers = nn.ModuleList(nn.ModuleDict({k: Pair(*dims[k], r, dtype) for k in self.MODULES})
                                    for _ in range(s["layers"]))
        self.widths = (w, w, w, f)

    def inputs(self, tokens: int, device: torch.device, dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
        gen = torch.Generator(device=device).manual_seed(seed)
        return [[torch.randn(tokens, d, generator=gen, device=device, dtype=dtype) for d in self.widths]
                for _ in self.layers]

    def loss(self, inputs: list[list[torch.Tensor]]) -> torch.Tensor:
        total = 0.0
        for layer, xs in zip(self.layers, inputs):
            for name, pair in layer.items():
                total = total + pair(xs[self.MODULES[name]]).float().square().mean()
        return total


def variants() -> dict:
    return {
        "AdamW fused": lambda model, dev: torch.optim.AdamW(
            model.parameters(), lr=1e-4, **({"fused": True} if dev.type == "cuda" else {"foreach": True})),
        "SDSAdamW sds": lambda model, dev: SDSAdamW(model.named_parameters(), lr=1e-4, warmup_steps=0,
                                                    fused=dev.type == "cuda"),
        "PSILoRA K=0 (Jacobi)": lambda model, dev: PSILoRA(model, lr=1e-2, lookahead_iters=0),
        "PSILoRA K=1": lambda model, dev: PSILoRA(model, lr=1e-2, lookahead_iters=1),
        "PSILoRA K=1 + momentum": lambda model, dev: PSILoRA(model, lr=1e-2, lookahead_iters=1, momentum=0.9,
                                                             dampening=0.9),
        "PSILoRA diagonal metric": lambda model, dev: PSILoRA(model, lr=1e-5, lookahead_iters=1, metric="diagonal"),
        "PSILoRA K=1 + clip": lambda model, dev: PSILoRA(model, lr=1e-2, lookahead_iters=1, max_grad_norm=1.0),
    }


@dataclass
class Row:
    variant: str
    rank: int
    dtype: str
    tokens: int
    median_ms: float
    ratio_to_fused: float
    peak_extra_mb: float
    rows_mb: float
    state_mb: float


def allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def measure(model: LoraStack, opt, device, dtype, tokens: int, steps: int, warmup: int) -> tuple[float, float, float]:
    """Median step ms, peak MB allocated during the step above its start, MB still held after backward
    beyond a plain backward's (the recording)."""
    times, peak, held = [], 0.0, 0.0
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        xs = model.inputs(tokens, device, dtype, seed=i)
        base = allocated(device)
        model.loss(xs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            held = allocated(device) - base
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before = allocated(device)
            start.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
            if i >= warmup:  # after the first steps, which allocate the optimizer state
                peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**20 - before)
        else:
            t0 = time.perf_counter()
            opt.step()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
        del xs
    return statistics.median(times), peak, held


def state_mb(opt) -> float:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t)) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=SHAPES, default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    ap.add_argument("--tokens", type=int, default=None, help="rows per step (default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=None, help="subset of the variant labels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("llama7b" if device.type == "cuda" else "small")
    tokens = args.tokens or (1024 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name} | torch {torch.__version__} | shapes {shape} {SHAPES[shape]} | {tokens} tokens | "
          f"median of {args.steps} steps after {args.warmup}", flush=True)
    chosen = {k: v for k, v in variants().items() if args.variants is None or k in args.variants}
    rows: list[Row] = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for r in args.ranks:
            results = {}
            plain_held = None
            for label, make in chosen.items():
                torch.manual_seed(0)
                model = LoraStack(shape, r, dtype).to(device)
                opt = make(model, device)
                ms, peak, held = measure(model, opt, device, dtype, tokens, args.steps, args.warmup)
                if plain_held is None:
                    plain_held = held  # the first variant (AdamW) holds only the factors' gradients
                results[label] = (ms, peak, held - plain_held, state_mb(opt))
                if isinstance(opt, PSILoRA):
                    opt.remove_hooks()
                del opt, model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ref = next(iter(results.values()))[0]
            for label, (ms, peak, held, smb) in results.items():
                rows.append(Row(label, r, dname, tokens, ms, ms / ref, peak, held, smb))
                print(f"  r={r:<3} {dname} {label:<26} {ms:9.2f} ms {ms / ref:7.2f}x  peak+{peak:8.1f} MB  "
                      f"rows {held:8.1f} MB  state {smb:8.1f} MB", flush=True)
    print("\n| variant | dtype | r | step | × fused AdamW | peak extra in step | rows held | state |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.variant} | {row.dtype} | {row.rank} | {row.median_ms:.1f} ms | {row.ratio_to_fused:.1f}× | "
              f"{row.peak_extra_mb:.0f} MB | {row.rows_mb:.0f} MB | {row.state_mb:.0f} MB |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "shape": shape, "tokens": tokens,
                       "argv": sys.argv[1:], "rows": [asdict(r) for r in rows]}, fh, indent=1)


if __name__ == "__main__":
    main()
