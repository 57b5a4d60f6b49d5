"""A/B harness: every comparison mode on identical data and initialisation, with the paper's metrics.

    python -m sdsopt.lab --task linear                    # or: sdsopt-ablate --task linear
    python -m sdsopt.lab --task digits --seeds 3
    python -m sdsopt.lab --task textlm --steps 400 --device cuda
    python -m sdsopt.lab --task smollm_math --rank 8 --device cuda --autocast bf16   # pip install "sdsopt[smollm]"

``python -m sdsopt.ablate`` is the same command.  The modes are :mod:`sdsopt.lab.optimizers`' (``--modes``; PSI's
options ``--psi-*``, LoRA+'s ``--loraplus-ratio``, SDSAdamW's ``--opt KEY=VALUE``), the tasks
:mod:`sdsopt.lab.tasks`'.  Writes to ``--out`` the files of :mod:`sdsopt.lab.report` (curves, metrics every
``--metrics-every`` steps, summary, plots) and prints the summary table last.
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path
from typing import Any

from .optimizers import ABLATION_MODES, DEFAULT_MODES, is_mode
from .report import format_table, summarise, write_outputs
from .runs import AUTOCAST, SCHEDULES, RunConfig, run_grid
from .tasks import DEFAULT_LRS, DEFAULT_STEPS, TASKS, TaskConfig, make_task

__all__ = ["console", "main", "mode_name", "parse_option", "parser"]


def mode_name(text: str) -> str:
    """A ``--modes`` entry: one of :data:`~sdsopt.lab.optimizers.ABLATION_MODES`, ``loraplus<λ>`` (e.g.
    ``loraplus8``) or ``sdsplus<λ>`` (``sds`` with ``b_lr_ratio=λ``)."""
    if is_mode(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown mode {text!r}; choose from {', '.join(ABLATION_MODES)}, "
                                     "loraplus<λ> (e.g. loraplus8) or sdsplus<λ> (sds with b_lr_ratio=λ)")


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--opt``: the value read as a Python literal (``10``, ``0.5``, ``False``), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--opt {text!r}: write KEY=VALUE, e.g. --opt warmup_steps=50")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_run_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--task", choices=TASKS, default="linear")
    ap.add_argument("--modes", nargs="+", type=mode_name, default=list(DEFAULT_MODES), metavar="MODE",
                    help=f"from {', '.join(ABLATION_MODES)}, or loraplus<λ> (default: {' '.join(DEFAULT_MODES)})")
    ap.add_argument("--loraplus-ratio", type=float, default=16.0, help="λ = lr_B / lr_A of mode loraplus")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="≥ 4 per mode recommended")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed … first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--schedule", choices=tuple(SCHEDULES), default="constant",
                    help="lr schedule after the warm-up (transformers.get_scheduler): constant, linear or cosine to 0")
    ap.add_argument("--warmup-ratio", type=float, default=0.0, help="linear lr warm-up over this share of --steps")
    ap.add_argument("--beta1", type=float, default=0.9, help="0 gives Adam without momentum")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--metrics-every", type=int, default=10, help="0 turns metrics off (no capture, no cost)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=tuple(AUTOCAST), default="none",
                    help="mixed precision of the forward and backward (parameters and optimizer stay float32)")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                    help="skip the held-out accuracy (the LLM tasks' greedy generation); the held-out loss stays")
    ap.add_argument("--opt", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                    help="an SDSAdamW option for every SDS mode (repeatable): e.g. --opt warmup_steps=50")
    ap.add_argument("--out", default=None, help="output folder (default runs/<task>)")
    ap.add_argument("--quiet", action="store_true")


def _add_task_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("task sizes")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--m", type=int, default=64)
    g.add_argument("--n", type=int, default=64)
    g.add_argument("--target-rank", type=int, default=4)
    g.add_argument("--kappa", type=float, default=100.0)
    g.add_argument("--noise", type=float, default=0.0)
    g.add_argument("--batch", type=int, default=0, help="linear: 0 = full batch")
    g.add_argument("--pretrain-steps", type=int, default=300)
    g.add_argument("--width", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--block", type=int, default=64)
    g.add_argument("--max-len", type=int, default=None,
                   help="minilm: tokens per paragraph (128); smollm: longest example kept (320)")
    g.add_argument("--lora-alpha", type=float, default=None, help="smollm: LoRA alpha (default 2*rank)")
    g.add_argument("--rslora", action="store_true", help="smollm: scale alpha/sqrt(rank) (the SDS paper's protocol)")
    g.add_argument("--eval-examples", type=int, default=64, help="smollm: held-out examples scored")
    g.add_argument("--difficulty", type=int, default=0, help="smollm_math: extra chained operations per problem")
    g.add_argument("--gguf-file", default=None, help="smollm: GGUF file name inside --model-dir")
    g.add_argument("--model-dir", default=None,
                   help="minilm/smollm: checkpoint folder (default: the sdsopt[minilm] / sdsopt[smollm] package)")


def _add_psi_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("psi (sdsopt.PSILoRA)")
    g.add_argument("--psi-iters", type=int, default=1, help="ALS sweeps per step (0: one Jacobi pass)")
    g.add_argument("--psi-momentum", type=float, default=0.0)
    g.add_argument("--psi-dampening", type=float, default=0.0, help="= --psi-momentum: the EMA form of the authors")
    g.add_argument("--psi-lmbd", type=float, default=1e-2, help="proximal weight λ = lr·lmbd")
    g.add_argument("--psi-adam-lr", type=float, default=None,
                   help="AdamW lr of the parameters that are not LoRA factors (a head; default: --lrs' value)")


def parser() -> argparse.ArgumentParser:
    """The command line of the harness."""
    ap = argparse.ArgumentParser(prog="python -m sdsopt.lab", description=__doc__.splitlines()[0])
    _add_run_options(ap)
    _add_task_options(ap)
    _add_psi_options(ap)
    return ap


def _configs(args: argparse.Namespace) -> tuple[TaskConfig, RunConfig]:
    task = TaskConfig(name=args.task, rank=args.rank, m=args.m, n=args.n, target_rank=args.target_rank,
                      kappa=args.kappa, noise=args.noise, batch=args.batch, pretrain_steps=args.pretrain_steps,
                      width=args.width, layers=args.layers, block=args.block, max_len=args.max_len,
                      lora_alpha=args.lora_alpha, rslora=args.rslora, eval_examples=args.eval_examples,
                      difficulty=args.difficulty, gguf_file=args.gguf_file, model_dir=args.model_dir)
    run = RunConfig(steps=args.steps or DEFAULT_STEPS[args.task], schedule=args.schedule,
                    warmup_ratio=args.warmup_ratio, beta1=args.beta1, weight_decay=args.weight_decay,
                    metrics_every=args.metrics_every, device=args.device, autocast=args.autocast, opt=dict(args.opt),
                    accuracy=args.accuracy,
                    loraplus_ratio=args.loraplus_ratio, psi_iters=args.psi_iters, psi_momentum=args.psi_momentum,
                    psi_dampening=args.psi_dampening, psi_lmbd=args.psi_lmbd, psi_adam_lr=args.psi_adam_lr)
    return task, run


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the grid that ``argv`` (default ``sys.argv[1:]``) asks for, write its files, print the summary table
    and return it (:func:`sdsopt.lab.report.summarise`)."""
    args = parser().parse_args(argv)
    task_config, config = _configs(args)
    lrs = args.lrs or DEFAULT_LRS[args.task]
    out = Path(args.out or f"runs/{args.task}")
    task = make_task(task_config, config.device)
    t0 = time.time()
    runs = run_grid(task, args.modes, lrs, args.seeds, config, first_seed=args.first_seed, quiet=args.quiet)
    table = summarise(runs)
    write_outputs(args.task, runs, table, out)
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f}s; curves, metrics, plots in {out}/")
    print(format_table(args.task, table))
    return table


def console() -> int:
    """The ``sdsopt-ablate`` console script: :func:`main` on ``sys.argv``, exit status 0 (``main`` returns the
    table, which ``sys.exit`` would print and turn into status 1)."""
    main()
    return 0
