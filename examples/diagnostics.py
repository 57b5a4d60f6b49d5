"""Diagnostics while training: a tiny PEFT LoRA model on generated data, ``opt.diagnostics()`` every few steps,
and a plot of κ(A), κ(B), ‖B‖/‖A‖ and the step's effective rank against the step.

    python examples/diagnostics.py [--steps 120] [--every 5] [--out runs/diagnostics]

Needs the extras ``ablate`` and ``hf`` (matplotlib, PEFT): ``pip install ".[ablate,hf]"`` in the checkout.

``opt.track_step()`` before a logged step keeps that step's factors for ``opt.diagnostics()`` (nothing is kept on
the other steps).  With transformers or Lightning, the callbacks of :mod:`sdsopt.integrations` do the same.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from sdsopt import SDSAdamW
from sdsopt.lab.extras import exit_if_missing

PANELS = (("kappa_A_max", "κ(A), largest over pairs"), ("kappa_B_max", "κ(B), largest over pairs"),
          ("norm_ratio_mean", "‖B‖/‖A‖, mean over pairs"), ("step_effective_rank_mean", "effective rank of ΔW, mean"))


def model_and_data(seed: int = 0):
    """A frozen random MLP with PEFT LoRA (r = 4) on its three layers, and a low-rank teacher's targets."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    teacher = nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 8))
    x = torch.randn(512, 32)
    with torch.no_grad():
        y = base(x) + teacher(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"]))
    return model, x, y


def plot(history: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        points = [(h["step"], h[key]) for h in history if key in h and h[key] != float("inf")]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set(xlabel="step", title=title)
        if key.startswith("kappa"):
            ax.set(yscale="log")
    fig.tight_layout()
    path = out / "diagnostics_vs_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    exit_if_missing(["peft", "matplotlib"], "examples/diagnostics.py")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/diagnostics")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, x, y = model_and_data()
    opt = SDSAdamW(model.named_parameters(), lr=args.lr, warmup_steps=10)
    history = []
    for step in range(1, args.steps + 1):
        if step % args.every == 0:
            opt.track_step()  # this step's factors are kept for diagnostics()
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            history.append({"step": step, "loss": loss.item(), **opt.diagnostics()["summary"]})
            h = history[-1]
            print(f"step {step:4d}  loss {h['loss']:.4f}  κ(A) {h['kappa_A_max']:.3g}  κ(B) {h['kappa_B_max']:.3g}  "
                  f"‖B‖/‖A‖ {h['norm_ratio_mean']:.3g}  eff. rank {h['step_effective_rank_mean']:.2f}  "
                  f"B share {h.get('step_share_B_mean', float('nan')):.2f}")
    (out / "diagnostics.json").write_text(json.dumps(history, indent=1))
    print("plot:", plot(history, out))
    return history


if __name__ == "__main__":
    main()
