"""The scheduler (one polling loop for sweep points and pipeline stages): graph order and capacity, parallelism
from the hardware, signals to a real runner process (SIGINT and SIGTERM: no new starts, the running jobs get the
signal and end, exit 130/143, a rerun resumes from the cache), and SLURM through submitit without a cluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import fake_tool
from lightning_synfer.scheduling import Job, JobFailed, run_graph
from lightning_synfer.scheduling.executors import child_environment, resolve_parallel

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("sleep_task.py")


class _FakeHandle:
    def __init__(self, job: Job, polls: int, code: int, log: list) -> None:
        self.job, self.left, self.code, self.log = job, polls, code, log
        self.where = f"fake {job.name}"

    def poll(self):
        self.left -= 1
        return self.code if self.left <= 0 else None

    def send(self, signum):
        pass

    def kill(self):
        pass

    def reason(self):
        return f"exit code {self.code}"


class _FakeExecutor:
    in_process = False
    capacity = None

    def __init__(self, codes: dict[str, int]) -> None:
        self.codes, self.events, self.running = codes, [], set()

    def start(self, jobs):
        self.events.append(("start", [j.name for j in jobs]))
        return [_FakeHandle(j, 2, self.codes.get(j.name, 0), self.events) for j in jobs]

    def close(self):
        pass


def _run(graph, codes=None, parallel=2, fail_fast=False, done_already=()):
    executor = _FakeExecutor(codes or {})
    running, peak = set(), [0]

    def prepare(name):
        if name in done_already:
            return None
        running.add(name)
        peak[0] = max(peak[0], len(running))
        return Job(name, "fit", [])

    def finish(job, code, handle):
        running.discard(job.name)
        if code:
            raise JobFailed(handle.reason())

    outcome = run_graph(graph, executor=executor, parallel=parallel, prepare=prepare, finish=finish,
                        fail_fast=fail_fast, log=lambda s: None)
    return outcome, executor.events, peak[0]


def test_graph_order_capacity_failures_and_skips(monkeypatch):
    monkeypatch.setattr("lightning_synfer.scheduling.scheduler.POLL_S", 0.001)
    graph = {"a": [], "b": [], "c": ["a"], "d": ["c"], "e": []}
    outcome, events, peak = _run(graph, parallel=2)
    assert events[0] == ("start", ["a", "b"]) and peak == 2  # list order, two at once, one call (one SLURM array)
    assert outcome.done.index("a") < outcome.done.index("c") < outcome.done.index("d")
    assert sorted(outcome.done) == sorted(graph) and not outcome.failed
    # a failure blocks what waits for it; the others still run (fail_fast=False, a sweep's default)
    outcome, _, _ = _run(graph, codes={"a": 1}, parallel=2)
    assert outcome.failed == {"a": "exit code 1"} and set(outcome.not_started) == {"c", "d"}
    assert sorted(outcome.done) == ["b", "e"]
    # fail_fast (the pipeline): nothing starts after the failure
    outcome, events, _ = _run(graph, codes={"a": 1}, parallel=2, fail_fast=True)
    assert "e" in outcome.not_started and all("e" not in names for _, names in events)
    # a job found done (the cache) lets its dependants start at once, without running
    outcome, events, _ = _run(graph, parallel=1, done_already=("a", "c"))
    assert outcome.skipped == ["a", "c"] and events[0] == ("start", ["b"]) and "c" not in outcome.done


def test_parallel_auto_comes_from_the_hardware_and_sets_threads(monkeypatch):
    from lightning_synfer import hardware

    monkeypatch.setattr(hardware, "stage_parallelism", lambda cpu_count=None: (3, 5))
    assert resolve_parallel("auto") == (3, 5)
    assert resolve_parallel(2, cpu_count=16) == (2, 8) and resolve_parallel(4, cpu_count=2) == (4, 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SYNFER_RUN_STAMP", "x")
    env = child_environment(threads=5)
    assert env["OMP_NUM_THREADS"] == "5" and "SYNFER_RUN_STAMP" not in env
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting wins
    assert child_environment(threads=5)["OMP_NUM_THREADS"] == "2"


# -- signals to a real runner process -------------------------------------------------------------------------

PIPELINE = """\
task: pipeline
pipeline:
  parallel: 2
  start_method: forkserver
  stages:
    - {name: quick, task: sleep, experiment: supervised/embedded, overrides: [seed=0]}
    - {name: slow_a, task: sleep, experiment: supervised/embedded, after: [quick], overrides: [seed=1]}
    - {name: slow_b, task: sleep, experiment: supervised/embedded, after: [quick], overrides: [seed=2]}
    - {name: other, task: sleep, experiment: supervised/embedded, after: [quick], overrides: [seed=3]}
    - {name: last, task: sleep, experiment: supervised/embedded, after: [slow_a, slow_b], overrides: [seed=4]}
