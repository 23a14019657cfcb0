"""Launchers: run a sweep's pending points here (one by one or N at once) or as a SLURM job array.

Every point is an ordinary `python run.py fit ...` with its own `run_dir=`; a point is done when its
metrics.json exists (written last, atomically), so any launcher can be rerun and skips finished points.
"""
from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig

from datamodules.atomic import atomic_write_lines, atomic_write_text
from lightning_synfer.config.compose import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_PY = REPO_ROOT / "run.py"


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
    script: Optional[Path] = None
    submitted: Optional[str] = None  # sbatch's answer


def fit_command(task: str, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, str(RUN_PY), task, *overrides]


def child_environment() -> dict[str, str]:
    """The environment of a run started from this process: the run stamp is per run, never inherited."""
    return {k: v for k, v in os.environ.items() if k != "SYNFER_RUN_STAMP"}


START_METHODS = ("spawn", "fork")

# What a forked run would otherwise import itself (~10 s of a small CPU's time per run): imported once in
# the launching process, then shared copy-on-write by every fork.
FORK_PRELOAD = ("torch", "torchvision", "lightning.pytorch", "torchmetrics", "timm", "lightly.loss",
                "diffusers", "transformers", "matplotlib.pyplot", "lightning_synfer.tasks.fit",
                "lightning_synfer.tasks.synthesize", "lightning_synfer.tasks.label",
                "lightning_synfer.tasks.linear", "lightning_synfer.tasks.evaluate_generation",
                "lightning_synfer.tasks.render")


