"""Several lab runs at once on one device: a pool of ``python -m sdsopt.lab`` processes.

``python -m sdsopt.lab ... --workers N`` splits its grid into N shards (every N-th run, :func:`shard_jobs`), runs
them as N processes that fill one :class:`~sdsopt.lab.store.RunStore` (each process one model copy on the
device), then reads the store back and writes the tables as a single process would.  :func:`run_jobs` is the
pool itself: ``benchmarks/llm_sweep.py`` gives it one job per run, with a deadline and a time budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Job", "WorkerFailed", "run_jobs", "run_shards", "shard_jobs"]


@dataclass(frozen=True)
class Job:
    """One process of the pool: ``python -m sdsopt.lab`` with ``argv``, its output into ``log``."""

    name: str
    argv: tuple[str, ...]
    log: Path


class WorkerFailed(RuntimeError):
    """A worker process ended with a non-zero status; the message holds the end of its log."""


def run_jobs(jobs: Sequence[Job], workers: int, *, deadline: float = float("inf"), budget: float = 0.0,
             done: Callable[[Job], bool] = lambda job: False, start: float | None = None,
             longest: list[float] | None = None, report: Callable[[str], None] | None = None) -> dict[str, int]:
    """Run ``jobs`` ``workers`` at a time, in order, and return each started job's exit status by name.

    A job for which ``done(job)`` holds is skipped; none starts after ``deadline`` seconds, nor, with ``budget``,
    one that would end after ``budget`` seconds if it took as long as the longest job finished so far (``start``:
    the clock's zero, default now; ``longest``: a one-element list that carries that time from one call to the
    next).  ``report`` gets one line per job (skipped, or its status and time)."""
    start = time.time() if start is None else start
    longest = [0.0] if longest is None else longest
    status: dict[str, int] = {}

    def one(job: Job) -> str:
        if done(job):
            return f"{job.name}: done before"
        elapsed = time.time() - start
        if elapsed > deadline or (budget and elapsed + longest[0] > budget):
            return f"{job.name}: skipped (deadline)"
        t0 = time.time()
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "w") as log:
            status[job.name] = subprocess.call([sys.executable, "-m", "sdsopt.lab", *job.argv], stdout=log,
                                               stderr=subprocess.STDOUT, env=os.environ)
        longest[0] = max(longest[0], time.time() - t0)
        return f"{job.name}: rc={status[job.name]} in {time.time() - t0:.0f}s (at {time.time() - start:.0f}s)"

    with ThreadPoolExecutor(workers) as pool:
        for line in pool.map(one, jobs):
            if report is not None:
                report(line)
    return status


def shard_jobs(argv: Sequence[str], workers: int, folder: Path) -> list[Job]:
    """The ``workers`` shards of the grid that ``argv`` (a lab command line without ``--workers``) asks for:
    shard ``k`` runs every ``workers``-th run from the ``k``-th into the store under ``folder``, quietly, its
    log ``folder / "runs" / "worker-k.log"``."""
    return [Job(f"worker {k}", (*argv, "--shard", f"{k}/{workers}", "--quiet"),
                folder / "runs" / f"worker-{k}.log") for k in range(workers)]


def run_shards(argv: Sequence[str], workers: int, folder: Path, total: int, quiet: bool,
               count: Callable[[], int]) -> None:
    """Run :func:`shard_jobs` as ``workers`` processes; a bar over the ``total`` runs (``count()``: how many the
    store holds) unless ``quiet``; :class:`WorkerFailed` with the log's end when a worker fails."""
    from .extras import require

    tqdm = require("tqdm", "the lab's progress bar").tqdm
    jobs = shard_jobs(argv, workers, folder)
    with ThreadPoolExecutor(1) as waiter, tqdm(total=total, desc=f"{workers} workers", unit="run", disable=quiet,
                                               file=sys.stderr) as bar:
        status = waiter.submit(run_jobs, jobs, workers)
        while not status.done():
            time.sleep(0.5)
            bar.update(count() - bar.n)
        bar.update(count() - bar.n)
    for job in jobs:
        if status.result().get(job.name, 0) != 0:
            tail = job.log.read_text()[-3000:] if job.log.exists() else ""
            raise WorkerFailed(f"{job.name} failed (exit status {status.result()[job.name]}; log {job.log}):\n{tail}")
