"""Config section `sweep`: a grid of overrides, each point an ordinary `fit` run (see lightning_synfer/sweeps/).

    python run.py sweep experiment=sweeps/embedded_ratio \
        sweep.grid.data.mix.synthetic_ratio=[0,0.25,0.5,0.75,1] sweep.grid.seed=[0,1,2]

`grid` maps dotted config keys (or group names: `model`, `trainer`...) to lists of values. From the command
line OmegaConf nests `sweep.grid.data.mix.synthetic_ratio` into dicts; `sweeps.grid.flatten_grid` turns
them back into dotted keys, so YAML may use either form.

The names the scheduler accepts (START_METHODS, CLUSTERS) live here, in the config package, and nowhere else:
`lightning_synfer/scheduling/` imports them from here (never the reverse), as does the pipeline section.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lightning_synfer.config.choices import AUTO
from lightning_synfer.config.errors import ConfigError, check

# How a local job process starts: `spawn` a fresh `python run.py TASK ...`, or `forkserver`: fork a server process
# that imported torch, Lightning, timm and diffusers once and never ran anything (no threads to deadlock a fork).
START_METHODS = ("spawn", "forkserver")
# submitit's executors: `slurm` submits to SLURM; `local` runs the same submission as local processes and `debug`
# in this process (both need no SLURM: tests and trying a SLURM config on a laptop).
CLUSTERS = ("slurm", "local", "debug")
LAUNCHERS = ("local", "slurm")
# A SLURM time limit: [D-]HH:MM:SS, HH:MM or MM.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmConfig:
    """`sweep.launcher=slurm`: one job array through submitit, one array task per unfinished point; the same
    fields give a pipeline stage's SLURM defaults (`pipeline.slurm`)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"  # [D-]HH:MM:SS: submitit's timeout_min
    nodes: Optional[int] = None  # None: trainer.num_nodes of the points
    gpus_per_node: Optional[int] = None  # None: trainer.devices when it is a positive int (0 for accelerator=cpu)
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. 256G (per node)
    max_concurrent: Optional[int] = None  # array throttle (submitit's slurm_array_parallelism)
    job_name: Optional[str] = None  # None: synfer-<experiment>
    setup: List[str] = field(default_factory=list)  # shell lines before srun (module load, source venv, ...)
    extra: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=a100"]
    python: str = "python"  # the interpreter of the jobs (submitit: the `python` of slurm_python)
    cluster: str = "slurm"  # slurm | local | debug (submitit's executors; the last two need no SLURM)
    script_only: bool = False  # write sweep.sbatch (an sbatch job array over points.txt) instead of submitting
    wait: bool = True  # wait for the jobs (and build the table) like a local sweep; false: submit and return


@dataclass
class SweepConfig:
    grid: Dict[str, Any] = field(default_factory=dict)  # dotted key -> list of values (cartesian product)
    task: str = "fit"  # the task each point runs
    launcher: str = "local"  # local | slurm
    parallel: Any = 1  # local: points at once (> 1 runs them as processes); `auto`: from the CPUs
    subprocess: bool = False  # local: run points as `python run.py fit ...` processes even one at a time
    # local, as processes: `spawn` a fresh interpreter per point, or `forkserver` (~10 s less per point on a
    # small CPU: imports are done once; see START_METHODS)
    start_method: str = "spawn"
    out: Optional[str] = None  # sweep folder; None: <paths.runs_dir>/<experiment>/sweep-<hash8>
    dry_run: bool = False  # list the points (and write the SLURM script) without running anything
    fail_fast: bool = False  # stop starting points at the first failed one instead of running the rest
    table: bool = True  # build the results table in the sweep folder when the points are done
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def check_parallel(value: Any, key: str) -> None:
    """`parallel`: a number of processes >= 1, or `auto`."""
    ok = value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    check(ok, key, value, "a number of processes >= 1 or 'auto'")


def check_start_method(value: Any, key: str) -> None:
    if value == "fork":
        raise ConfigError(f"config key '{key}' = 'fork' is now 'forkserver': a fork of a clean, preloaded server "
                          f"instead of the runner, which may hold threads (docs/BENCHMARKS.md)")
    check(value in START_METHODS, key, value, f"one of {', '.join(START_METHODS)}")


def timeout_minutes(text: str, key: str) -> int:
    """A SLURM time limit ([D-]HH:MM:SS, HH:MM or MM) in minutes, rounded up."""
    match = _TIME.match(str(text).strip())
    check(match is not None, key, text, "a time limit like 24:00:00, 1-12:00:00 or 90 (minutes)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if second is None:  # MM
        minutes, seconds = first, 0
    elif third is None:  # HH:MM
        minutes, seconds = first * 60 + second, 0
    else:  # HH:MM:SS
        minutes, seconds = first * 60 + second, third
    total = (days or 0) * 24 * 60 + minutes + (1 if seconds else 0)
    check(total >= 1, key, text, "at least one minute")
    return total


def validate_slurm(slurm: Any, prefix: str) -> None:
    check(slurm.cluster in CLUSTERS, f"{prefix}.cluster", slurm.cluster, f"one of {', '.join(CLUSTERS)}")
    check(slurm.cpus_per_task >= 1, f"{prefix}.cpus_per_task", slurm.cpus_per_task, ">= 1")
    timeout_minutes(slurm.time, f"{prefix}.time")
    for key in ("nodes", "gpus_per_node", "max_concurrent"):
        value = slurm.get(key)
        if value is not None:
            check(value >= (0 if key == "gpus_per_node" else 1), f"{prefix}.{key}", value,
                  "a positive number or null")


def validate_sweep(cfg: Any) -> None:
    s = cfg.sweep
    check(s.launcher in LAUNCHERS, "sweep.launcher", s.launcher, f"one of {', '.join(LAUNCHERS)}")
    check_parallel(s.parallel, "sweep.parallel")
    check_start_method(s.start_method, "sweep.start_method")
    validate_slurm(s.slurm, "sweep.slurm")
