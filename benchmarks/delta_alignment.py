"""How does each method's weight change line up with full fine-tuning's? (issue 32, item 3(d))

    python benchmarks/delta_alignment.py --task digits --seeds 3 \\
        --modes lora loraplus4 loraplus16 sds sds_gs loraplus4_gs --out benchmarks/ablation/delta_alignment/digits
    python benchmarks/delta_alignment.py --task minilm --rank 8 --steps 100 --every 20 --max-len 64 \\
        --modes lora loraplus4 sds --out benchmarks/ablation/delta_alignment/minilm

For each seed the lab (:func:`sdsopt.lab.runs.run_one`) trains full fine-tuning and then every listed mode from the
same base, LoRA initialisation and batches, under the users' recipe (``--schedule cosine`` after a linear warm-up
over ``--warmup-ratio`` 10 % of the steps: :func:`sdsopt.lab.runs.make_schedulers`), each at its own lr
(``--lr MODE=LR``; defaults :data:`LRS`).  Every ``--every`` steps and at the last it records, per LoRA layer, with
``ΔW_m = s·B·A`` (the method's change; the base stays frozen, also under the ``_gs`` start) and ``ΔW_f = W_t − W_0``
(full fine-tuning's change of the same weight at the same step), ``P_U``, ``P_V`` the projections on the top-r
left/right singular subspaces of ``ΔW_m`` and ``U_f``, ``V_f`` those of ``ΔW_f``:

* ``cos2_left``, ``cos2_right``: the mean squared cosine of the principal angles, ``‖U_mᵀ U_f‖_F² / r``;
* ``captured``: ``‖P_U ΔW_f P_V‖_F² / ‖ΔW_f‖_F²``, the share of full fine-tuning's change inside the method's
  subspaces, and ``captured_best``: full fine-tuning's own top-r share (the most any rank-r pair can capture);
* ``cosine``: ``⟨ΔW_m, ΔW_f⟩ / (‖ΔW_m‖‖ΔW_f‖)``; ``norm_ratio``: ``‖ΔW_m‖_F / ‖ΔW_f‖_F``;
* ``norm_B``, ``norm_A``: ``‖B‖_F``, ``‖A‖_F``; ``stable_rank``: ``‖ΔW_m‖_F² / ‖ΔW_m‖_2²``.

Each is averaged over the LoRA layers (full fine-tuning's rows: ``delta_norm``, ``stable_rank``,
``captured_best``).  Layers pair by name: a LoRA module ``x.y`` (PEFT's ``base_model.model.`` prefix dropped) owns
the full model's weight ``x.y.weight``; its frozen base weight must equal it at the start (checked).  Writes
``<out>.json`` (every run's records, the mean ± sd over seeds per mode and step) and ``<out>.png`` (captured
fraction, subspace cosine² and ‖B‖ against the step), and prints the table at the last step and a mid-run step.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdsopt.lab.optimizers import is_mode
from sdsopt.lab.runs import RunConfig, run_one
from sdsopt.lab.tasks import TaskConfig, make_task

# Each mode's lr.  digits: the best of lr ∈ {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} under warm-up 10 % + cosine, 300 steps,
# seed 0 (2026-12-06, `python -m sdsopt.lab --task digits --schedule cosine --warmup-ratio 0.1 ...`; a schedule's
# mean lr is lower, so these are above RESULTS.md §4–5's constant-lr best); textlm, minilm: RESULTS.md §1, §4–5
# (constant lr).  A mode not listed falls back on its base mode (``_gs`` dropped; LoRA+ λ16's lr; sds's).
LRS: dict[str, dict[str, float]] = {
    "digits": {"full": 1e-2, "lora": 3e-2, "sds": 3e-2, "loraplus4": 1e-2, "loraplus16": 1e-2, "sds_gs": 3e-2,
               "loraplus4_gs": 3e-2},
    "textlm": {"full": 1e-3, "lora": 1e-2, "sds": 1e-2, "loraplus4": 3e-3, "loraplus16": 1e-3},
    "minilm": {"full": 3e-5, "lora": 3e-4, "sds": 3e-4, "loraplus4": 3e-4, "loraplus16": 1e-4},
}
PLOTTED = (("captured", "captured fraction of ΔW_full"), ("cos2", "subspace cos² (mean of left, right)"),
           ("norm_B", "‖B‖_F"))


@dataclass(frozen=True)
class Layer:
    """One LoRA layer: its module in the LoRA model, the full model's weight it adapts, its scale ``s``, whether
    the weight is stored transposed (PEFT's ``fan_in_fan_out``, GPT-2's Conv1D) and its start ``W0`` (out×in)."""

    module: str
    weight: str
    scale: float
    transposed: bool
    w0: Tensor


def scale_of(module: nn.Module) -> float:
    """The LoRA scale ``s``: PEFT's ``scaling["default"]`` or :class:`~sdsopt.lab.tasks.lora.LoraLinear`'s float."""
    s = module.scaling
    return float(s["default"] if isinstance(s, dict) else s)


def lora_delta(module: nn.Module, scale: float) -> Tensor:
    """``s·B·A`` of one LoRA module (out×in, float64)."""
    B, A = module.lora_B["default"].weight, module.lora_A["default"].weight
    return scale * B.detach().double() @ A.detach().double()


def weight_of(model: nn.Module, layer: Layer) -> Tensor:
    """The full model's weight of ``layer`` (out×in, float64)."""
    W = model.get_parameter(layer.weight).detach().double()
    return W.T if layer.transposed else W