"""


def _environment(tmp_path: Path, sleep_s: float) -> dict[str, str]:
    experiments = tmp_path / "experiments"
    if not experiments.exists():
        shutil.copytree(ROOT / "experiments", experiments)
        (experiments / "pipeline" / "signals.yaml").write_text(PIPELINE)
    env = {k: v for k, v in os.environ.items() if k != "SYNFER_RUN_STAMP"}
    env.update(SYNFER_EXPERIMENTS_DIR=str(experiments), SYNFER_TEST_SLEEP_S=str(sleep_s), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _started(root: Path) -> dict[str, dict]:
    """Run dir name -> started.json of every job that started under `root`."""
    return {p.parent.parent.name if p.parent.name == "run" else p.parent.name: json.loads(p.read_text())
            for p in root.rglob("started.json")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _assert_stopped(code: int, signum: int, sent: float, log: str, started: dict, names: list[str], name_of) -> None:
    assert code == 128 + signum, log[-3000:]
    # `other` was ready but waited for a free slot: it must not start when the signalled jobs free theirs
    assert sorted(name_of(n) for n in started) == names, log[-3000:]
    assert all(info["time"] < sent for info in started.values())
    time.sleep(0.5)
    assert not [n for n, info in started.items() if _alive(info["pid"])], log[-3000:]  # no job process survives
    assert f"{signal.Signals(signum).name}: no job starts from now on" in log
    assert "rerun the same command to resume" in log


def _interrupt_when_started(cmd: list[str], env: dict, root: Path, expected: int, signum: int) -> tuple:
    """Start the runner, wait until `expected` jobs have started, send `signum` to the runner's pid alone."""
    log = Path(env["SYNFER_EXPERIMENTS_DIR"]).parent / f"runner-{signum}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    deadline = time.time() + 120  # a guard only: on an idle machine the jobs have started within ~5 s
    while len(_started(root)) < expected and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if len(_started(root)) != expected:
        proc.kill()
        proc.wait()
        pytest.fail(f"{len(_started(root))} jobs started, expected {expected}:\n{log.read_text()[-3000:]}")
    sent = time.time()
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=25)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the runner did not stop after {signal.Signals(signum).name}:\n{log.read_text()[-3000:]}")
    return code, sent, log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_pipeline_runner_stops_on_signal_and_rerun_resumes(tmp_path, signum):
    root = tmp_path / "runs" / "pipeline" / "pipeline_signals"
    cmd = [sys.executable, str(HELPER), "pipeline", "pipeline/signals", f"paths.runs_dir={tmp_path / 'runs'}"]
    # `quick` (seed 0) finishes at once; the runner is signalled while slow_a and slow_b sleep
    code, sent, log = _interrupt_when_started(cmd, _environment(tmp_path, 600), root, 3, signum)
    _assert_stopped(code, signum, sent, log, _started(root), ["quick", "slow_a", "slow_b"], lambda n: n.split("-")[1])

    # the rerun (short sleeps now) takes `quick` from the cache and runs the rest
    rerun = subprocess.run(cmd, env=_environment(tmp_path, 0), cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "quick: cached" in rerun.stdout and "last: done" in rerun.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_local_sweep_stops_on_signal_and_rerun_resumes(tmp_path, signum):
    root = tmp_path / "sweep"
    cmd = [sys.executable, str(HELPER), "sweep", "experiment=supervised/embedded", "sweep.task=sleep",
           "sweep.grid.seed=[0,1,2,3]", "sweep.parallel=2", "sweep.start_method=forkserver", "sweep.table=false",
           f"sweep.out={root}", f"paths.runs_dir={tmp_path / 'runs'}"]
    # seed=0 finishes at once; seeds 1 and 2 sleep when the signal comes; seed 3 waits for a slot
    code, sent, log = _interrupt_when_started(cmd, _environment(tmp_path, 600), root, 3, signum)
    _assert_stopped(code, signum, sent, log, _started(root), ["seed=0", "seed=1", "seed=2"], lambda n: n)
    rerun = subprocess.run(cmd, env=_environment(tmp_path, 0), cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 finished, 3 to run" in rerun.stdout
    assert all((root / f"seed={i}" / "metrics.json").is_file() for i in range(4))


# -- SLURM through submitit -----------------------------------------------------------------------------------

def test_sweep_submits_one_job_array_through_submitit(tiny, tmp_path, monkeypatch):
    """sweep.launcher=slurm: submitit writes and submits one job array (a fake sbatch records it); the SlurmConfig
    fields arrive as sbatch options, with Lightning's requeue signal."""
    from lightning_synfer.config import compose
    from lightning_synfer.tasks import sweep

    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "srun", "exit 0")
    fake_tool(bin_dir, "sbatch", f'cp "$1" {tmp_path}/submitted.sh; echo "Submitted batch job 4242"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = [*tiny("trainer=multinode", "trainer.num_nodes=2", "sweep.launcher=slurm", "sweep.slurm.gpus_per_node=4",
                  "sweep.slurm.partition=gpu", "sweep.slurm.time=02:00:00", "sweep.slurm.account=lab",
                  "sweep.slurm.max_concurrent=3", "sweep.slurm.wait=false", "sweep.slurm.extra=[--constraint=a100]",
                  "sweep.grid.seed=[0,1,2]", "sweep.grid.optim.lr=[0.1,0.01]"), "experiment=supervised/embedded"]
    out = sweep.run(compose(None, argv), ["sweep", *argv], log=lambda s: None)
    assert out["submitted"] == [f"4242_{i}" for i in range(6)]
    script = (tmp_path / "submitted.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-5%3", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=120",
                 "#SBATCH --account=lab", "#SBATCH --constraint=a100", "#SBATCH --signal=USR1@90",
                 "#SBATCH --requeue", "#SBATCH --job-name=synfer-supervised-embedded"):
        assert line in script, line
    # the pickled calls are the points' `run.py fit` with the allocation's Trainer shape
    import cloudpickle

    pickles = sorted((Path(out["sweep_dir"]) / "submitit").rglob("*_submitted.pkl"))
    calls = [cloudpickle.loads(p.read_bytes()).function for p in pickles]
    assert len(calls) == 6 and {c.task for c in calls} == {"fit"}
    assert all("trainer.num_nodes=2" in c.overrides and "trainer.devices=4" in c.overrides for c in calls)
    assert sorted(o for c in calls for o in c.overrides if o.startswith("seed=")) == ["seed=0"] * 2 + ["seed=1"] * 2 \
        + ["seed=2"] * 2


