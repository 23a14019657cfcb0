"""Run a pipeline of stages with a cache keyed by each stage's config and its inputs.

A stage is an ordinary task (fit, synthesize, label, linear, ...) composed from an experiment plus
overrides. Its cache key hashes the task, the experiment file's resolved config and the keys of the
stages whose artifacts it reads, so changing an upstream stage re-runs everything downstream, and a
rerun reuses every finished stage. A finished stage leaves `stage.json` (written last, atomically);
a failed stage leaves none and is retried on the next run without redoing the stages before it.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.atomic import atomic_write_json
from lightning_synfer.config.compose import ConfigError, compose, to_container

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\}")


class StageFailed(RuntimeError):
    pass


def _task_function(task: str) -> Callable:
    from lightning_synfer.cli import TASKS, _load

    if task not in TASKS or task == "pipeline":
        raise ConfigError(f"pipeline stage task={task!r}: expected one of {sorted(t for t in TASKS if t != 'pipeline')}")
    return _load(TASKS[task][0])


def _upstream(overrides: list[str]) -> list[str]:
    return sorted({m.group(1) for o in overrides for m in PLACEHOLDER.finditer(o)})


def _substitute(text: str, done: dict[str, dict[str, Any]], run_dir: Path, stage: str) -> str:
    def repl(match: re.Match) -> str:
        name, key = match.group(1), match.group(2)
        if name not in done:
            raise ConfigError(f"pipeline stage '{stage}': {{{name}.{key}}} refers to stage '{name}', "
                              f"which does not run before it")
        artifacts = done[name]["artifacts"]
        if key not in artifacts:
            raise ConfigError(f"pipeline stage '{stage}': stage '{name}' has no artifact '{key}' "
                              f"(it has {sorted(artifacts)})")
        return str(artifacts[key])

    return PLACEHOLDER.sub(repl, text.replace("{run}", str(run_dir)))


def stage_key(stage: DictConfig, common: list[str], done: dict[str, dict[str, Any]],
              force: tuple[str, ...] = ()) -> str:
    overrides = [*common, *stage.overrides, *force]
    upstream = {name: done[name]["key"] for name in _upstream(overrides) if name in done}
    blob = json.dumps({"task": stage.task, "experiment": stage.experiment, "overrides": overrides,
                       "upstream": upstream}, sort_keys=True)
    # The experiment file's content matters too: editing it invalidates the stage.
    try:
        blob += json.dumps(to_container(compose(stage.experiment, [], validate_values=False)), sort_keys=True,
                           default=str)
    except ConfigError:
        pass
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_pipeline(cfg: DictConfig, *, only: Optional[list[str]] = None, log: Callable[[str], None] = print
                 ) -> dict[str, dict[str, Any]]:
    pipe = cfg.pipeline
    if not pipe.stages:
        raise ConfigError(f"experiment={cfg.experiment}: pipeline.stages is empty")
    names = [s.name for s in pipe.stages]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"pipeline.stages: every stage needs a unique name, got {names}")
    root = Path(pipe.out) / cfg.experiment.replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    common = list(pipe.common)
    done: dict[str, dict[str, Any]] = {}
    total = len(pipe.stages)
    started = time.perf_counter()
    for i, stage in enumerate(pipe.stages, 1):
        key = stage_key(stage, common, done, tuple(pipe.force))
        stage_dir = root / f"{i:02d}-{stage.name}-{key}"
        marker = stage_dir / "stage.json"
        title = stage.title or stage.name
        if marker.is_file():
            done[stage.name] = json.loads(marker.read_text())
            log(f"[synfer] stage {i}/{total} {title}: cached ({stage_dir})")
            continue
        run_dir = stage_dir / "run"
        overrides = [_substitute(o, done, run_dir, stage.name) for o in [*common, *stage.overrides, *pipe.force]]
        overrides += [f"run_dir={run_dir}", "overwrite=true"]
        log(f"[synfer] stage {i}/{total} {title}: running `run.py {stage.task} experiment={stage.experiment}`")
        t0 = time.perf_counter()
        stage_cfg = compose(stage.experiment, overrides)
        try:
            metrics = _task_function(stage.task)(stage_cfg, [stage.task, *overrides]) or {}
        except Exception as exc:
            raise StageFailed(f"pipeline stage {i}/{total} '{stage.name}' failed: {exc}. Fix it and rerun: "
                              f"finished stages are reused.") from exc
        artifacts = {}
        for name, rel in stage.artifacts.items():
            path = run_dir / rel
            if not path.exists():
                raise StageFailed(f"pipeline stage '{stage.name}' finished without its artifact '{name}' ({path})")
            artifacts[name] = str(path)
        record = {"stage": stage.name, "task": stage.task, "experiment": stage.experiment, "key": key,
                  "run_dir": str(run_dir), "artifacts": artifacts, "overrides": overrides,
                  "wall_time_s": time.perf_counter() - t0, "metrics": metrics}
        atomic_write_json(marker, record)
        done[stage.name] = json.loads(marker.read_text())
        log(f"[synfer] stage {i}/{total} {title}: done in {record['wall_time_s']:.0f} s")
    log(f"[synfer] pipeline finished in {time.perf_counter() - started:.0f} s ({root})")
    atomic_write_json(root / "pipeline.json", {"experiment": cfg.experiment, "stages": done,
                                               "config": OmegaConf.to_container(cfg.pipeline, resolve=True)})
    return done
