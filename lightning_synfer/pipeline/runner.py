"""Run a pipeline of stages with a cache keyed by each stage's config and its inputs.

A stage is an ordinary task (fit, synthesize, label, linear, ...) composed from an experiment plus
overrides. Its cache key hashes the task, the stage's composed config (so an edit of its experiment file, or
of any file that experiment reads, re-runs it) and the keys of the stages it waits for, so changing an upstream
stage re-runs everything downstream, and a rerun reuses every finished stage. A finished stage leaves
`stage.json` (written last, atomically); a failed or interrupted stage leaves none and is retried on the next
run without redoing the stages before it.

The stages run through the scheduler (lightning_synfer/scheduling): in this process (parallel=1), as local
processes (parallel=N or auto), or as SLURM jobs through submitit (pipeline.executor=slurm, with each stage's
`resources`). SIGINT/SIGTERM to the runner stops new stages, passes the signal to the running ones, waits for
them and exits 130/143.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.atomic import atomic_write_json
from lightning_synfer.config.compose import compose, to_container
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.config.pipeline import validate_pipeline
from lightning_synfer.pipeline.estimate import makespan, scaled_estimates, speed_probe
from lightning_synfer.scheduling import Job, JobFailed, run_graph
from lightning_synfer.scheduling.executors import InProcessExecutor, LocalProcessExecutor, resolve_parallel
from lightning_synfer.scheduling.slurm import SubmititExecutor, slurm_parameters

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\}")


# Stands in for {run} while the cache key is computed: the run dir's name holds the key itself.
_KEY_RUN_DIR = Path("RUN_DIR_OF_THIS_STAGE")


class StageFailed(RuntimeError):
    pass


def _task_function(task: str) -> Callable:
    from lightning_synfer.tasks import TASKS, load

    if task not in TASKS or task == "pipeline":
        raise ConfigError(f"pipeline stage task={task!r}: expected one of "
                          f"{sorted(t for t in TASKS if t != 'pipeline')}")
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
    """The cache key: task, overrides, the keys of the stages it waits for, and the stage's composed config
    (every file its experiment reads, with the overrides and upstream artifacts applied)."""
    overrides = [*common, *stage.overrides, *force]
    upstream = {name: done[name]["key"] for name in [*_upstream(overrides), *stage.get("after", [])] if name in done}
    resolved = [_substitute(o, done, _KEY_RUN_DIR, stage.name) for o in overrides]
    try:
        composed = to_container(compose(stage.experiment, resolved, validate_values=False))
    except ConfigError as exc:
        raise ConfigError(f"pipeline stage '{stage.name}' (experiment={stage.experiment}): {exc}") from None
    blob = json.dumps({"task": stage.task, "experiment": stage.experiment, "overrides": overrides,
                       "upstream": upstream, "config": composed}, sort_keys=True, default=str)
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


def after_own_overrides(pipe: DictConfig, stage: DictConfig) -> tuple[str, ...]:
    """What a stage gets after its own overrides: its `pipeline.stage_overrides` entry, then `pipeline.force`."""
    return (*pipe.stage_overrides.get(stage.name, []), *pipe.force)


SHOWN_SLURM_PARAMETERS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min",
                          "slurm_partition")


def print_estimate(cfg: DictConfig, graph: dict[str, list[str]], parallel: int,
                   log: Callable[[str], None]) -> dict[str, float]:
    """The stage plan with each stage's expected seconds on this machine and the total; the estimates returned."""
    pipe = cfg.pipeline
    given = {s.name: s.estimate_s for s in pipe.stages if s.estimate_s is not None}
    if not given or pipe.executor != "local":
        return {}
    here = speed_probe()
    estimates = scaled_estimates(given, pipe.reference.probe, here)
    names = [s.name for s in pipe.stages]
    total = makespan(names, graph, estimates, parallel)
    log(f"[synfer] plan: {len(names)} stages, {parallel} at a time, about {total / 60:.1f} min here "
        f"(speed probe {here:.0f} img/s; the estimates were measured on {pipe.reference.machine or '?'} at "
        f"{pipe.reference.probe or '?'} img/s)")
    for i, stage in enumerate(pipe.stages, 1):
        after = ", ".join(graph[stage.name]) or "-"
        log(f"[synfer]   {i:02d} {stage.name:<32} ~{estimates.get(stage.name, 0):5.0f} s  after {after}")
    return estimates


