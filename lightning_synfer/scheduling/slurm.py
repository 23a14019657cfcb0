"""Jobs through submitit: SLURM job arrays and per-job resources; submitit's local and debug executors in tests.

submitit pickles the job (`RunTask`: `run.py TASK OVERRIDES` as a callable), writes and submits the sbatch
script, runs it under `srun` (one task per GPU on every node: Lightning's SLURMEnvironment reads the ranks from
srun's variables), watches the jobs with sacct and cancels them with scancel. Several jobs started at once
become one job array (`slurm_array_parallelism` = `slurm.max_concurrent`).

Preemption and time limits: `--signal=USR1@90 --requeue`. Lightning's SLURM handler catches SIGUSR1, saves an
hpc checkpoint in the run dir and requeues the job (`scontrol requeue`); the requeued job runs the same pickled
call, whose `resume=auto` continues from the newest checkpoint (tests/reliability/test_preemption.py). That is
submitit's requeue with a checkpoint taken at the signal: its own Checkpointable resubmits the call but cannot
save a Trainer's state, so the steps since the last periodic checkpoint would be lost.
"""
from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_synfer.config.sweep import timeout_minutes
from lightning_synfer.scheduling.scheduler import Job

REQUEUE = {"signal": "USR1@90", "requeue": True}


@dataclass
class RunTask:
    """`run.py TASK OVERRIDES` as a picklable call; returns the exit code (bad input: 2, like the CLI)."""

    task: str
    overrides: list[str]

    def __call__(self) -> int:
        os.environ.pop("SYNFER_RUN_STAMP", None)  # per run, never inherited from the submitting process
        from lightning_synfer.cli import main

        return int(main([self.task, *self.overrides]) or 0)


def slurm_parameters(slurm: Any, *, nodes: int, tasks_per_node: int, gpus_per_node: int, job_name: str,
                     key: str, time: Optional[str] = None, partition: Optional[str] = None,
                     cpus_per_task: Optional[int] = None, mem: Optional[str] = None) -> dict[str, Any]:
    """submitit AutoExecutor parameters from a SlurmConfig (`sweep.slurm`, `pipeline.slurm`); the keyword
    arguments are one job's own values (a stage's `resources`). `key` names the section in errors."""
    additional = dict(REQUEUE)
    for name, value in (("account", slurm.account), ("qos", slurm.qos), ("mem", mem or slurm.mem)):
        if value:
            additional[name] = value
    for option in slurm.extra:  # "--constraint=a100" -> constraint: a100; "--exclusive" -> exclusive: True
        name, _, value = option.lstrip("-").partition("=")
        additional[name.replace("-", "_")] = value or True
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": timeout_minutes(time or slurm.time, f"{key}.time"),
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "gpus_per_node": gpus_per_node,
        "cpus_per_task": cpus_per_task or slurm.cpus_per_task,
        "slurm_additional_parameters": additional,
        "slurm_setup": list(slurm.setup),
    }
    if partition or slurm.partition:
        params["slurm_partition"] = partition or slurm.partition
    if slurm.max_concurrent:
        params["slurm_array_parallelism"] = int(slurm.max_concurrent)
    return params


class _SubmititJob:
    def __init__(self, job: Any, debug: bool) -> None:
        self.job, self.debug = job, debug
        self.where = f"job {job.job_id}, log {job.paths.stdout}"
        self._code: Optional[int] = None
        self._why = ""

    def poll(self) -> Optional[int]:
        if self._code is None and (self.debug or self.job.done()):  # a debug job runs when asked for its result
            try:
                self._code = int(self.job.result())
                self._why = f"exit code {self._code}; log {self.job.paths.stdout}"
            except Exception as exc:  # a cancelled, killed or crashed job: submitit says which
                self._code, self._why = 1, f"{type(exc).__name__}: {str(exc).strip()[-500:]}"
        return self._code

    def send(self, signum: int) -> None:
        self.job.cancel(check=False)  # scancel (SLURM sends SIGTERM, then SIGKILL); SIGINT to a local job

    def kill(self) -> None:
        if hasattr(self.job, "_process"):  # submitit's local job: its process
            try:
                os.kill(self.job._process.pid, signal.SIGKILL)
            except (ProcessLookupError, AttributeError):
                pass
        else:
            self.job.cancel(check=False)

    def reason(self) -> str:
        return self._why


class SubmititExecutor:
    """Jobs through submitit.AutoExecutor; `cluster`: slurm, local or debug. Each job's `resources` are its
    submitit parameters; jobs started together with the same parameters are one job array."""

    in_process = False

    def __init__(self, folder: Path, cluster: str = "slurm", python: str = "python",
                 capacity: Optional[int] = None) -> None:
        import submitit

        self.folder, self.cluster, self.capacity = Path(folder), cluster, capacity
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None] if cluster == "slurm" else []
        if missing:
            raise ValueError(f"SLURM is not available here ({' and '.join(missing)} not on PATH); expected a SLURM "
                             f"login node, or slurm.cluster=local (submitit's local executor), or "
                             f"slurm.script_only=true (write the sbatch script only)")
        self.executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=cluster, slurm_python=python)

    def start(self, jobs: Sequence[Job]) -> list[_SubmititJob]:
        handles: dict[str, _SubmititJob] = {}
        groups: dict[str, list[Job]] = {}
        for job in jobs:
            groups.setdefault(repr(sorted(job.resources.items())), []).append(job)
        for group in groups.values():
            self.executor.update_parameters(**group[0].resources)
            calls = [RunTask(job.task, list(job.overrides)) for job in group]
            submitted = self.executor.submit_array(calls) if len(calls) > 1 else [self.executor.submit(calls[0])]
            for job, sub in zip(group, submitted):
                handles[job.name] = _SubmititJob(sub, debug=self.cluster == "debug")
        return [handles[job.name] for job in jobs]

    def close(self) -> None:
        pass
