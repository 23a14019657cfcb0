"""Config section `pipeline`: the main job as a list of stages, each an ordinary run.py task."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from lightning_synfer.config.errors import check
from lightning_synfer.config.sweep import SlurmConfig, check_parallel, check_start_method, timeout_minutes

EXECUTORS = ("local", "slurm")


@dataclass
class StageResources:
    """What one stage asks SLURM for (`pipeline.executor=slurm`); null: the `pipeline.slurm` default."""

    gpus: Optional[int] = None  # GPUs per node
    nodes: Optional[int] = None
    time: Optional[str] = None  # [D-]HH:MM:SS
    partition: Optional[str] = None
    cpus: Optional[int] = None  # CPUs per task
    mem: Optional[str] = None  # e.g. 64G per node


@dataclass
class StageConfig:
    name: str = ""
    task: str = "fit"  # any task of lightning_synfer.tasks.TASKS
    experiment: str = ""
    # Overrides may use {STAGE.ARTIFACT} for an earlier stage's artifact and {run} for this stage's run dir.
    overrides: List[str] = field(default_factory=list)
    # artifact name -> path relative to the stage's run dir (checked to exist when the stage finishes)
    artifacts: Dict[str, str] = field(default_factory=dict)
    title: str = ""  # shown in progress lines and report tables
    # Stages this one waits for besides those whose artifacts it reads: inputs passed another way
    # (the render stage's cache files). With pipeline.parallel > 1 independent stages overlap.
    after: List[str] = field(default_factory=list)
    resources: StageResources = field(default_factory=StageResources)
    # Seconds the stage took on the machine of `pipeline.reference` (the plan scales it to this machine's speed)
    estimate_s: Optional[float] = None


@dataclass
class ReferenceMachine:
    """Where the stages' estimate_s were measured: its CPU and its pipeline/estimate.speed_probe score."""

    machine: str = ""
    probe: Optional[float] = None  # img/s of speed_probe there


@dataclass
class TableCell:
    """One number of a report table: a metric of a stage's metrics.json beside the paper's value."""

    stage: str = ""
    metric: str = ""  # dotted path into the stage's metrics.json, e.g. test.accuracy or fer_accuracy
    paper: Optional[float] = None  # the paper's number (null: the paper gives none)
    percent: bool = True  # metric is a fraction shown in % (FID/KID: false)


@dataclass
class TableRow:
    name: str = ""
    cells: List[TableCell] = field(default_factory=list)


@dataclass
class ReportTable:
    """A paper table in the pipeline report: one row per entry, every cell `ours (paper)`."""

    title: str = ""
    columns: List[str] = field(default_factory=list)  # one per cell of each row
    note: str = ""
    rows: List[TableRow] = field(default_factory=list)


@dataclass
class SummaryFigure:
    """One figure of report/summary.json: a metric of one stage, or the best of several stages (with which won)."""

    stages: List[str] = field(default_factory=list)
    metric: str = "test.accuracy"  # dotted path into each stage's metrics.json
    # extra summary keys read from the winning stage's config: {summary key: dotted config key}
    config: Dict[str, str] = field(default_factory=dict)


@dataclass
class RepeatConfig:
    """Seed copies of some stages (`<name>_seed<N>`, run with seed=N): summary figures become mean ± std over them."""

    seeds: List[int] = field(default_factory=list)  # the first is the stages' own run; the others are copies
    stages: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    out: str = "${paths.runs_dir}/pipeline"
    common: List[str] = field(default_factory=list)  # overrides applied to every stage, before its own
    force: List[str] = field(default_factory=list)  # applied to every stage AFTER its own (shrinking for smoke runs)
    # stage name -> overrides applied after that stage's own and before `force`: an overlay experiment (a child of
    # the full pipeline, e.g. pipeline/paper_tiny) shrinks single stages without writing the stage list again.
    stage_overrides: Dict[str, List[str]] = field(default_factory=dict)
    stages: List[StageConfig] = field(default_factory=list)
    # Appended to `stages`: an overlay experiment (a child of another pipeline, e.g. pipeline/embedded_long) adds
    # stages without restating its parent's list.
    extra_stages: List[StageConfig] = field(default_factory=list)
    repeat: RepeatConfig = field(default_factory=RepeatConfig)
    reference: ReferenceMachine = field(default_factory=ReferenceMachine)  # of the stages' estimate_s
    # 1: stages one by one in this process. N > 1: each stage its own `run.py` process, up to N at once,
    # a stage starting as soon as the stages it depends on are done. `auto`: N from the CPUs.
    parallel: Any = 1
    # How a stage process starts when parallel > 1: `spawn` (a fresh `python run.py`, safe everywhere) or
    # `forkserver` (a fork of a server that imported torch & co. once: ~10 s less per stage).
    start_method: str = "spawn"
    # local: stages on this machine (as above). slurm: every stage a SLURM job through submitit, with
    # `pipeline.slurm` as the defaults and each stage's `resources`; `pipeline.parallel` jobs at once.
    executor: str = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    report: Dict[str, str] = field(default_factory=dict)  # report builder options (see pipeline/report.py)
    tables: List[ReportTable] = field(default_factory=list)  # paper tables of the report (ours beside the paper's)
    # report/summary.json: stable keys for the figures the pipeline is meant to show (pipeline/summary.py);
    # pipeline_seconds and precision are always added.
    summary: Dict[str, SummaryFigure] = field(default_factory=dict)
    # Print every stage (dependencies, resources, the command, cached or not) and run nothing (`--dry-run`).
    dry_run: bool = False


