"""Launchers: run a sweep's pending points through the scheduler (lightning_synfer/scheduling): here, one by one
or N at once as processes, or as one SLURM job array through submitit; or write an sbatch script of the array.

Every point is an ordinary `python run.py fit ...` with its own `run_dir=`; a point is done when its
metrics.json exists (written last, atomically), so any launcher can be rerun and skips finished points.
"""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

from datamodules.atomic import atomic_write_lines, atomic_write_text
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.scheduling import Job, JobFailed, run_graph
from lightning_synfer.scheduling.executors import InProcessExecutor, LocalProcessExecutor, RUN_PY, resolve_parallel
from lightning_synfer.scheduling.slurm import REQUEUE, SubmititExecutor, slurm_parameters


class SweepFailed(ValueError):
    """Some points failed; the message lists them and their logs. (A ValueError so that the CLI prints one
    line and exits 2, like other bad-input errors: the traceback is in each point's log.)"""


@dataclass
class PendingPoint:
    index: int
    name: str
    label: str
    run_dir: Path
    overrides: list[str]
    config: Optional[DictConfig] = None


@dataclass
class LaunchResult:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason (log path or exception)
    script: Optional[Path] = None  # sweep.slurm.script_only / sweep.dry_run: the sbatch script written
    submitted: list[str] = field(default_factory=list)  # SLURM job ids (sweep.slurm.wait=false)


def _run_points(points: Sequence[PendingPoint], jobs: dict[str, Job], executor: Any, *, parallel: int,
                fail_fast: bool, log: Callable[[str], None]) -> LaunchResult:
    """The scheduler over the points (a graph without edges); done = exit code 0 and metrics.json."""
    by_name = {p.name: p for p in points}
    t0: dict[str, float] = {}
    total = len(points)

    def prepare(name: str) -> Job:
        p = by_name[name]
        t0[name] = time.perf_counter()
        if executor.in_process:
            log(f"[synfer] sweep {p.index + 1}/{total} {name}: running")
        return jobs[name]

    def started(job: Job, handle: Any) -> None:
        if not executor.in_process:
            log(f"[synfer] sweep {by_name[job.name].index + 1}/{total} {job.name}: started ({handle.where})")

    def finish(job: Job, code: int, handle: Any) -> None:
        if code != 0 or not (by_name[job.name].run_dir / "metrics.json").is_file():
            raise JobFailed(handle.reason() or f"exit code {code}, no metrics.json")
        log(f"[synfer] sweep {job.name}: done in {time.perf_counter() - t0[job.name]:.0f} s")

    outcome = run_graph({p.name: [] for p in points}, executor=executor, parallel=parallel, prepare=prepare,
                        finish=finish, started=started, fail_fast=fail_fast, log=log)
    return LaunchResult(done=outcome.done, failed=outcome.failed)


def run_local(points: Sequence[PendingPoint], *, task: str, root: Path, parallel: Any = 1,
              use_subprocess: bool = False, fail_fast: bool = False, start_method: str = "spawn",
              log: Callable[[str], None] = print) -> LaunchResult:
    """parallel=1 (and not use_subprocess): the points one by one in this process; otherwise as local
    processes, `parallel` at once (`auto`: from the CPUs), each with its share of the CPUs as OMP threads."""
    processes, threads = resolve_parallel(parallel)
    if processes > 1 or use_subprocess:
        executor: Any = LocalProcessExecutor(start_method, threads=threads)
    else:
        executor = InProcessExecutor()
    jobs = {p.name: Job(p.name, task, list(p.overrides), log=root / "logs" / f"{p.name}.log", config=p.config)
            for p in points}
    return _run_points(points, jobs, executor, parallel=processes, fail_fast=fail_fast, log=log)


# ------------------------------------------------------------------------------------------ slurm

def slurm_resources(slurm: DictConfig, trainer: DictConfig) -> dict[str, int]:
    """Nodes, tasks (= processes = devices) per node and GPUs per node; they must match the Trainer's
    num_nodes and devices, which Lightning's SLURMEnvironment checks against SLURM_NNODES/NTASKS_PER_NODE."""
    nodes = int(slurm.nodes if slurm.nodes is not None else trainer.num_nodes)
    devices = trainer.devices
    on_cpu = str(trainer.accelerator) == "cpu"
    if slurm.gpus_per_node is not None:
        per_node = int(slurm.gpus_per_node)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif on_cpu:
        per_node = 1
    else:
        raise ConfigError(f"sweep.launcher=slurm: trainer.devices={devices!r} does not say how many GPUs a node has; "
                          f"expected sweep.slurm.gpus_per_node=N (or trainer.devices=N)")
    if per_node < 1 and not on_cpu:
        raise ConfigError(f"sweep.slurm.gpus_per_node={per_node}: expected >= 1 for accelerator={trainer.accelerator}")
    return {"nodes": nodes, "ntasks_per_node": max(1, per_node), "gpus_per_node": 0 if on_cpu else per_node}


