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
    from lightning_synfer.tasks import TASKS, load

    if task not in TASKS or task == "pipeline":
        raise ConfigError(f"pipeline stage task={task!r}: expected one of {sorted(t for t in TASKS if t != 'pipeline')}")
    return load(task)


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
    upstream = {name: done[name]["key"] for name in [*_upstream(overrides), *stage.get("after", [])] if name in done}
    blob = json.dumps({"task": stage.task, "experiment": stage.experiment, "overrides": overrides,
                       "upstream": upstream}, sort_keys=True)
    # The experiment file's content matters too: editing it invalidates the stage.
    try:
        blob += json.dumps(to_container(compose(stage.experiment, [], validate_values=False)), sort_keys=True,
                           default=str)
    except ConfigError:
        pass
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def stage_dependencies(stage: DictConfig, common: list[str], force: tuple[str, ...], earlier: list[str]) -> list[str]:
    """The stages this one waits for: those whose artifacts it reads ({STAGE.ARTIFACT}) and those named in
    `after` (inputs passed another way, e.g. the render stage's cache files). All must come earlier in the list."""
    deps = sorted(set(_upstream([*common, *stage.overrides, *force])) | set(stage.after))
    for name in deps:
        if name not in earlier:
            raise ConfigError(f"pipeline stage '{stage.name}': it needs stage '{name}', which does not run before "
                              f"it (stages before it: {earlier})")
    return deps


def _start_stage(stage: DictConfig, overrides: list[str], log_file: Any, start_method: str) -> Any:
    from lightning_synfer.sweeps.launchers import start_run

    return start_run(stage.task, [f"experiment={stage.experiment}", *overrides], log_file, start_method)


