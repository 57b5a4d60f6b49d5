"""The SmolLM2 comparison (issue: SDS on a real LLM): many harness runs in parallel processes on one GPU, then
one table per (task, scale) with seed spread, lr sensitivity and steps to reach LoRA's final loss.

    python benchmarks/llm_sweep.py run --deadline 540 --out runs/llm -- --device cuda --autocast bf16
    python benchmarks/llm_sweep.py merge runs/llm --out benchmarks/ablation/smollm

The users' recipe (warm-up 10 % + cosine, batch 16, 300 steps, 3 paired seeds, grids extended at their edges)
with its grids is ``benchmarks/smollm_sweep.sh TASK MODEL_DIR`` (one device call per task; the same command again
resumes: jobs done are skipped).

``run`` plans one ``python -m sdsopt.lab`` per job (a task, a scale, a mode, a seed, an lr) and hands them to the
lab's process pool (``sdsopt.lab.workers``, what ``python -m sdsopt.lab --workers N`` runs on): ``--workers`` at a
time, highest priority first, none started after ``--deadline`` seconds (a job that is running finishes); a job
that died of CUDA out-of-memory is retried with fewer at once.  ``--workers auto`` (the default) sizes the pool
from the GPU's free memory before each wave (:func:`auto_workers`): free memory over one run's footprint, the
largest peak the jobs' logs in ``--out`` report (a resumed sweep: measured) or else :data:`PEAK_GB`'s estimate,
and at most one job per CPU core but one.  Arguments after ``--`` go to every job.  ``merge`` reads the jobs'
``summary.json`` and ``curves.csv`` and writes ``tables.md``, ``summary.json``, ``runs.json`` (every run's final
numbers) and the plots per (task, scale).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdsopt.lab.report import plot, summarise  # noqa: E402
from sdsopt.lab.workers import Job, read_peak, run_jobs  # noqa: E402

LORA_LRS = ["1e-4", "2e-4", "5e-4", "1e-3", "3e-3", "6e-3"]
FULL_LRS = ["1e-6", "3e-6", "1e-5", "3e-5", "1e-4", "3e-4"]
# the peers' grids (sdsopt.lab.peers; RESULTS.md §5): LoRA+ steps B at λ·lr, so its grids sit lower; on the code task,
# whose best lrs are lower, every peer's grid is shifted down (lora and sds keep LORA_LRS there: §2's runs)
PEER_LRS = {("math", "loraplus"): ["2e-5", "5e-5", "1e-4", "2e-4", "5e-4", "1e-3"],
            ("math", "loraplus4"): ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "3e-3"],
            ("code", "loraplus"): ["1e-5", "2e-5", "5e-5", "1e-4", "2e-4", "5e-4"],
            ("code", "loraplus4"): ["2e-5", "5e-5", "1e-4", "2e-4", "5e-4", "1e-3"],
            ("code", "lorapro"): ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "3e-3"],
            ("code", "rite"): ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "3e-3"],
            ("code", "peft_riemannian"): ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "3e-3"]}
SCALES = {"peft_r8": ["--rank", "8", "--lora-alpha", "16"],  # PEFT's common s = alpha/r = 2, a small rank
          "paper_r32": ["--rank", "32", "--lora-alpha", "4", "--rslora"],  # the SDS paper's protocol
          "peft_r2": ["--rank", "2", "--lora-alpha", "4"]}  # s = 2 at a rank where LoRA trails full fine-tuning?
TASKS = {"math": ["--task", "smollm_math", "--difficulty", "2", "--eval-examples", "256"],  # (seed noise < gaps)
         "code": ["--task", "smollm_code", "--eval-examples", "96", "--max-len", "256"]}


# One run's CUDA footprint in GB (its allocator's peak plus the process's CUDA context) before any was measured: an
# ESTIMATE for SmolLM2-135M, LoRA r 8 on all seven projections, batch 16 under bf16 autocast, at a batch of the
# longest examples (math ~220 tokens, code 256).  Its parts: float32 weights 0.54 GB; what autograd keeps for the
# backward, counted on the CPU with saved-tensor hooks (2 such rows: 0.61 GiB math, 0.67 GiB code, of which ~0.25
# GiB the weights' bf16 copies: ~2.9 / 3.4 GiB at 16 rows); the logits over the 49 152-token vocabulary at the loss
# (bf16, their float32 copy, log-softmax and its gradient: ~2.4 / 2.8 GB); ~0.6 GB of context.  Sum ~6.7 / 7.6 GB.
# A user's H100 (80 GB) ran out of memory at 14 math runs at once.
PEAK_GB = {"math": 7.0, "code": 8.0}
CONTEXT_GB = 0.6  # a process's CUDA context: outside the allocator's peak that the logs report


def plan(steps: int, seeds: int, tasks: list[str], scales: list[str], modes: list[str],
         metrics_lr: str | None, lrs: list[str] | None = None,
         full_lrs: list[str] | None = None, grids: dict[str, list[str]] | None = None,
         first_seed: int = 0) -> list[tuple[str, list[str]]]:
    """One job per run (task, scale, mode, seed, lr), ordered seed-major so that an interrupted sweep still has
    whole lr grids; after the first seed, if ``metrics_lr``, lora and sds at that lr with the mechanism metrics
    every 10 steps.  ``lrs`` replaces the LoRA-mode grid (peers without ``lrs`` take :data:`PEER_LRS`),
    ``full_lrs`` full fine-tuning's (default :data:`FULL_LRS`), ``grids`` any mode's (``--grid MODE=LR,LR``, first
    choice); seeds run from ``first_seed``."""
    jobs = []

    def add(task: str, scale: str, mode: str, seed: int, lr: str, metrics_every: int = 0) -> None:
        name = f"{task}-{scale}-{mode}-s{seed}-lr{lr}" + ("-metrics" if metrics_every else "")
        jobs.append((name, [*TASKS[task], *SCALES[scale], "--modes", mode, "--lrs", lr, "--seeds", "1",
                            "--first-seed", str(seed), "--steps", str(steps), "--metrics-every", str(metrics_every)]))

    for seed in range(first_seed, first_seed + seeds):
        for scale in scales:
            for task in tasks:
                for mode in modes:
                    grid = ((grids or {}).get(mode) or ((full_lrs or FULL_LRS) if mode == "full" else
                                                        (lrs or PEER_LRS.get((task, mode), LORA_LRS))))
                    for lr in grid:
                        add(task, scale, mode, seed, lr)
        if metrics_lr and seed == first_seed:
            for mode in ("lora", "sds"):
                add(tasks[0], scales[0], mode, seed, metrics_lr, metrics_every=10)
    return jobs


def run(jobs: list[tuple[str, list[str]]], out: Path, workers: int, deadline: float,
        passthrough: list[str], budget: float = 0.0, start: float | None = None,
        longest: list[float] | None = None) -> None:
    """Run ``jobs`` (name, harness arguments) in the lab's process pool (:func:`sdsopt.lab.workers.run_jobs`:
    ``workers`` at a time, none after ``deadline`` s, nor, with ``budget``, one that would end after ``budget``
    s), each into ``out / name`` (a name may hold a sub-folder, e.g. one per variant), skipping those done."""
    pool = [Job(name, (*argv, "--out", str(out / name), "--quiet", *passthrough), out / f"{name}.log")
            for name, argv in jobs]
    run_jobs(pool, workers, deadline=deadline, budget=budget, start=start, longest=longest,
             done=lambda job: (out / job.name / "summary.json").exists(), report=lambda line: print(line, flush=True))


def gpu_free_bytes() -> int | None:
    """Free memory of CUDA device 0 in bytes (``torch.cuda.mem_get_info``, asked in a child process so that this one
    holds no CUDA context while the jobs run), None without CUDA."""
    probe = "import torch; print(torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else -1)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    lines = done.stdout.split()
    free = int(lines[-1]) if done.returncode == 0 and lines else -1
    return free if free >= 0 else None


def auto_workers(tasks: list[str], out: Path, device: str, free: int | None, cores: int,
                 peak_gb: float | None = None) -> tuple[int, str]:
    """``(workers, why)`` for ``--workers auto``.  On CUDA: ``free`` bytes over one run's footprint, capped at
    ``cores - 1`` (each job's process keeps about a core busy), at least 1; the footprint is ``peak_gb`` if given,
    else the largest peak reserved memory that the logs in ``out`` report (:func:`sdsopt.lab.workers.read_peak`)
    times 1.1 plus :data:`CONTEXT_GB`, else the largest :data:`PEAK_GB` estimate of ``tasks``.  On a CPU ``device``
    (or without CUDA): half the cores, at least 1 (each job's torch runs several threads)."""
    if not device.startswith("cuda") or free is None:
        return max(1, cores // 2), f"{device}: half of {cores} cores"
    peaks = [peak for log in out.glob("*.log") if (peak := read_peak(log)) is not None]
    if peak_gb is not None:
        footprint, source = peak_gb, "--peak-gb"
    elif peaks:
        footprint = max(peaks) / 1e9 * 1.1 + CONTEXT_GB
        source = f"measured: largest of {len(peaks)} logs' peaks x 1.1 + context"
    else:
        footprint, source = max(PEAK_GB[t] for t in tasks), "estimate, PEAK_GB"
    by_memory = int(free / 1e9 // footprint)
    workers = max(1, min(by_memory, cores - 1))
    return workers, (f"{free / 1e9:.1f} GB free / {footprint:.2f} GB per run ({source}) = {by_memory}; "
                     f"cap {cores - 1} (cores - 1)")


def lr_name(lr: float) -> str:
    """``3e-3`` for 0.003: the job names' spelling of an lr."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    return f"{round(lr / 10 ** exponent, 3):g}e{exponent}"


def edge_extensions(jobs: list[tuple[str, list[str]]], out: Path, factor: float = 3.0
                    ) -> list[tuple[str, list[str]]]:
    """Jobs that extend a grid whose best lr lies on its edge: for each (task, scale, mode) among ``jobs`` whose
    runs all finished, the best lr by the mean held-out loss over the seeds run at every lr; where that is the
    grid's smallest (largest) lr, the same seeds at ``lr / f`` (``lr · f``), ``f`` the grid's spacing at that edge
    (``factor`` for a one-point grid, which is extended both ways).  A diverged run (non-finite loss) counts as
    worst."""
    groups: dict[tuple[str, str, str], dict[str, list[str]]] = defaultdict(dict)
    for name, argv in jobs:
        if name.endswith("-metrics"):
            continue
        task, scale, rest = name.split("-", 2)
        mode, seed_lr = rest.rsplit("-s", 1)
        groups[(task, scale, mode)][name] = argv
    extra = []
    for (task, scale, mode), members in groups.items():
        results: dict[float, dict[int, float]] = defaultdict(dict)
        template = None
        for name, argv in members.items():
            path = out / name / "summary.json"
            if not path.exists():
                break
            for r in json.load(open(path))["runs"]:
                value = r["eval"]
                results[r["lr"]][r["seed"]] = value if math.isfinite(value) else float("inf")
            template = argv
        else:
            lrs = sorted(results)
            seeds = sorted(set.intersection(*(set(v) for v in results.values())))
            if not seeds or template is None:
                continue
            means = {lr: statistics.fmean(results[lr][s] for s in seeds) for lr in lrs}
            best = min(lrs, key=means.get)
            targets = []
            if best == lrs[0]:
                targets.append(lrs[0] / (lrs[1] / lrs[0] if len(lrs) > 1 else factor))
            if best == lrs[-1]:
                targets.append(lrs[-1] * (lrs[-1] / lrs[-2] if len(lrs) > 1 else factor))
            for lr in targets:
                for seed in seeds:
                    argv = list(template)
                    argv[argv.index("--lrs") + 1] = lr_name(lr)
                    argv[argv.index("--first-seed") + 1] = str(seed)
                    extra.append((f"{task}-{scale}-{mode}-s{seed}-lr{lr_name(lr)}", argv))
    return extra


def _worst_over_best(sensitivity: dict[float, float], lo: float = 1e-4, hi: float = 3e-3) -> float:
    """Largest over smallest held-out loss among the lrs in ``[lo, hi]`` (NaN if a run there diverged)."""
    inside = [v for lr, v in sensitivity.items() if lo * 0.999 <= lr <= hi * 1.001]
    return max(inside) / min(inside) if inside and all(math.isfinite(v) for v in inside) else float("nan")


def _steps_to_reach(curve: list[float], target: float, window: int) -> int | None:
    """First step at which the trailing mean of ``window`` train losses is at or below ``target``."""
    for i in range(window, len(curve) + 1):
        if statistics.fmean(curve[i - window: i]) <= target:
            return i
    return None


def _whole_grids(runs: list[dict]) -> list[dict]:
    """The runs of the seeds that have a mode's whole lr grid (an interrupted sweep leaves partial seeds, which
    would compare lrs over different seeds)."""
    lrs = defaultdict(set)
    for r in runs:
        lrs[r["mode"]].add(r["lr"])
    have = defaultdict(set)
    for r in runs:
        have[(r["mode"], r["seed"])].add(r["lr"])
    return [r for r in runs if have[(r["mode"], r["seed"])] == lrs[r["mode"]]]


def merge(args: argparse.Namespace) -> None:
    runs_by: dict[str, list[dict]] = defaultdict(list)
    for summary_path in sorted(Path(args.folder).glob("*/summary.json")):
        job = summary_path.parent.name
        if job.endswith("-metrics"):
            continue
        task, scale = job.split("-")[:2]  # jobs are named task-scale-mode-seed-lr
        summary = json.load(open(summary_path))
        curves = defaultdict(list)
        with open(summary_path.parent / "curves.csv") as fh:
            for row in csv.DictReader(fh):
                curves[(row["mode"], float(row["lr"]), int(row["seed"]))].append(float(row["loss"]))
        for r in summary["runs"]:
            runs_by[f"{task}-{scale}"].append({**r, "curve": curves[(r["mode"], r["lr"], r["seed"])], "metrics": []})
    out = Path(args.out)
    lines, everything = [], {}
    for key, runs in sorted(runs_by.items()):
        runs = _whole_grids(runs)
        table = summarise(runs)
        steps = len(runs[0]["curve"])
        window = max(1, steps // 20)
        lora = table.get("lora")
        if lora is not None:
            target = lora["final_train"]
            for mode, entry in table.items():
                reached = [_steps_to_reach(r["curve"], target, window) for r in runs
                           if r["mode"] == mode and r["lr"] == entry["lr"]]
                entry["steps_to_lora_final"] = (statistics.fmean(reached) if all(s is not None for s in reached)
                                                else None)
        for mode, entry in table.items():
            entry["worst_over_best_1e-4_3e-3"] = _worst_over_best(entry["lr_sensitivity"])
            entry["seeds"] = len({r["seed"] for r in runs if r["mode"] == mode and r["lr"] == entry["lr"]})
        everything[key] = table
        (out / key).mkdir(parents=True, exist_ok=True)
        plot(key, runs, table, out / key)
        lines += [f"### {key} ({steps} steps)", "",
                  "| mode | seeds | best lr | held-out loss ± sd | exact match ± sd | vs lora | worst/best lr 1e-4…3e-3 |"
                  " steps to LoRA's final train loss |", "|---|---|---|---|---|---|---|---|"]
        for mode, e in sorted(table.items(), key=lambda kv: kv[1]["eval"]):
            rel = (e["eval"] / lora["eval"] - 1) * 100 if lora else float("nan")
            acc = f"{e['accuracy']:.3f} ± {e['accuracy_std']:.3f}" if "accuracy" in e else "–"
            reach = e.get("steps_to_lora_final")
            lines.append(f"| {mode} | {e['seeds']} | {e['lr']:g} | {e['eval']:.4f} ± {e['eval_std']:.4f} | {acc} | "
                         f"{rel:+.1f} % | {e['worst_over_best_1e-4_3e-3']:.2f} | "
                         f"{'–' if reach is None else f'{reach:.0f}'} |")
        lines.append("")
    (out / "tables.md").write_text("\n".join(lines))
    json.dump({key: [{k: v for k, v in r.items() if k not in ("curve", "metrics")} for r in runs]
               for key, runs in sorted(runs_by.items())}, open(out / "runs.json", "w"), indent=0)
    json.dump(everything, open(out / "summary.json", "w"), indent=1)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    r.add_argument("--scales", nargs="+", choices=list(SCALES), default=list(SCALES))
    r.add_argument("--modes", nargs="+", default=["lora", "sds", "full"])
    r.add_argument("--metrics-lr", default=None, help="also lora and sds at this lr with metrics every 10 steps")
    r.add_argument("--workers", default="auto",
                   help="jobs at once, or auto: from the GPU's free memory and the CPU cores (auto_workers)")
    r.add_argument("--peak-gb", type=float, default=None,
                   help="--workers auto: one run's GPU footprint in GB (default: measured in --out's logs, else "
                   "PEAK_GB's estimate)")
    r.add_argument("--deadline", type=float, default=540.0, help="seconds after which no job starts")
    r.add_argument("--budget", type=float, default=0.0,
                   help="seconds within which every started job must end, judged by the longest finished job (0: off)")
    r.add_argument("--extend", type=int, default=0,
                   help="rounds of extending each grid whose best lr lies on an edge (edge_extensions)")
    r.add_argument("--lrs", nargs="+", default=None, help="the LoRA modes' lr grid (default: %s)" % " ".join(LORA_LRS))
    r.add_argument("--full-lrs", nargs="+", default=None, help="full fine-tuning's lr grid (default: %s)"
                   % " ".join(FULL_LRS))
    r.add_argument("--grid", action="append", default=[], metavar="MODE=LR,LR,...",
                   help="one mode's lr grid (repeatable), e.g. --grid sdsplus8=5e-4,1e-3,2e-3")
    r.add_argument("--first-seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=0, help="run only the first N jobs (0: all)")
    r.add_argument("--out", default="runs/llm")
    m = sub.add_parser("merge")
    m.add_argument("folder")
    m.add_argument("--out", default="benchmarks/ablation/smollm")
    args = ap.parse_args(argv)
    if args.command == "merge":
        return merge(args)
    grids = {mode: lrs.split(",") for mode, _, lrs in (g.partition("=") for g in args.grid)}
    jobs = plan(args.steps, args.seeds, args.tasks, args.scales, args.modes, args.metrics_lr, args.lrs,
                args.full_lrs, grids, args.first_seed)
    jobs = jobs[: args.limit or None]
    start, longest = time.time(), [0.0]
    device = passthrough[passthrough.index("--device") + 1] if "--device" in passthrough else "cpu"

    def workers() -> int:
        """``--workers``, or with auto the pool's size for the next wave (free memory measured now, between waves)."""
        if args.workers != "auto":
            return int(args.workers)
        free = gpu_free_bytes() if device.startswith("cuda") else None
        n, why = auto_workers(args.tasks, Path(args.out), device, free, os.cpu_count() or 1, args.peak_gb)
        print(f"workers auto: {n} ({why})", flush=True)
        return n

    run(jobs, Path(args.out), workers(), args.deadline, passthrough, args.budget, start, longest)
    for _ in range(args.extend):  # (a later call with the same arguments picks up where the budget stopped)
        extra = edge_extensions(jobs, Path(args.out))
        if not extra:
            break
        jobs += extra
        run(extra, Path(args.out), workers(), args.deadline, passthrough, args.budget, start, longest)


if __name__ == "__main__":
    main()