def seed_copy_name(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


def expand_stages(pipe: Any) -> None:
    """`stages` + `extra_stages`, then the `repeat` seed copies right after their stage (in place, once, by compose).

    A copy reads the copies of the repeated stages it depends on ({ssl_real.ckpt} -> {ssl_real_seed1.ckpt}).
    """
    if not pipe.extra_stages and not pipe.repeat.seeds:
        return
    stages = [*pipe.stages, *pipe.extra_stages]
    names = [s.name for s in stages]
    repeated = list(pipe.repeat.stages)
    for name in repeated:
        check(name in names, "pipeline.repeat.stages", name, f"one of the stages {names}")
    check(len(set(pipe.repeat.seeds)) == len(pipe.repeat.seeds), "pipeline.repeat.seeds", list(pipe.repeat.seeds),
          "distinct seeds")
    out = []
    for stage in stages:
        out.append(stage)
        if stage.name not in repeated:
            continue
        for seed in list(pipe.repeat.seeds)[1:]:
            def rename(text: str) -> str:
                for other in repeated:
                    text = text.replace("{" + other + ".", "{" + seed_copy_name(other, seed) + ".")
                return text

            copy = OmegaConf.to_container(stage)
            copy["name"] = seed_copy_name(stage.name, seed)
            copy["title"] = f"{stage.title or stage.name} (seed {seed})"
            copy["overrides"] = [rename(o) for o in copy["overrides"]] + [f"seed={seed}"]
            copy["after"] = [seed_copy_name(a, seed) if a in repeated else a for a in copy["after"]]
            out.append(OmegaConf.merge(OmegaConf.structured(StageConfig), copy))
    pipe.stages = out  # extra_stages stays as written: the record of what the overlay added


def validate_pipeline(pipe: Any) -> None:
    """The pipeline section's own checks (the stage graph is checked by pipeline/runner.py)."""
    check_parallel(pipe.parallel, "pipeline.parallel")
    check_start_method(pipe.start_method, "pipeline.start_method")
    check(pipe.executor in EXECUTORS, "pipeline.executor", pipe.executor, f"one of {', '.join(EXECUTORS)}")
    names = [stage.name for stage in pipe.stages]
    for name in pipe.stage_overrides:
        check(name in names, f"pipeline.stage_overrides.{name}", list(pipe.stage_overrides[name]),
              f"overrides of one of the stages {names}")
    for table in pipe.tables:
        for row in table.rows:
            check(len(row.cells) == len(table.columns), f"pipeline.tables[{table.title}].rows[{row.name}].cells",
                  len(row.cells), f"one cell per column ({len(table.columns)}: {list(table.columns)})")
            for cell in row.cells:
                check(cell.stage in names, f"pipeline.tables[{table.title}].rows[{row.name}].cells.stage", cell.stage,
                      f"one of the stages {names}")
    for key, figure in pipe.summary.items():
        check(bool(figure.stages), f"pipeline.summary.{key}.stages", list(figure.stages), "at least one stage name")
        for name in figure.stages:
            check(name in names, f"pipeline.summary.{key}.stages", name, f"one of the stages {names}")
    for stage in pipe.stages:
        res = stage.resources
        key = f"pipeline.stages[{stage.name}].resources"
        if res.time is not None:
            timeout_minutes(res.time, f"{key}.time")
        for name in ("gpus", "nodes", "cpus"):
            value = res.get(name)
            if value is not None:
                check(value >= (0 if name == "gpus" else 1), f"{key}.{name}", value, "a positive number or null")
