"""`python run.py` / `python run.py pipeline [experiment=pipeline/embedded]`: the SynFER pipeline as stages.

Each stage is an ordinary task run (see experiments/pipeline/embedded.yaml), cached by a hash of its
config and inputs; the report turns the stages' metrics into paper-shaped tables and plots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from lightning_synfer.pipeline.report import build_report
from lightning_synfer.pipeline.runner import run_pipeline


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    stages = run_pipeline(cfg)
    if cfg.pipeline.dry_run:
        return {}
    root = Path(cfg.pipeline.out) / cfg.experiment.replace("/", "_")
    titles = {s.name: s.title or s.name for s in cfg.pipeline.stages}
    heading = {"heading": cfg.pipeline.report.heading} if cfg.pipeline.report.get("heading") else {}
    text = build_report(stages, root / "report", titles, tables=cfg.pipeline.tables, **heading)
    print(text, flush=True)
    print(f"[synfer] report: {root / 'report' / 'report.md'}", flush=True)
    return {"stages": {k: v.get("metrics", {}) for k, v in stages.items()}}