def match_layers(lora_model: nn.Module, full_model: nn.Module) -> list[Layer]:
    """Every LoRA module of ``lora_model`` with the weight of ``full_model`` it adapts (by name); ``ValueError`` if
    a weight is missing or differs from the LoRA module's frozen base weight."""
    layers = []
    for name, module in lora_model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            continue
        base = module.base_layer if hasattr(module, "base_layer") else module.base
        transposed = bool(getattr(module, "fan_in_fan_out", False))
        w0 = base.weight.detach().double()
        layer = Layer(name, name.removeprefix("base_model.model.") + ".weight", scale_of(module), transposed,
                      w0.T if transposed else w0)
        try:
            same = torch.equal(weight_of(full_model, layer), layer.w0)
        except AttributeError:
            same = False
        if not same:
            raise ValueError(f"LoRA module {name!r}: no equal full-model weight {layer.weight!r}")
        layers.append(layer)
    if not layers:
        raise ValueError("the LoRA model has no module with lora_A and lora_B")
    return layers


def top(M: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """``M``'s singular values and its top-r left and right singular vectors (as columns)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return S, U[:, :r], Vh[:r].T


def alignment(dm: Tensor, df: Tensor, r: int) -> dict[str, float]:
    """The module docstring's measures of one layer: the method's change ``dm`` against full fine-tuning's ``df``
    in their top-``r`` singular subspaces (``r`` capped by the shape)."""
    r = min(r, *dm.shape)
    if not (dm.any() and df.any()):
        raise ValueError("alignment: a zero ΔW (record after the first step with a non-zero lr)")
    Sm, Um, Vm = top(dm, r)
    Sf, Uf, Vf = top(df, r)
    nf2, nm = float(df.square().sum()), float(dm.norm())
    return {"cos2_left": float((Um.T @ Uf).square().sum()) / r, "cos2_right": float((Vm.T @ Vf).square().sum()) / r,
            "captured": float((Um.T @ df @ Vm).square().sum()) / nf2,
            "captured_best": float(Sf[:r].square().sum() / Sf.square().sum()),
            "cosine": float((dm * df).sum()) / (nm * nf2 ** 0.5), "norm_ratio": nm / nf2 ** 0.5,
            "stable_rank": float(Sm.square().sum() / Sm[0].square())}


@dataclass(frozen=True)
class Snapshot:
    """Full fine-tuning's change ``ΔW_f`` of one layer at one step and its top-r left/right singular vectors."""

    delta: Tensor
    U: Tensor
    V: Tensor


def lowrank_alignment(B: Tensor, A: Tensor, scale: float, full: Snapshot) -> dict[str, float]:
    """:func:`alignment` of ``ΔW_m = s·B·A`` against ``full`` without an SVD of an m×n matrix: ``ΔW_m``'s top-r
    subspaces are the column spaces of ``B`` and ``Aᵀ`` (rank r, ``Q_B``, ``Q_A`` by QR) and its singular values
    those of the r×r core ``s·R_B·R_Aᵀ`` (tested equal to :func:`alignment`)."""
    B, A, df = B.double(), A.double(), full.delta.double()
    if not (B.any() and A.any() and df.any()):
        raise ValueError("alignment: a zero ΔW (record after the first step with a non-zero lr)")
    (QB, RB), (QA, RA) = torch.linalg.qr(B), torch.linalg.qr(A.T)
    Sm = torch.linalg.svdvals(scale * RB @ RA.T)
    nf2, nm = float(df.square().sum()), float(Sm.norm())
    Uf, Vf = full.U.double(), full.V.double()
    return {"cos2_left": float((QB.T @ Uf).square().sum()) / Uf.shape[1],
            "cos2_right": float((QA.T @ Vf).square().sum()) / Vf.shape[1],
            "captured": float((QB.T @ df @ QA).square().sum()) / nf2,
            "cosine": scale * float((B * (df @ A.T)).sum()) / (nm * nf2 ** 0.5), "norm_ratio": nm / nf2 ** 0.5,
            "stable_rank": float(Sm.square().sum() / Sm[0].square()), "delta_norm": nm}


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}


