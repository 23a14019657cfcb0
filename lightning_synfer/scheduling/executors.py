"""Where the scheduler's jobs run: in this process, as local processes (spawn or forkserver), or through
submitit (SLURM, or its local and debug executors, which need no SLURM).

Every job is `run.py TASK OVERRIDES`: the same command whichever executor runs it, so a stage or sweep point
computes the same numbers in each (tests check spawn against forkserver).
"""
from __future__ import annotations

import importlib
import io
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_synfer.config.choices import AUTO
from lightning_synfer.config.sweep import START_METHODS
from lightning_synfer.scheduling.scheduler import Job

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_PY = REPO_ROOT / "run.py"

# What a job process would otherwise import itself (~10 s of a small CPU's time per job): the forkserver imports
# it once, then every job is a fork of that server. `make install` imports it once to compile its bytecode.
PRELOAD = ("torch", "torchvision", "lightning.pytorch", "torchmetrics", "timm", "lightly.loss",
           "diffusers", "transformers", "matplotlib.pyplot", "lightning_synfer.tasks.fit",
           "lightning_synfer.tasks.synthesize", "lightning_synfer.tasks.label",
           "lightning_synfer.tasks.linear", "lightning_synfer.tasks.evaluate_generation",
           "lightning_synfer.tasks.render")


def preload() -> None:
    """Import PRELOAD here (matplotlib on its file backend)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        importlib.import_module(name)


def child_environment(threads: Optional[int] = None) -> dict[str, str]:
    """The environment of a job: the run stamp is per run, never inherited; OMP_NUM_THREADS=`threads` unless
    the user set it."""
    env = {k: v for k, v in os.environ.items() if k != "SYNFER_RUN_STAMP"}
    if threads is not None and not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def resolve_parallel(value: Any, cpu_count: Optional[int] = None) -> tuple[int, int]:
    """`parallel` (a number or `auto`) -> (jobs at once, OMP threads per job process).

    auto: hardware.stage_parallelism; a number N: the CPUs shared among N processes."""
    from lightning_synfer import hardware

    if value == AUTO:
        return hardware.stage_parallelism(cpu_count)
    cpus = hardware.available_cpus() if cpu_count is None else max(1, int(cpu_count))
    return int(value), max(1, cpus // int(value))


def run_command(task: str, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, str(RUN_PY), task, *overrides]


class _Finished:
    """The handle of a job that ran to its end inside this process."""

    def __init__(self, code: int, why: str) -> None:
        self.code, self.why, self.where = code, why, "this process"

    def poll(self) -> int:
        return self.code

    def send(self, signum: int) -> None:
        pass

    def kill(self) -> None:
        pass

    def reason(self) -> str:
        return self.why


class InProcessExecutor:
    """parallel=1: call the task function here, one job at a time (no interpreter start at all)."""

    in_process = True
    capacity: Optional[int] = 1

    def start(self, jobs: Sequence[Job]) -> list[_Finished]:
        from lightning_synfer.config.compose import compose
        from lightning_synfer.tasks import TASKS, load

        handles = []
        for job in jobs:
            try:
                cfg = job.config if job.config is not None else compose(TASKS[job.task][1], job.overrides)
                load(job.task)(cfg, [job.task, *job.overrides])
            except Exception as exc:  # one failed job must not lose the others; the traceback is printed
                traceback.print_exc()
                handles.append(_Finished(1, f"{type(exc).__name__}: {exc}"))
                continue
            handles.append(_Finished(0, ""))
        return handles

    def close(self) -> None:
        pass


class _Process:
    """A local job process (Popen or multiprocessing.Process) in its own process group: Ctrl-C in a terminal
    reaches the scheduler only, which passes it on once."""

    def __init__(self, proc: Any, log: Path) -> None:
        self.proc, self.log = proc, log
        self.where = f"pid {proc.pid}, log {log}"

    def poll(self) -> Optional[int]:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return None if self.proc.is_alive() else self.proc.exitcode

    def send(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def reason(self) -> str:
        return f"exit code {self.poll()}; log {self.log}"


def _forkserver_job(task: str, overrides: list[str], log: str, env: dict[str, str], cwd: str,
                    threads: Optional[int]) -> None:
    """The body of a forkserver job: what `run.py TASK OVERRIDES > log 2>&1` would do, in a fork of the server."""
    os.setpgid(0, 0)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # As in a fresh interpreter: the streams and logging write to the new fds 1 and 2.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    logging.root.handlers.clear()
    os.environ.clear()
    os.environ.update(env)
    if threads is not None and "torch" in sys.modules:  # the server's torch read OMP_NUM_THREADS at its import
        sys.modules["torch"].set_num_threads(int(env.get("OMP_NUM_THREADS", threads)))
    sys.argv = [str(RUN_PY), task, *overrides]
    from lightning_synfer.cli import main

    sys.exit(int(main([task, *overrides]) or 0))


class LocalProcessExecutor:
    """Jobs as local processes, `spawn` (a fresh `python run.py`) or `forkserver`.

    forkserver: Python's multiprocessing fork server, started once with PRELOAD imported, forks every job. A job
    skips ~10 s of interpreter start and imports on a small CPU, and, unlike forking the scheduler itself, it
    forks a process that never ran torch: no OpenMP or other threads whose locks a fork could copy held."""

    in_process = False

    def __init__(self, start_method: str = "spawn", threads: Optional[int] = None,
                 capacity: Optional[int] = None) -> None:
        if start_method not in START_METHODS:
            raise ValueError(f"start method {start_method!r}: expected one of {START_METHODS}")
        self.start_method, self.threads, self.capacity = start_method, threads, capacity
        self._context = None
        if start_method == "forkserver":
            os.environ.setdefault("MPLBACKEND", "Agg")  # the server inherits it before importing matplotlib
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(list(PRELOAD))

    def start(self, jobs: Sequence[Job]) -> list[_Process]:
        return [self._start_one(job) for job in jobs]

    def _start_one(self, job: Job) -> _Process:
        if job.log is None:
            raise ValueError(f"job {job.name}: a local process needs a log file")
        job.log.parent.mkdir(parents=True, exist_ok=True)
        env = child_environment(self.threads)
        if self._context is None:
            with open(job.log, "w", encoding="utf-8") as fh:
                proc = subprocess.Popen(run_command(job.task, job.overrides), stdout=fh, stderr=subprocess.STDOUT,
                                        cwd=os.getcwd(), env=env, process_group=0)
            return _Process(proc, job.log)
        proc = self._context.Process(target=_forkserver_job, name=job.name,
                                     args=(job.task, list(job.overrides), str(job.log), env, os.getcwd(),
                                           self.threads))
        proc.start()
        return _Process(proc, job.log)

    def close(self) -> None:
        pass
