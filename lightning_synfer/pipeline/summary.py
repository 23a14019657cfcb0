"""report/summary.json: the figures a pipeline is meant to show, under stable keys (`pipeline.summary`).

Each key names a metric of one stage's metrics.json, or the best of several stages' (then `<key>_stage` says
which, and `config` copies keys of the winner's config, e.g. `mixed_ratio` <- data.mix.synthetic_ratio). Always
added: `pipeline_seconds` (wall time of this run, cached stages count 0) and `precision`, the trainer precision
`auto` chose (from the stages' provenance), with its reason. Missing figures are null, never guessed. A stage with seed copies (`pipeline.repeat`) gives the mean over them,
with `<key>_std` (sample std) and `<key>_seeds`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import json

from datamodules.atomic import atomic_write_json
from lightning_synfer.pipeline.report import _cfg as _stage_config, _get


def _precision(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The precision the training stages ran at (the most common one) and why `auto` chose it."""
    seen: Counter = Counter()
    reasons: dict[str, str] = {}
    for rec in stages.values():
        path = Path(rec["run_dir"]) / "provenance.json"
        if rec.get("task") != "fit" or not path.is_file():
            continue
        hw = json.loads(path.read_text()).get("hardware") or {}
        if hw.get("precision"):
            seen[hw["precision"]] += 1
            reasons.setdefault(hw["precision"], hw.get("precision_reason", ""))
    if not seen:
        return {"precision": None, "precision_reason": None}
    best = seen.most_common(1)[0][0]
    return {"precision": best, "precision_reason": reasons[best], "precision_by_stage": dict(seen)}


def build_summary(stages: dict[str, dict[str, Any]], figures: dict[str, Any], pipeline_seconds: Optional[float],
                  cpu_model: Optional[str] = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fig in figures.items():
        groups = []  # (stage, its value and those of its seed copies `<stage>_seed<N>`, pipeline.repeat)
        for name in fig["stages"]:
            members = [name, *(k for k in stages if k.startswith(f"{name}_seed") and k[len(name) + 5:].isdigit())]
            vals = [_get(stages[m].get("metrics") or {}, fig["metric"]) for m in members]
            vals = [float(v) for v in vals if isinstance(v, (int, float))]
            if vals:
                groups.append((name, vals))
        if not groups:
            out[key] = None
            continue
        name, vals = max(groups, key=lambda g: sum(g[1]) / len(g[1]))
        out[key] = sum(vals) / len(vals)
        if len(vals) > 1:
            mean = out[key]
            out[f"{key}_std"] = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
            out[f"{key}_seeds"] = len(vals)
        if len(fig["stages"]) > 1:
            out[f"{key}_stage"] = name
        cfg = _stage_config(stages[name]) if fig.get("config") else {}
        for extra, dotted in (fig.get("config") or {}).items():
            out[extra] = _get(cfg, dotted)
    out["pipeline_seconds"] = pipeline_seconds
    out.update(_precision(stages))
    out["cpu_model"] = cpu_model
    return out


def write_summary(path: Path, stages: dict[str, dict[str, Any]], figures: dict[str, Any],
                  pipeline_seconds: Optional[float]) -> dict[str, Any]:
    from lightning_synfer.hardware import cpu_model_name

    summary = build_summary(stages, figures, pipeline_seconds, cpu_model_name())
    atomic_write_json(path, summary)
    return summary
