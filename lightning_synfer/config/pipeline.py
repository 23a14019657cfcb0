"""Config section `pipeline`: the main job as a list of stages, each an ordinary run.py task."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


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


@dataclass
class PipelineConfig:
    out: str = "${paths.runs_dir}/pipeline"
    common: List[str] = field(default_factory=list)  # overrides applied to every stage, before its own
    force: List[str] = field(default_factory=list)  # applied to every stage AFTER its own (shrinking for smoke runs)
    stages: List[StageConfig] = field(default_factory=list)
    # 1: stages one by one in this process. N > 1: each stage its own `run.py` process, up to N at once,
    # a stage starting as soon as the stages it depends on are done.
    parallel: int = 1
    # How a stage process starts when parallel > 1: `spawn` (a fresh `python run.py`, safe everywhere) or
    # `fork` (a fork of the runner, which has imported torch & co. once: ~10 s less per stage; CPU only).
    start_method: str = "spawn"
    report: Dict[str, str] = field(default_factory=dict)  # report builder options (see pipeline/report.py)
