"""`python run.py sweep experiment=... sweep.grid.KEY=[v1,v2] ...`: a grid of ordinary `fit` runs.

    runs/<experiment>/sweep-<hash8>/          hash of the base config (experiment + non-sweep overrides)
        sweep.json                            the points, their overrides and run dirs
        <point name>/                         one run dir per point, e.g. synthetic_ratio=0.25,seed=1
        logs/, submitit/                      point logs (local processes; SLURM jobs through submitit)
        points.txt, sweep.sbatch              sweep.slurm.script_only / sweep.dry_run: the job array as a script
        table.md, table.csv, *.png            `run.py table` of the finished points (local launcher)

Every point is composed (validated) before anything runs; finished points (metrics.json) are skipped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from datamodules.atomic import atomic_write_json
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.config.sweep import validate_sweep
from lightning_synfer.sweeps.grid import flatten_grid, is_finished, plan, sweep_dir
from lightning_synfer.sweeps.launchers import (LaunchResult, PendingPoint, SweepFailed, launch_slurm, run_local,
                                               slurm_resources, write_slurm_script)


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, log=print) -> dict[str, Any]:
    validate_sweep(cfg)
    s = cfg.sweep
    if s.task == "sweep":
        raise ConfigError("sweep.task=sweep: expected a task that trains or evaluates one run (fit, linear, ...)")
    from lightning_synfer.tasks import TASKS

    if s.task not in TASKS:
        raise ConfigError(f"sweep.task={s.task!r}: expected one of {sorted(t for t in TASKS if t != 'sweep')}")
    args = list(argv or [])[1:]  # argv[0] is the task name
    root = sweep_dir(cfg)
    planned = plan(cfg, args, root=root)
    points = [PendingPoint(index=p.index, name=p.name, label=p.label(), run_dir=run_dir, overrides=overrides,
                           config=point_cfg) for p, run_dir, point_cfg, overrides in planned]
    pending = [p for p in points if not is_finished(p.run_dir)]
    finished = [p.name for p in points if is_finished(p.run_dir)]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "sweep.json", {
        "experiment": cfg.experiment, "task": s.task, "launcher": s.launcher,
        "grid": flatten_grid(cfg.sweep.grid),
        "argv": args, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "points": [{"index": p.index, "name": p.name, "values": planned[i][0].values, "run_dir": str(p.run_dir),
                    "overrides": p.overrides} for i, p in enumerate(points)],
    })
    log(f"[synfer] sweep {root}: {len(points)} points, {len(finished)} finished, {len(pending)} to run "
        f"(launcher {s.launcher})")
    for p in points:
        log(f"  {p.index:>3} {'done' if p.name in finished else 'todo'}  {p.name}")
    summary: dict[str, Any] = {"sweep_dir": str(root), "points": [p.name for p in points], "skipped": finished,
                               "pending": [p.name for p in pending]}
    result = _launch(cfg, pending, root, summary, log)
    if result is None:  # a dry run, a script, jobs left running on SLURM, or nothing to do
        return summary
    summary.update(done=result.done, failed=result.failed)
    if s.table and any(is_finished(p.run_dir) for p in points):
        from lightning_synfer.sweeps.table import build_tables

        tables = build_tables([p.run_dir for p in points if is_finished(p.run_dir)], out=root)
        log(tables.markdown)
        log(f"[synfer] sweep table: {root / 'table.md'}")
    if result.failed:
        lines = "; ".join(f"{name}: {why}" for name, why in result.failed.items())
        raise SweepFailed(f"{len(result.failed)} of {len(pending)} sweep points failed ({lines}). "
                          f"Fix and rerun the same command: finished points are skipped.")
    return summary


def _launch(cfg: DictConfig, pending: list[PendingPoint], root: Path, summary: dict[str, Any],
            log) -> Optional[LaunchResult]:
    """Run (or submit, or write the script of) the pending points; None where nothing ran to its end here."""
    s = cfg.sweep
    if s.launcher == "local":
        if s.dry_run:
            return None
        return run_local(pending, task=s.task, root=root, parallel=s.parallel, use_subprocess=s.subprocess,
                         fail_fast=s.fail_fast, start_method=s.start_method, log=log)
    if not pending:
        log("[synfer] sweep: every point has finished; nothing to submit")
        return None
    resources = slurm_resources(s.slurm, pending[0].config.trainer)
    job = s.slurm.job_name or f"synfer-{cfg.experiment.replace('/', '-')}"
    if s.slurm.script_only or s.dry_run:
        script = write_slurm_script(pending, task=s.task, root=root, slurm=s.slurm, resources=resources,
                                    job_name=job, log=log)
        summary.update(script=str(script))
        return None
    result = launch_slurm(pending, task=s.task, root=root, slurm=s.slurm, resources=resources, job_name=job,
                          fail_fast=s.fail_fast, log=log)
    summary.update(submitted=result.submitted)
    return result if s.slurm.wait else None