def recording(steps: int, every: int) -> set[int]:
    """The steps recorded: every ``every``-th and the last (not step 1: the warm-up's first lr is 0, ΔW = 0)."""
    return {steps, *range(every, steps + 1, every)}


Hook = Callable[[int, nn.Module, Any], None]


def full_hook(layers: list[Layer], steps: set[int], snapshots: dict[int, dict[str, Snapshot]], rank: int,
              records: list[dict[str, float]]) -> Hook:
    """``run_one``'s ``on_step`` for full fine-tuning: keeps ``ΔW_f`` of every layer at the recorded steps, with
    its top-``rank`` singular vectors (one SVD per layer and step, shared by every mode)."""
    def on_step(step: int, model: nn.Module, opt: Any) -> None:
        if step not in steps:
            return
        snapshots[step], rows = {}, []
        for layer in layers:
            d = weight_of(model, layer) - layer.w0
            S, U, V = top(d, min(rank, *d.shape))
            snapshots[step][layer.weight] = Snapshot(d.float(), U.float(), V.float())
            rows.append({"delta_norm": float(d.norm()), "stable_rank": float(S.square().sum() / S[0].square()),
                         "captured_best": float(S[:rank].square().sum() / S.square().sum())})
        records.append({"step": step, **mean_rows(rows)})
    return on_step


def lora_hook(layers: list[Layer], steps: set[int], snapshots: dict[int, dict[str, Snapshot]],
              records: list[dict[str, float]]) -> Hook:
    """``run_one``'s ``on_step`` for a LoRA mode: :func:`lowrank_alignment` of ``s·B·A`` against the snapshot of
    ``ΔW_f``."""
    def on_step(step: int, model: nn.Module, opt: Any) -> None:
        if step not in steps:
            return
        rows = []
        for layer in layers:
            module = model.get_submodule(layer.module)
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            row = lowrank_alignment(B.detach(), A.detach(), layer.scale, snapshots[step][layer.weight])
            rows.append({**row, "norm_B": float(B.detach().norm()), "norm_A": float(A.detach().norm())})
        mean = mean_rows(rows)
        records.append({"step": step, **mean, "cos2": (mean["cos2_left"] + mean["cos2_right"]) / 2})
    return on_step


def run_seed(task: Any, seed: int, lrs: dict[str, float], config: RunConfig, every: int,
             rank: int) -> list[dict[str, Any]]:
    """Full fine-tuning, then every mode of ``lrs`` but ``full``, from ``seed``'s base and batches."""
    task.setup(seed)
    layers = match_layers(task.lora_model(seed), task.full_model(seed))
    steps, snapshots = recording(config.steps, every), {}
    runs = []
    for mode, lr in lrs.items():
        records: list[dict[str, float]] = []
        hook = (full_hook(layers, steps, snapshots, rank, records) if mode == "full"
                else lora_hook(layers, steps, snapshots, records))
        out = run_one(task, mode, lr, seed, config, on_step=hook)
        runs.append({k: out[k] for k in ("mode", "lr", "seed", "final_train", "eval", "accuracy") if k in out}
                    | {"layers": len(layers), "records": records})
        print(f"seed {seed} {mode} lr {lr:g}: held-out {out['eval']:.4f}", flush=True)
    return runs


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: its lr, the held-out loss (mean, sd over seeds) and per recorded step the mean and sd of every
    record (``{"step": s, key: {"mean": …, "sd": …}}``)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        steps = []
        for i, first in enumerate(mine[0]["records"]):
            recs = [r["records"][i] for r in mine]
            steps.append({"step": first["step"], **{k: mean_sd([x[k] for x in recs]) for k in first if k != "step"}})
        out[mode] = {"lr": mine[0]["lr"], "seeds": len(mine), "eval": mean_sd([r["eval"] for r in mine]),
                     "steps": steps}
    return out


COLUMNS = (("captured", "captured"), ("captured_best", "best"), ("cos2_left", "cos² left"),
           ("cos2_right", "cos² right"), ("cosine", "cos(ΔW)"), ("norm_ratio", "‖ΔW‖ ratio"), ("norm_B", "‖B‖"),
           ("norm_A", "‖A‖"), ("stable_rank", "stable rank"))