def shape_overrides(resources: dict) -> list[str]:
    """The allocation decides the Trainer's shape (Lightning checks it against SLURM_NNODES/NTASKS_PER_NODE)."""
    return [f"trainer.num_nodes={resources['nodes']}", f"trainer.devices={resources['ntasks_per_node']}"]


def slurm_script(points: Sequence[PendingPoint], *, task: str, root: Path, slurm: DictConfig, resources: dict,
                 job_name: str) -> str:
    """The sbatch script of a job array over `points.txt` (line i+1 = the overrides of array task i), for
    `sweep.slurm.script_only` and `sweep.dry_run`: the same job submitit would submit, as text to read or edit."""
    n = len(points)
    array = f"0-{n - 1}" + (f"%{slurm.max_concurrent}" if slurm.max_concurrent else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={resources['nodes']}",
        f"#SBATCH --ntasks-per-node={resources['ntasks_per_node']}",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
        f"#SBATCH --time={slurm.time}",
        f"#SBATCH --output={root / 'logs'}/%A_%a.out",
        # Lightning's SLURMEnvironment saves an hpc checkpoint and requeues the task on SIGUSR1.
        f"#SBATCH --signal=SIG{REQUEUE['signal']}",
        "#SBATCH --requeue",
    ]
    if resources["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={resources['gpus_per_node']}")
    for key in ("partition", "account", "qos", "mem"):
        if slurm.get(key):
            lines.append(f"#SBATCH --{key}={slurm[key]}")
    lines += [f"#SBATCH {opt}" for opt in slurm.extra]
    lines += [
        "",
        f"# {n} points of a lightning-synfer sweep; written by `python run.py sweep sweep.slurm.script_only=true`.",
        "# Rerunning the sweep writes a new array over the points that have no metrics.json yet.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        *slurm.setup,
        f"POINTS={shlex.quote(str(root / 'points.txt'))}",
        'LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$POINTS")',
        'if [ -z "$LINE" ]; then echo "no point for array task $SLURM_ARRAY_TASK_ID in $POINTS" >&2; exit 1; fi',
        "# points.txt holds shell-quoted overrides (written with shlex.quote)",
        'eval "ARGS=($LINE)"',
        'RUN_DIR=""',
        'for a in "${ARGS[@]}"; do case "$a" in run_dir=*) RUN_DIR="${a#run_dir=}";; esac; done',
        'if [ -n "$RUN_DIR" ] && [ -f "$RUN_DIR/metrics.json" ]; then',
        '  echo "point $SLURM_ARRAY_TASK_ID already finished: $RUN_DIR"; exit 0',
        "fi",
        "# one task per GPU on every node; Lightning's SLURMEnvironment reads the ranks from srun's variables",
        f'srun {shlex.quote(slurm.python)} {shlex.quote(str(RUN_PY))} {task} "${{ARGS[@]}}"',
        "",
    ]
    return "\n".join(lines)


def write_slurm_script(points: Sequence[PendingPoint], *, task: str, root: Path, slurm: DictConfig,
                       resources: dict, job_name: str, log: Callable[[str], None] = print) -> Path:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    shape = shape_overrides(resources)
    atomic_write_lines(root / "points.txt", [" ".join(shlex.quote(o) for o in [*p.overrides, *shape])
                                             for p in points])
    atomic_write_lines(root / "points_names.txt", [p.name for p in points])
    script = root / "sweep.sbatch"
    atomic_write_text(script, slurm_script(points, task=task, root=root, slurm=slurm, resources=resources,
                                           job_name=job_name))
    os.chmod(script, 0o755)
    log(f"[synfer] sweep: wrote {script} ({len(points)} array tasks). Submit it with: sbatch {script}")
    return script


def launch_slurm(points: Sequence[PendingPoint], *, task: str, root: Path, slurm: DictConfig, resources: dict,
                 job_name: str, fail_fast: bool = False, log: Callable[[str], None] = print) -> LaunchResult:
    """The pending points as one job array through submitit; waits for them unless sweep.slurm.wait=false."""
    params = slurm_parameters(slurm, nodes=resources["nodes"], tasks_per_node=resources["ntasks_per_node"],
                              gpus_per_node=resources["gpus_per_node"], job_name=job_name, key="sweep.slurm")
    try:
        executor = SubmititExecutor(root / "submitit", cluster=slurm.cluster, python=slurm.python)
    except ValueError as exc:
        raise ConfigError(f"sweep.launcher=slurm: {exc}") from None
    shape = shape_overrides(resources)
    jobs = {p.name: Job(p.name, task, [*p.overrides, *shape], resources=params) for p in points}
    if not slurm.wait:
        handles = executor.start(list(jobs.values()))
        ids = [h.job.job_id for h in handles]
        log(f"[synfer] sweep: submitted {len(ids)} array tasks ({ids[0]} ...); rerun the sweep to see which "
            f"finished and to build the table")
        return LaunchResult(submitted=ids)
    log(f"[synfer] sweep: submitting {len(points)} array tasks through submitit ({slurm.cluster})")
    return _run_points(points, jobs, executor, parallel=len(points), fail_fast=fail_fast, log=log)