class ForkedRun:
    """`run.py TASK OVERRIDES` in a fork of this process, with a Popen-like poll/wait/terminate.

    Fork skips the child's interpreter start and imports: with torch, Lightning, timm and diffusers that is
    ~10 s a run on a 2-vCPU machine, a tenth of a miniature stage. Only for CPU runs: a process that has
    initialised CUDA cannot be forked safely, so `start_run` refuses then and `spawn` is the default."""

    def __init__(self, task: str, overrides: Sequence[str], log_file: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: Optional[int] = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                os.dup2(log_file.fileno(), 1)
                os.dup2(log_file.fileno(), 2)
                # As in a fresh interpreter: the streams and logging write to the new fds 1 and 2, not to
                # whatever objects the parent had put in their place (a test runner's capture, say).
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
                sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
                logging.root.handlers.clear()
                for key in set(os.environ) - set(child_environment()):
                    del os.environ[key]
                sys.argv = [str(RUN_PY), task, *overrides]
                from lightning_synfer.cli import main

                code = int(main([task, *overrides]) or 0)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - the traceback goes to the run's log, like a spawned run's
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def preload_for_fork() -> None:
    """Import FORK_PRELOAD here so that forked runs start with it (matplotlib on its file backend)."""
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in FORK_PRELOAD:
        importlib.import_module(name)


def start_run(task: str, overrides: Sequence[str], log_file: Any, start_method: str = "spawn"):
    """Start `run.py TASK OVERRIDES` with stdout and stderr in `log_file`: a new interpreter (`spawn`) or a
    fork of this one (`fork`, CPU runs only: see ForkedRun). Returns an object with poll/wait/terminate."""
    if start_method not in START_METHODS:
        raise ConfigError(f"start method {start_method!r}: expected one of {START_METHODS}")
    if start_method == "spawn":
        return subprocess.Popen(fit_command(task, overrides), stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=os.getcwd(), env=child_environment())
    if not hasattr(os, "fork"):
        raise ConfigError("start method 'fork' needs os.fork (Linux or macOS); use 'spawn' here")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ConfigError("start method 'fork': this process has initialised CUDA, which a fork cannot use; "
                          "use 'spawn' for GPU runs")
    return ForkedRun(task, overrides, log_file)


# ------------------------------------------------------------------------------------------ local

def run_local(points: Sequence[PendingPoint], *, task: str, root: Path, parallel: int = 1,
              use_subprocess: bool = False, fail_fast: bool = False, start_method: str = "spawn",
              log: Callable[[str], None] = print) -> LaunchResult:
    if parallel > 1 or use_subprocess:
        return _run_subprocesses(points, task=task, root=root, parallel=parallel, fail_fast=fail_fast,
                                 start_method=start_method, log=log)
    return _run_in_process(points, task=task, fail_fast=fail_fast, log=log)


def _run_in_process(points: Sequence[PendingPoint], *, task: str, fail_fast: bool,
                    log: Callable[[str], None]) -> LaunchResult:
    from lightning_synfer.tasks import load

    fn = load(task)
    result = LaunchResult()
    for i, p in enumerate(points, 1):
        log(f"[synfer] sweep {i}/{len(points)} {p.name}: running")
        t0 = time.perf_counter()
        try:
            fn(p.config, [task, *p.overrides])
        except Exception as exc:  # one failed point must not lose the rest of the sweep
            traceback.print_exc()
            result.failed[p.name] = f"{type(exc).__name__}: {exc}"
            log(f"[synfer] sweep {i}/{len(points)} {p.name}: FAILED ({type(exc).__name__}: {exc})")
            if fail_fast:
                break
            continue
        result.done.append(p.name)
        log(f"[synfer] sweep {i}/{len(points)} {p.name}: done in {time.perf_counter() - t0:.0f} s")
    return result


def _run_subprocesses(points: Sequence[PendingPoint], *, task: str, root: Path, parallel: int, fail_fast: bool,
                      start_method: str, log: Callable[[str], None]) -> LaunchResult:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = LaunchResult()
    queue = list(points)
    running: list[tuple[PendingPoint, Any, Any, float]] = []
    total = len(points)
    if start_method == "fork":
        preload_for_fork()
    stop = False
    while queue or running:
        while queue and len(running) < parallel and not stop:
            p = queue.pop(0)
            fh = open(logs / f"{p.name}.log", "w", encoding="utf-8")
            proc = start_run(task, p.overrides, fh, start_method)
            running.append((p, proc, fh, time.perf_counter()))
            log(f"[synfer] sweep {p.index + 1}/{total} {p.name}: started (pid {proc.pid}, log {fh.name})")
        if stop and not running:
            break
        time.sleep(0.2)
        for item in list(running):
            p, proc, fh, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            fh.close()
            if proc.returncode == 0 and (p.run_dir / "metrics.json").is_file():
                result.done.append(p.name)
                log(f"[synfer] sweep {p.name}: done in {time.perf_counter() - t0:.0f} s")
            else:
                result.failed[p.name] = f"exit code {proc.returncode}, log {fh.name}"
                log(f"[synfer] sweep {p.name}: FAILED (exit code {proc.returncode}; see {fh.name})")
                if fail_fast:
                    stop = True
                    queue.clear()
    return result


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


def slurm_script(points: Sequence[PendingPoint], *, task: str, root: Path, slurm: DictConfig, resources: dict,
                 job_name: str) -> str:
    """The sbatch script of a job array over `points.txt` (line i+1 = the overrides of array task i)."""
    n = len(points)
    array = f"0-{n - 1}" + (f"%{slurm.max_concurrent}" if slurm.max_concurrent else "")
    logs = root / "logs"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={resources['nodes']}",
        f"#SBATCH --ntasks-per-node={resources['ntasks_per_node']}",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
        f"#SBATCH --time={slurm.time}",
        f"#SBATCH --output={logs}/%A_%a.out",
        # Lightning's SLURMEnvironment saves an hpc checkpoint and requeues the task on SIGUSR1.
        "#SBATCH --signal=SIGUSR1@90",
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
        f"# {n} points of a lightning-synfer sweep; written by `python run.py sweep`. Rerunning the sweep writes",
        "# a new array over the points that have no metrics.json yet.",
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


def launch_slurm(points: Sequence[PendingPoint], *, task: str, root: Path, slurm: DictConfig, resources: dict,
                 job_name: str, dry_run: bool = False, log: Callable[[str], None] = print) -> LaunchResult:
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    # The allocation decides the Trainer's shape (Lightning checks it against SLURM_NNODES/NTASKS_PER_NODE).
    shape = [f"trainer.num_nodes={resources['nodes']}", f"trainer.devices={resources['ntasks_per_node']}"]
    atomic_write_lines(root / "points.txt", [" ".join(shlex.quote(o) for o in [*p.overrides, *shape])
                                             for p in points])
    atomic_write_lines(root / "points_names.txt", [p.name for p in points])
    script = root / "sweep.sbatch"
    atomic_write_text(script, slurm_script(points, task=task, root=root, slurm=slurm, resources=resources,
                                           job_name=job_name))
    os.chmod(script, 0o755)
    result = LaunchResult(script=script)
    sbatch = shutil.which("sbatch")
    if sbatch and slurm.submit and not dry_run:
        proc = subprocess.run([sbatch, str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SweepFailed(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        result.submitted = proc.stdout.strip()
        log(f"[synfer] sweep: {result.submitted} ({len(points)} array tasks, script {script})")
    else:
        why = "dry run" if dry_run else ("sweep.slurm.submit=false" if sbatch else "sbatch is not on PATH")
        log(f"[synfer] sweep: wrote {script} ({len(points)} array tasks; {why}). Submit it with: sbatch {script}")
    return result