def print_plan(cfg: DictConfig, root: Path, graph: dict[str, list[str]], log: Callable[[str], None]) -> None:
    """`pipeline.dry_run`: every stage with what it waits for, its resources, its command and whether it is cached.

    A stage that has not run yet gets the cache key and artifact paths it will have once the stages before it
    ran with the same config, so the commands shown are the ones that will run."""
    pipe = cfg.pipeline
    done: dict[str, dict[str, Any]] = {}
    cached = 0
    log(f"[synfer] pipeline {cfg.experiment}: {len(pipe.stages)} stages, executor={pipe.executor}, "
        f"parallel={pipe.parallel}, out={root}")
    for i, stage in enumerate(pipe.stages, 1):
        force = after_own_overrides(pipe, stage)
        key = stage_key(stage, list(pipe.common), done, force)
        stage_dir = root / f"{i:02d}-{stage.name}-{key}"
        run_dir = stage_dir / "run"
        record_path = stage_dir / "stage.json"
        if record_path.is_file():
            done[stage.name] = json.loads(record_path.read_text())
            state = "cached"
            cached += 1
        else:
            done[stage.name] = {"key": key, "artifacts": {a: str(run_dir / rel) for a, rel in stage.artifacts.items()}}
            state = "to run"
        overrides = [_substitute(o, done, run_dir, stage.name) for o in [*pipe.common, *stage.overrides, *force]]
        if pipe.executor == "slurm":
            params, shape = _slurm_job(pipe, stage)
            where = "slurm " + " ".join(f"{k}={params[k]}" for k in SHOWN_SLURM_PARAMETERS if params.get(k))
        else:
            shape, where = [], "local"
        command = " ".join(shlex.quote(a) for a in ["run.py", stage.task, f"experiment={stage.experiment}",
                                                    *overrides, *shape, f"run_dir={run_dir}"])
        log(f"[synfer] {i:02d} {stage.name} [{state}] after={graph[stage.name] or '-'} {where}")
        log(f"         {command}")
    log(f"[synfer] dry run: {cached} of {len(pipe.stages)} stages cached, nothing started")


def _check_stages(cfg: DictConfig) -> None:
    pipe = cfg.pipeline
    if not pipe.stages:
        raise ConfigError(f"experiment={cfg.experiment}: pipeline.stages is empty")
    names = [s.name for s in pipe.stages]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"pipeline.stages: every stage needs a unique name, got {names}")
    for stage in pipe.stages:
        _task_function(stage.task)  # an unknown task fails before anything runs, with the list of known ones
    validate_pipeline(pipe)


def _executor(pipe: DictConfig, root: Path) -> tuple[Any, int]:
    """The executor of the stages and how many run at once."""
    processes, threads = resolve_parallel(pipe.parallel)
    if pipe.executor == "slurm":
        try:
            return SubmititExecutor(root / "submitit", cluster=pipe.slurm.cluster, python=pipe.slurm.python), processes
        except ValueError as exc:
            raise ConfigError(f"pipeline.executor=slurm: {exc}") from None
    if processes == 1:
        return InProcessExecutor(), 1
    return LocalProcessExecutor(pipe.start_method, threads=threads), processes


