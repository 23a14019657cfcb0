"""`python run.py` / `python run.py pipeline [experiment=pipeline/embedded]`: the SynFER pipeline as stages.

Each stage is an ordinary task run (see experiments/pipeline/embedded.yaml), cached by a hash of its
config and inputs; the report turns the stages' metrics into paper-shaped tables and plots.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_synfer.pipeline.report import build_report
from lightning_synfer.pipeline.runner import run_pipeline
from lightning_synfer.pipeline.summary import write_summary


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    started = time.perf_counter()
    stages = run_pipeline(cfg)
    if cfg.pipeline.dry_run:
        return {}
    seconds = time.perf_counter() - started
    root = Path(cfg.pipeline.out) / cfg.experiment.replace("/", "_")
    titles = {s.name: s.title or s.name for s in cfg.pipeline.stages}
    heading = {"heading": cfg.pipeline.report.heading} if cfg.pipeline.report.get("heading") else {}
    text = build_report(stages, root / "report", titles, tables=cfg.pipeline.tables, **heading)
    print(text, flush=True)
    print(f"[synfer] report: {root / 'report' / 'report.md'}", flush=True)
    summary = write_summary(root / "report" / "summary.json", stages,
                            OmegaConf.to_container(cfg.pipeline.summary, resolve=True), seconds)
    if cfg.pipeline.summary:
        print("[synfer] summary: " + ", ".join(f"{k}={_show(v)}" for k, v in summary.items()
                                               if k in cfg.pipeline.summary or k in ("pipeline_seconds", "precision")),
              flush=True)
        print(f"[synfer] summary: {root / 'report' / 'summary.json'}", flush=True)
    return {"stages": {k: v.get("metrics", {}) for k, v in stages.items()}, "summary": summary}


def _show(value: Any) -> str:
    if isinstance(value, float) and 0 <= value <= 1:
        return f"{100 * value:.2f}%"
    return f"{value:.0f}" if isinstance(value, float) else str(value)
