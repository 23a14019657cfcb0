"""Config section `sweep`: a grid of overrides, each point an ordinary `fit` run (see lightning_synfer/sweeps/).

    python run.py sweep experiment=sweeps/embedded_ratio \
        sweep.grid.data.mix.synthetic_ratio=[0,0.25,0.5,0.75,1] sweep.grid.seed=[0,1,2]

`grid` maps dotted config keys (or group names: `model`, `trainer`...) to lists of values. From the command
line OmegaConf nests `sweep.grid.data.mix.synthetic_ratio` into dicts; `sweeps.grid.flatten_grid` turns
them back into dotted keys, so YAML may use either form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class SlurmConfig:
    """`sweep.launcher=slurm`: one sbatch job array, one array task per unfinished point."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    nodes: Optional[int] = None  # None: trainer.num_nodes of the points
    gpus_per_node: Optional[int] = None  # None: trainer.devices when it is a positive int (0 for accelerator=cpu)
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. 256G (per node)
    max_concurrent: Optional[int] = None  # array throttle: --array=0-N%max_concurrent
    job_name: Optional[str] = None  # None: synfer-<experiment>
    setup: List[str] = field(default_factory=list)  # shell lines before srun (module load, source venv, ...)
    extra: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=a100"]
    python: str = "python"
    submit: bool = True  # run sbatch when it is on PATH; otherwise only write the script


@dataclass
class SweepConfig:
    grid: Dict[str, Any] = field(default_factory=dict)  # dotted key -> list of values (cartesian product)
    task: str = "fit"  # the task each point runs
    launcher: str = "local"  # local | slurm
    parallel: int = 1  # local: points at once (> 1 runs them as subprocesses)
    subprocess: bool = False  # local: run points as `python run.py fit ...` subprocesses even one at a time
    # local, as subprocesses: `spawn` a fresh interpreter per point, or `fork` this one, which has imported
    # torch & co. once (~10 s less per point on a small CPU; CPU runs only)
    start_method: str = "spawn"
    out: Optional[str] = None  # sweep folder; None: <paths.runs_dir>/<experiment>/sweep-<hash8>
    dry_run: bool = False  # list the points (and write the launcher files) without running anything
    fail_fast: bool = False  # local: stop at the first failed point instead of running the rest
    table: bool = True  # local: build the results table in the sweep folder when the points are done
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


LAUNCHERS = ("local", "slurm")


def validate_sweep(cfg: Any) -> None:
    from lightning_synfer.config.compose import ConfigError

    s = cfg.sweep
    if s.launcher not in LAUNCHERS:
        raise ConfigError(f"config key 'sweep.launcher' = {s.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if s.parallel < 1:
        raise ConfigError(f"config key 'sweep.parallel' = {s.parallel!r}: expected a number of processes >= 1")
    from lightning_synfer.sweeps.launchers import START_METHODS

    if s.start_method not in START_METHODS:
        raise ConfigError(f"config key 'sweep.start_method' = {s.start_method!r}: expected one of "
                          f"{', '.join(START_METHODS)}")
    if s.slurm.cpus_per_task < 1:
        raise ConfigError(f"config key 'sweep.slurm.cpus_per_task' = {s.slurm.cpus_per_task!r}: expected >= 1")
    for key in ("nodes", "gpus_per_node", "max_concurrent"):
        value = s.slurm.get(key)
        if value is not None and value < (0 if key == "gpus_per_node" else 1):
            raise ConfigError(f"config key 'sweep.slurm.{key}' = {value!r}: expected a positive number or null")