@pytest.mark.slow  # two `run.py fit` processes through submitit's local executor, ~30 s of CPU
def test_sweep_runs_through_submitits_local_executor_and_skips_finished(tiny, tmp_path):
    from lightning_synfer.config import compose
    from lightning_synfer.tasks import sweep

    argv = [*tiny("trainer.fast_dev_run=true", "sweep.launcher=slurm", "sweep.slurm.cluster=local",
                  "sweep.grid.seed=[0,1]", "sweep.table=false"), "experiment=supervised/embedded"]
    first = sweep.run(compose(None, argv), ["sweep", *argv], log=lambda s: None)
    assert sorted(first["done"]) == first["points"] and first["failed"] == {}
    for name in first["points"]:
        assert json.loads((Path(first["sweep_dir"]) / name / "metrics.json").read_text())["global_step"] == 1
    again = sweep.run(compose(None, argv), ["sweep", *argv], log=lambda s: None)
    assert again["pending"] == [] and again["skipped"] == first["points"]


def test_pipeline_stage_through_submitits_debug_executor_with_its_resources(tmp_path, monkeypatch):
    """pipeline.executor=slurm with submitit's debug executor (in this process): the stage runs, is cached, and
    its `resources` become its submitit parameters."""
    from omegaconf import OmegaConf

    from conftest import tiny_overrides
    from lightning_synfer.config import compose
    from lightning_synfer.pipeline.runner import _slurm_job, run_pipeline

    cfg = compose("supervised/embedded", [f"paths.runs_dir={tmp_path / 'runs'}"])
    cfg.experiment = "pipeline/test"
    cfg.pipeline = OmegaConf.merge(cfg.pipeline, {
        "executor": "slurm", "slurm": {"cluster": "debug", "partition": "cpu", "time": "1:00:00"},
        "common": tiny_overrides(tmp_path),
        "stages": [{"name": "render", "task": "render", "experiment": "supervised/embedded",
                    "resources": {"gpus": 2, "time": "0:30:00", "partition": "gpu", "mem": "16G"}}]})
    params, shape = _slurm_job(cfg.pipeline, cfg.pipeline.stages[0])
    assert (params["timeout_min"], params["slurm_partition"], params["gpus_per_node"], params["tasks_per_node"]) == \
        (30, "gpu", 2, 2)
    assert params["slurm_additional_parameters"]["mem"] == "16G"
    assert shape == ["trainer.num_nodes=1", "trainer.devices=2"]
    cfg.pipeline.stages[0].resources.gpus = 0  # this machine has none
    lines: list[str] = []
    first = run_pipeline(cfg, log=lines.append)
    assert first["render"]["metrics"]["num_rendered_now"] > 0
    assert any("render: job " in line for line in lines)  # started as a submitit job
    run_pipeline(cfg, log=lines.append)
    assert any("render: cached" in line for line in lines)