def run_pipeline(cfg: DictConfig, *, only: Optional[list[str]] = None, log: Callable[[str], None] = print
                 ) -> dict[str, dict[str, Any]]:
    """Run the stages in list order, each once its dependencies are done.

    pipeline.parallel=1 runs them one by one in this process. pipeline.parallel=N runs each stage as its own
    `python run.py TASK ...` process, up to N at once (independent stages overlap: on a 2-vCPU machine the
    generator trains beside the classifier; on a multi-GPU node give each stage its own device). A failed
    stage stops new starts; the running ones finish (and are cached), then the failure is raised.
    """
    pipe = cfg.pipeline
    if not pipe.stages:
        raise ConfigError(f"experiment={cfg.experiment}: pipeline.stages is empty")
    names = [s.name for s in pipe.stages]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"pipeline.stages: every stage needs a unique name, got {names}")
    if pipe.parallel < 1:
        raise ConfigError(f"pipeline.parallel={pipe.parallel}: expected at least 1 stage at a time")
    from lightning_synfer.sweeps.launchers import START_METHODS, preload_for_fork

    if pipe.start_method not in START_METHODS:
        raise ConfigError(f"pipeline.start_method={pipe.start_method!r}: expected one of {START_METHODS}")
    if pipe.parallel > 1 and pipe.start_method == "fork":
        preload_for_fork()
    root = Path(pipe.out) / cfg.experiment.replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    common, force = list(pipe.common), tuple(pipe.force)
    deps = {s.name: stage_dependencies(s, common, force, names[:i]) for i, s in enumerate(pipe.stages)}
    done: dict[str, dict[str, Any]] = {}
    total = len(pipe.stages)
    started = time.perf_counter()
    pending = list(enumerate(pipe.stages, 1))
    running: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
    failure: Optional[StageFailed] = None

    def finish_stage(job: dict[str, Any], metrics: dict[str, Any]) -> None:
        stage, run_dir = job["stage"], job["run_dir"]
        artifacts = {}
        for name, rel in stage.artifacts.items():
            path = run_dir / rel
            if not path.exists():
                raise StageFailed(f"pipeline stage '{stage.name}' finished without its artifact '{name}' ({path})")
            artifacts[name] = str(path)
        record = {"stage": stage.name, "task": stage.task, "experiment": stage.experiment, "key": job["key"],
                  "run_dir": str(run_dir), "artifacts": artifacts, "overrides": job["overrides"],
                  "wall_time_s": time.perf_counter() - job["t0"], "metrics": metrics}
        atomic_write_json(job["marker"], record)
        done[stage.name] = json.loads(job["marker"].read_text())
        log(f"[synfer] stage {job['i']}/{total} {job['title']}: done in {record['wall_time_s']:.0f} s")

    def _schedule() -> None:
        nonlocal failure
        while (pending and failure is None) or running:
            for item in list(pending):
                if failure is not None or len(running) >= pipe.parallel:
                    break
                i, stage = item
                if any(d not in done for d in deps[stage.name]):
                    continue  # a later, independent stage may start first
                pending.remove(item)
                key = stage_key(stage, common, done, force)
                stage_dir = root / f"{i:02d}-{stage.name}-{key}"
                title = stage.title or stage.name
                job = {"i": i, "stage": stage, "key": key, "title": title, "run_dir": stage_dir / "run",
                       "marker": stage_dir / "stage.json"}
                if job["marker"].is_file():
                    done[stage.name] = json.loads(job["marker"].read_text())
                    log(f"[synfer] stage {i}/{total} {title}: cached ({stage_dir})")
                    continue
                raw = [*common, *stage.overrides, *force]
                job["overrides"] = [_substitute(o, done, job["run_dir"], stage.name) for o in raw]
                job["overrides"] += [f"run_dir={job['run_dir']}", "overwrite=true"]
                log(f"[synfer] stage {i}/{total} {title}: running `run.py {stage.task} experiment={stage.experiment}`")
                job["t0"] = time.perf_counter()
                if pipe.parallel == 1:
                    stage_cfg = compose(stage.experiment, job["overrides"])
                    try:
                        metrics = _task_function(stage.task)(stage_cfg, [stage.task, *job["overrides"]]) or {}
                    except Exception as exc:
                        raise StageFailed(f"pipeline stage {i}/{total} '{stage.name}' failed: {exc}. Fix it and rerun: "
                                          f"finished stages are reused.") from exc
                    finish_stage(job, metrics)
                    break  # done changed: look at the list from the top again
                _task_function(stage.task)  # an unknown task fails here, with the list of known ones
                stage_dir.mkdir(parents=True, exist_ok=True)
                job["log"] = stage_dir / "stage.log"
                fh = open(job["log"], "w", encoding="utf-8")
                running[stage.name] = (_start_stage(stage, job["overrides"], fh, pipe.start_method), fh, job)
                log(f"[synfer] stage {i}/{total} {title}: pid {running[stage.name][0].pid}, log {job['log']}")
            if not running:
                if pending and failure is None and all(any(d not in done for d in deps[s.name]) for _, s in pending):
                    raise StageFailed(f"pipeline: stages {[s.name for _, s in pending]} wait for stages that never ran")
                continue
            time.sleep(0.2)
            for name, (proc, fh, job) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                fh.close()
                metrics_path = job["run_dir"] / "metrics.json"
                try:
                    if proc.returncode != 0 or not metrics_path.is_file():
                        raise StageFailed(f"pipeline stage {job['i']}/{total} '{name}' failed (exit code "
                                          f"{proc.returncode}; log {job['log']}). Fix it and rerun: finished stages "
                                          f"are reused.")
                    finish_stage(job, json.loads(metrics_path.read_text()))
                except StageFailed as exc:
                    log(f"[synfer] stage {job['i']}/{total} {job['title']}: FAILED ({exc})")
                    failure = failure or exc
    try:
        _schedule()
    finally:
        for proc, fh, _ in running.values():  # only on an exception (Ctrl-C, a bad config): no orphans left
            proc.terminate()
            proc.wait()
            fh.close()
    if failure is not None:
        raise failure
    log(f"[synfer] pipeline finished in {time.perf_counter() - started:.0f} s ({root})")
    # Stages in list order, whatever order they finished in.
    done = {name: done[name] for name in names if name in done}
    atomic_write_json(root / "pipeline.json", {"experiment": cfg.experiment, "stages": done,
                                               "config": OmegaConf.to_container(cfg.pipeline, resolve=True)})
    return done
