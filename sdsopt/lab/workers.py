"""Several lab runs at once on one device: a pool of ``python -m sdsopt.lab`` processes.

``python -m sdsopt.lab ... --workers N`` splits its grid into N shards (every N-th run, :func:`shard_jobs`), runs
them as N processes that fill one :class:`~sdsopt.lab.store.RunStore` (each process one model copy on the
device), then reads the store back and writes the tables as a single process would.  :func:`run_jobs` is the
pool itself: ``benchmarks/llm_sweep.py`` gives it one job per run, with a deadline and a time budget; a job that
died of CUDA out-of-memory is run again with fewer at once, and each process's CUDA memory peak ends its log
(:func:`report_peak`, :func:`read_peak`), which is how the sweep sizes its pool from free GPU memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OOM_MARKERS", "Job", "WorkerFailed", "died_of_oom", "read_peak", "report_peak", "run_jobs", "run_lab",
           "run_shards", "shard_jobs"]


@dataclass(frozen=True)
class Job:
    """One process of the pool: ``python -m sdsopt.lab`` with ``argv``, its output into ``log``."""

    name: str
    argv: tuple[str, ...]
    log: Path


class WorkerFailed(RuntimeError):
    """A worker process ended with a non-zero status; the message holds the end of its log."""


OOM_MARKERS = (
    "torch.OutOfMemoryError", "CUDA out of memory", "mha_graph.execute(handle, variant_pack, workspace_ptr")
"""What a job that died for want of device memory leaves in its log: the allocator's errors, and cuDNN's attention
backward failing to run (seen on an H100, 2026-12-07: all 11 of a first wave of 12 SmolLM2 jobs started at once
died so at 69 s; the next waves, started apart, ran)."""
PEAK_MARK = "sdsopt.lab.workers: cuda peak"


# what each pool process runs: ``python -m sdsopt.lab`` with the job's arguments, then :func:`report_peak`
LAB_COMMAND = ("import runpy\ntry:\n    runpy.run_module('sdsopt.lab', run_name='__main__')\n"
               "finally:\n    from sdsopt.lab.workers import report_peak\n    report_peak()")


def report_peak() -> None:
    """When this process used CUDA, one line ``sdsopt.lab.workers: cuda peak allocated A reserved R bytes`` on
    stdout (``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``), which :func:`read_peak` reads back
    from a job's log; nothing otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print(f"{PEAK_MARK} allocated {torch.cuda.max_memory_allocated()} reserved "
              f"{torch.cuda.max_memory_reserved()} bytes", flush=True)


def read_peak(log: Path) -> int | None:
    """The peak reserved CUDA memory in bytes that :func:`report_peak` wrote into ``log`` (None: none there)."""
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(PEAK_MARK):
            return int(line.split()[-2])
    return None


def died_of_oom(log: Path) -> bool:
    """Whether the job's ``log`` shows a CUDA out-of-memory error, cuDNN's included (:data:`OOM_MARKERS`)."""
    if not log.exists():
        return False
    text = log.read_text(errors="replace")
    return any(marker in text for marker in OOM_MARKERS)


def run_lab(job: Job) -> int:
    """The pool's default runner: ``python -m sdsopt.lab`` on ``job.argv`` in a new process, then its CUDA peak
    (:data:`LAB_COMMAND`), stdout and stderr into ``job.log``; returns the exit status."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as log:
        return subprocess.call([sys.executable, "-c", LAB_COMMAND, *job.argv], stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ)


def run_jobs(jobs: Sequence[Job], workers: int, *, deadline: float = float("inf"), budget: float = 0.0,
             done: Callable[[Job], bool] = lambda job: False, start: float | None = None,
             longest: list[float] | None = None, report: Callable[[str], None] | None = None,
             retries: int = 2, runner: Callable[[Job], int] = run_lab) -> dict[str, int]:
    """Run ``jobs`` ``workers`` at a time, in order, and return each started job's exit status by name.

    A job for which ``done(job)`` holds is skipped; none starts after ``deadline`` seconds, nor, with ``budget``,
    one that would end after ``budget`` seconds if it took as long as the longest job finished so far (``start``:
    the clock's zero, default now; ``longest``: a one-element list that carries that time from one call to the
    next).  A job that fails with a CUDA out-of-memory error in its log (:func:`died_of_oom`) goes back to the
    head of the queue, at most ``retries`` times, and the pool then runs at most one job fewer than were running
    when it died (never fewer than one).  ``runner`` runs one job and returns its exit status (default
    :func:`run_lab`).  ``report`` gets one line per job as it ends (skipped, retried, or its status and time)."""
    start = time.time() if start is None else start
    longest = [0.0] if longest is None else longest
    status: dict[str, int] = {}
    queue, running = deque(jobs), {}
    tries: dict[str, int] = defaultdict(int)
    limit = max(1, workers)
    say = report or (lambda line: None)

    def timed(job: Job) -> tuple[int, float]:
        t0 = time.time()
        return runner(job), time.time() - t0

    with ThreadPoolExecutor(limit) as pool:
        while queue or running:
            while queue and len(running) < limit:
                job = queue.popleft()
                elapsed = time.time() - start
                if done(job):
                    say(f"{job.name}: done before")
                elif elapsed > deadline or (budget and elapsed + longest[0] > budget):
                    say(f"{job.name}: skipped (deadline)")
                else:
                    running[pool.submit(timed, job)] = job
            if not running:
                break
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                job = running.pop(future)
                rc, seconds = future.result()
                longest[0] = max(longest[0], seconds)
                if rc != 0 and tries[job.name] < retries and died_of_oom(job.log):
                    tries[job.name] += 1
                    limit = max(1, min(limit, len(running) + 1) - 1)
                    queue.appendleft(job)
                    say(f"{job.name}: out of memory after {seconds:.0f}s; retry {tries[job.name]}/{retries}, "
                        f"now {limit} at once")
                    continue
                status[job.name] = rc
                say(f"{job.name}: rc={rc} in {seconds:.0f}s (at {time.time() - start:.0f}s)")
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