def _slurm_job(pipe: DictConfig, stage: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """A stage's submitit parameters (its `resources` over `pipeline.slurm`) and the Trainer shape they give."""
    res, slurm = stage.resources, pipe.slurm
    nodes = int(res.nodes or slurm.nodes or 1)
    gpus = int(res.gpus if res.gpus is not None else (slurm.gpus_per_node or 0))
    params = slurm_parameters(slurm, nodes=nodes, tasks_per_node=max(1, gpus), gpus_per_node=gpus,
                              job_name=f"synfer-{stage.name}", key=f"pipeline.stages[{stage.name}].resources",
                              time=res.time, partition=res.partition, cpus_per_task=res.cpus, mem=res.mem)
    shape = [f"trainer.num_nodes={nodes}", f"trainer.devices={max(1, gpus)}"] if gpus else []
    return params, shape


@dataclass
class _Run:
    """One run of the pipeline: what the scheduler's callbacks share."""

    cfg: DictConfig
    root: Path
    log: Callable[[str], None]
    in_process: bool
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> index, stage, key, dirs, start time
    graph: dict[str, list[str]] = field(default_factory=dict)
    estimates: dict[str, float] = field(default_factory=dict)  # stage -> seconds expected here (pipeline/estimate.py)
    parallel: int = 1
    t_start: float = field(default_factory=time.perf_counter)

    def progress(self) -> str:
        """`k/N done, 123 s in, ~456 s left` (the estimate of what has not run, replayed as the scheduler runs it)."""
        names = [s.name for s in self.cfg.pipeline.stages]
        line = f"{len(self.done)}/{len(names)} done, {time.perf_counter() - self.t_start:.0f} s in"
        if self.estimates:
            left = makespan(names, self.graph, self.estimates, self.parallel, done=list(self.done))
            line += f", ~{left:.0f} s left"
        return line

    def prepare(self, name: str) -> Optional[Job]:
        pipe = self.cfg.pipeline
        i, stage = next((i, s) for i, s in enumerate(pipe.stages, 1) if s.name == name)
        common, force = list(pipe.common), after_own_overrides(pipe, stage)
        key = stage_key(stage, common, self.done, force)
        stage_dir = self.root / f"{i:02d}-{stage.name}-{key}"
        title = f"stage {i}/{len(pipe.stages)} {stage.title or stage.name}"
        if (stage_dir / "stage.json").is_file():
            self.done[name] = json.loads((stage_dir / "stage.json").read_text())
            self.log(f"[synfer] {title}: cached ({stage_dir})")
            return None
        run_dir = stage_dir / "run"
        overrides = [_substitute(o, self.done, run_dir, name) for o in [*common, *stage.overrides, *force]]
        overrides += [f"run_dir={run_dir}", "overwrite=true"]
        resources, shape = _slurm_job(pipe, stage) if pipe.executor == "slurm" else ({}, [])
        self.jobs[name] = {"i": i, "stage": stage, "key": key, "title": title, "dir": stage_dir, "run_dir": run_dir,
                           "overrides": overrides, "t0": time.perf_counter()}
        self.log(f"[synfer] {title}: running `run.py {stage.task} experiment={stage.experiment}`")
        stage_dir.mkdir(parents=True, exist_ok=True)
        return Job(name, stage.task, [f"experiment={stage.experiment}", *overrides, *shape],
                   log=stage_dir / "stage.log", resources=resources)

    def started(self, job: Job, handle: Any) -> None:
        if not self.in_process:
            self.log(f"[synfer] {self.jobs[job.name]['title']}: {handle.where}")

    def finish(self, job: Job, code: int, handle: Any) -> None:
        info = self.jobs[job.name]
        stage, run_dir = info["stage"], info["run_dir"]
        failed = f"pipeline stage {info['i']}/{len(self.cfg.pipeline.stages)} '{stage.name}' failed"
        if code != 0 or not (run_dir / "metrics.json").is_file():
            raise JobFailed(f"{failed} ({handle.reason() or f'exit code {code}'}). Fix it and rerun: finished "
                            f"stages are reused.")
        artifacts = {}
        for name, rel in stage.artifacts.items():
            if not (run_dir / rel).exists():
                raise JobFailed(f"{failed}: it finished without its artifact '{name}' ({run_dir / rel})")
            artifacts[name] = str(run_dir / rel)
        record = {"stage": stage.name, "task": stage.task, "experiment": stage.experiment, "key": info["key"],
                  "run_dir": str(run_dir), "artifacts": artifacts, "overrides": info["overrides"],
                  "wall_time_s": time.perf_counter() - info["t0"],
                  "metrics": json.loads((run_dir / "metrics.json").read_text())}
        atomic_write_json(info["dir"] / "stage.json", record)
        self.done[stage.name] = json.loads((info["dir"] / "stage.json").read_text())
        expected = self.estimates.get(stage.name)
        self.log(f"[synfer] {info['title']}: done in {record['wall_time_s']:.0f} s"
                 + (f" (estimate {expected:.0f} s)" if expected is not None else "") + f"; {self.progress()}")


def run_pipeline(cfg: DictConfig, *, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the stages in list order, each once its dependencies are done.

    pipeline.parallel=1 runs them one by one in this process. pipeline.parallel=N (or auto) runs each stage as
    its own `run.py TASK ...` process, up to N at once (independent stages overlap: on a 2-vCPU machine the
    generator trains beside the classifier; on a multi-GPU node give each stage its own device);
    pipeline.executor=slurm submits each stage as a SLURM job. A failed stage stops new starts; the running
    ones finish (and are cached), then the failure is raised.
    """
    _check_stages(cfg)
    pipe = cfg.pipeline
    names = [s.name for s in pipe.stages]
    common = list(pipe.common)
    graph = {s.name: stage_dependencies(s, common, after_own_overrides(pipe, s), names[:i])
             for i, s in enumerate(pipe.stages)}
    root = Path(pipe.out) / cfg.experiment.replace("/", "_")
    if pipe.dry_run:
        print_plan(cfg, root, graph, log)
        return {}
    root.mkdir(parents=True, exist_ok=True)
    executor, parallel = _executor(pipe, root)
    state = _Run(cfg, root, log, executor.in_process, graph=graph, parallel=parallel)
    state.estimates = print_estimate(cfg, graph, parallel, log)
    started = time.perf_counter()
    outcome = run_graph(graph, executor=executor, parallel=parallel, prepare=state.prepare, finish=state.finish,
                        started=state.started, fail_fast=True, log=log)
    if outcome.failed:
        raise StageFailed(next(iter(outcome.failed.values())))
    if outcome.not_started:
        raise StageFailed(f"pipeline: stages {outcome.not_started} wait for stages that never ran")
    log(f"[synfer] pipeline finished in {time.perf_counter() - started:.0f} s ({root})")
    done = {name: state.done[name] for name in names}  # list order, whatever order they finished in
    atomic_write_json(root / "pipeline.json", {"experiment": cfg.experiment, "stages": done,
                                               "config": OmegaConf.to_container(cfg.pipeline, resolve=True)})
    return done