def table(summary: dict[str, dict[str, Any]], step: int) -> str:
    """A markdown table of every mode at recorded ``step`` (mean ± sd over seeds; full fine-tuning: its own
    ``‖ΔW_f‖``, top-r share and stable rank)."""
    cell = lambda v: f"{v['mean']:.3g}" + (f" ± {v['sd']:.2g}" if v["sd"] else "")  # noqa: E731
    lines = ["| mode (lr) | held-out | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for mode, s in summary.items():
        row = next(r for r in s["steps"] if r["step"] == step)
        values = [cell(row[k]) if k in row else "–" for k, _ in COLUMNS]
        if mode == "full":
            values[0] = "‖ΔW_f‖ " + cell(row["delta_norm"])
        lines.append(f"| {mode} ({s['lr']:g}) | {cell(s['eval'])} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Captured fraction, subspace cos² and ‖B‖_F against the step, one line per mode (mean over seeds); the
    captured panel also shows full fine-tuning's own top-r share (dashed, the most any rank-r pair captures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
    for ax, (key, label) in zip(axes, PLOTTED):
        for mode, s in summary.items():
            if mode == "full":
                if key == "captured":
                    ax.plot([r["step"] for r in s["steps"]], [r["captured_best"]["mean"] for r in s["steps"]],
                            "k--", label="full FT's top-r share")
                continue
            ax.plot([r["step"] for r in s["steps"]], [r[key]["mean"] for r in s["steps"]],
                    label=f"{mode} ({s['lr']:g})")
        ax.set(xlabel="step", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_lr(text: str) -> tuple[str, float]:
    mode, _, lr = text.partition("=")
    if not lr or not (mode == "full" or is_mode(mode)):
        raise argparse.ArgumentTypeError(f"--lr {text!r}: write MODE=LR with a lab mode, e.g. --lr sds=1e-2")
    return mode, float(lr)


def default_lr(task: str, mode: str) -> float:
    """:data:`LRS`'s lr of ``mode`` on ``task``, else of its base mode (``_gs`` dropped, LoRA+ λ16's)."""
    table_ = LRS.get(task, {})
    base = mode.removesuffix("_gs")
    for key in (mode, base, "loraplus16" if base.startswith("loraplus") else "sds" if base.startswith("sds") else base):
        if key in table_:
            return table_[key]
    raise SystemExit(f"no default lr for {mode} on {task}: pass --lr {mode}=LR")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(LRS), default="digits")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["lora", "loraplus4", "loraplus16", "sds", "sds_gs", "loraplus4_gs"],
                    help="LoRA modes of the lab (full fine-tuning always runs first: the reference)")
    ap.add_argument("--lr", type=parse_lr, action="append", default=[], metavar="MODE=LR",
                    help="a mode's lr, repeatable (default: LRS in this script)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=10, help="record every this many steps and at the last")
    ap.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="cosine")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--pretrain-steps", type=int, default=300, help="digits/textlm: the base's pre-training")
    ap.add_argument("--max-len", type=int, default=None, help="minilm: tokens per paragraph (default 128)")
    ap.add_argument("--model-dir", default=None, help="minilm: the checkpoint folder (default: the package's)")
    ap.add_argument("--out", type=Path, default=Path("delta_alignment"), help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    given = dict(args.lr)
    lrs = {m: given.get(m) or default_lr(args.task, m) for m in ["full", *(m for m in args.modes if m != "full")]}
    config = RunConfig(steps=args.steps, schedule=args.schedule, warmup_ratio=args.warmup_ratio, metrics_every=0)
    task = make_task(TaskConfig(name=args.task, rank=args.rank, pretrain_steps=args.pretrain_steps,
                                max_len=args.max_len, model_dir=args.model_dir))
    runs = [run for seed in range(args.first_seed, args.first_seed + args.seeds)
            for run in run_seed(task, seed, lrs, config, args.every, args.rank)]
    summary = summarise(runs)
    steps = sorted(recording(args.steps, args.every))
    mid = min(steps, key=lambda s: abs(s - args.steps / 2))
    result = {"task": args.task, "rank": args.rank, "steps": args.steps, "every": args.every,
              "schedule": args.schedule, "warmup_ratio": args.warmup_ratio, "seeds": args.seeds,
              "first_seed": args.first_seed, "lrs": lrs, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(summary, args.out.with_suffix(".png"), f"{args.task}, r {args.rank}, {args.seeds} seed(s), {args.schedule} "
         f"+ warm-up {args.warmup_ratio:g}")
    for step in (mid, args.steps):
        print(f"\nstep {step} of {args.steps}:\n{table(summary, step)}")
    return result


if __name__ == "__main__":
    main()
