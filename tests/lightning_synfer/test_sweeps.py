"""Sweeps: grid expansion (order, names, values), validation before anything runs, skipping finished
points on a rerun, and the SLURM job-array script (syntax, array size, which point a task runs)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures import fake_tool
from lightning_synfer.cli import main
from lightning_synfer.config import ConfigError, compose
from lightning_synfer.sweeps.grid import expand, flatten_grid, format_value, short_keys
from lightning_synfer.tasks import sweep

EXPERIMENT = "experiment=sweeps/embedded_ratio"


def _small(tiny, *extra: str) -> list[str]:
    return [EXPERIMENT, *tiny("data.synthetic.num_images=32", *extra)]


def _run(argv: list[str]) -> dict:
    return sweep.run(compose(None, argv), ["sweep", *argv], log=lambda msg: None)


def test_expansion_order_names_and_values():
    grid = flatten_grid({"data": {"mix": {"synthetic_ratio": [0, 0.5]}}, "seed": [0, 1, 2],
                         "optim.lr": [1e-3], "model": ["resnet18"]})
    assert list(grid) == ["data.mix.synthetic_ratio", "seed", "optim.lr", "model"]
    points = expand(grid)
    # cartesian product, first key slowest, values in the given order
    assert [(p.values["data.mix.synthetic_ratio"], p.values["seed"]) for p in points] == \
        [(0, 0), (0, 1), (0, 2), (0.5, 0), (0.5, 1), (0.5, 2)]
    assert points[4].name == "synthetic_ratio=0.5,seed=1,lr=0.001,model=resnet18"
    assert points[4].overrides == ["data.mix.synthetic_ratio=0.5", "seed=1", "optim.lr=0.001", "model=resnet18"]
    # 1 and 1.0 name the same point; colliding short names keep more of the key
    assert expand({"a": [1.0]})[0].name == expand({"a": [1]})[0].name == "a=1"
    assert short_keys(["data.train.seed", "data.synthetic.seed", "seed"]) == \
        {"data.train.seed": "train.seed", "data.synthetic.seed": "synthetic.seed", "seed": "seed"}
    # values that YAML would misread are quoted; lists stay lists
    assert format_value("1e-3") == '"1e-3"' and format_value("resnet18") == "resnet18"
    assert format_value([0.5, 1.0]) == "[0.5,1.0]" and format_value(True) == "true" and format_value(None) == "null"


def test_grid_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"sweep.grid.seed = 3: expected a list"):
        flatten_grid({"seed": 3})
    with pytest.raises(ConfigError, match=r"sweep.grid.data.mix.synthetic_ratio: empty list"):
        flatten_grid({"data": {"mix": {"synthetic_ratio": []}}})
    with pytest.raises(ConfigError, match="run_dir"):
        flatten_grid({"run_dir": ["a", "b"]})
    with pytest.raises(ConfigError, match="identical points"):
        expand({"seed": [1, 1]})


def test_misspelt_grid_key_fails_before_anything_runs(tiny, tmp_path, capsys):
    argv = _small(tiny, "sweep.grid.seed=[0]", "sweep.grid.data.mix.synthetic_rato=[0,1]")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.mix.synthetic_rato'.*Did you mean: "
                                          r"data.mix.synthetic_ratio"):
        _run(argv)
    assert main(["sweep", *argv]) == 2
    assert "synthetic_rato" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran, no folder was made
    # a value out of range is caught the same way, naming the point
    with pytest.raises(ConfigError, match=r"sweep point 1 .*synthetic_ratio.*expected a value in \[0, 1\]"):
        _run(_small(tiny, "sweep.grid.seed=[0]", "sweep.grid.data.mix.synthetic_ratio=[0.5,2]"))
    with pytest.raises(ConfigError, match=r"'sweep.start_method' = 'thread': expected one of spawn, forkserver"):
        _run(_small(tiny, "sweep.grid.seed=[0]", "sweep.start_method=thread"))
    with pytest.raises(ConfigError, match=r"'sweep.parallel' = 'many': expected a number of processes >= 1 or 'auto'"):
        _run(_small(tiny, "sweep.grid.seed=[0]", "sweep.parallel=many"))
    with pytest.raises(ConfigError, match=r"'sweep.slurm.time' = '2 hours': expected a time limit like 24:00:00"):
        _run(_small(tiny, "sweep.grid.seed=[0]", "sweep.slurm.time='2 hours'"))
    with pytest.raises(ConfigError, match=r"'sweep.slurm.submit' was renamed to 'sweep.slurm.script_only'"):
        _run(_small(tiny, "sweep.grid.seed=[0]", "sweep.slurm.submit=false"))


def test_local_sweep_runs_points_and_skips_finished(tiny, tmp_path):
    argv = _small(tiny, "trainer.fast_dev_run=true", "sweep.grid.data.mix.synthetic_ratio=[0.5]",
                  "sweep.grid.seed=[0,1]")
    first = _run(argv)
    root = Path(first["sweep_dir"])
    assert root.parent == tmp_path / "runs" / "sweeps" / "embedded_ratio" and root.name.startswith("sweep-")
    assert first["points"] == ["synthetic_ratio=0.5,seed=0", "synthetic_ratio=0.5,seed=1"]
    assert first["done"] == first["points"] and first["skipped"] == []
    stamps = {}
    for name, seed in zip(first["points"], (0, 1)):
        metrics = json.loads((root / name / "metrics.json").read_text())  # fast_dev_run writes metrics.json too
        assert metrics["seed"] == seed and metrics["global_step"] == 1
        assert "synthetic_ratio: 0.5" in (root / name / "config.yaml").read_text()
        stamps[name] = (root / name / "metrics.json").stat().st_mtime_ns
    assert (root / "table.md").is_file() and (root / "sweep.json").is_file()

    # the rerun finds the same folder, skips both points; one more seed runs only the new point
    again = _run(argv)
    assert again["sweep_dir"] == str(root) and again["skipped"] == first["points"] and again["pending"] == []
    grown = _run([*argv, "sweep.grid.seed=[0,1,2]"])
    assert grown["sweep_dir"] == str(root) and grown["done"] == ["synthetic_ratio=0.5,seed=2"]
    assert {n: (root / n / "metrics.json").stat().st_mtime_ns for n in stamps} == stamps


@pytest.mark.slow  # spawn: two interpreters start torch + Lightning, ~25 s of CPU
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_local_sweep_runs_two_points_at_once_in_subprocesses(tiny, tmp_path, monkeypatch, start_method):
    """sweep.parallel=2: both points start as `run.py fit` processes (fresh interpreters, or forks of the fork
    server) before either finishes; a rerun skips them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each spawned child starts its own torch
    argv = _small(tiny, "trainer.fast_dev_run=true", "sweep.grid.data.mix.synthetic_ratio=[0.5]",
                  "sweep.grid.seed=[0,1]", "sweep.parallel=2", f"sweep.start_method={start_method}")
    lines: list[str] = []
    first = sweep.run(compose(None, argv), ["sweep", *argv], log=lines.append)
    root = Path(first["sweep_dir"])
    assert first["points"] == ["synthetic_ratio=0.5,seed=0", "synthetic_ratio=0.5,seed=1"]
    assert sorted(first["done"]) == first["points"] and first["failed"] == {}  # in the order they finished
    events = [(ln.split(": ")[-1].split(" ")[0], ln) for ln in lines if ln.startswith("[synfer] sweep ") and ": " in ln]
    order = [kind for kind, _ in events if kind in ("started", "done")]
    assert order[:2] == ["started", "started"] and order.count("done") == 2, lines  # both ran at the same time
    pids = {ln.split("(pid ")[1].split(",")[0] for kind, ln in events if kind == "started"}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two child processes, not this one
    stamps = {}
    for seed, name in enumerate(first["points"]):
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["global_step"] == 1
        assert "[synfer] metrics:" in (root / "logs" / f"{name}.log").read_text()  # each child wrote its own log
        stamps[name] = (root / name / "metrics.json").stat().st_mtime_ns
    assert (root / "table.md").is_file()

    lines.clear()
    again = sweep.run(compose(None, argv), ["sweep", *argv], log=lines.append)
    assert again["skipped"] == first["points"] and again["pending"] == [] and again["done"] == []
    assert not [ln for ln in lines if "started" in ln]  # no subprocess was launched
    assert {n: (root / n / "metrics.json").stat().st_mtime_ns for n in stamps} == stamps


def test_slurm_job_array_script(tiny, tmp_path, monkeypatch):
    """sweep.slurm.script_only=true: the job array as an sbatch script over points.txt (submission itself goes
    through submitit: tests/lightning_synfer/test_scheduling.py)."""
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun_args.txt')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # no sbatch on PATH yet
    monkeypatch.chdir(tmp_path)
    argv = _small(tiny, "trainer=multinode", "trainer.num_nodes=2", "sweep.launcher=slurm",
                  "sweep.slurm.gpus_per_node=4", "sweep.slurm.partition=gpu", "sweep.slurm.time=02:00:00",
                  "sweep.slurm.script_only=true", "sweep.grid.data.mix.synthetic_ratio=[0.25,0.5,0.75]",
                  "sweep.grid.seed=[0,1]",
                  "sweep.grid.notes=['a b',\"it's\"]")
    out = _run(argv)
    script = Path(out["script"])
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for line in ("#SBATCH --array=0-11", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
                 "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue"):
        assert line in text.splitlines(), line
    points = (script.parent / "points.txt").read_text().splitlines()
    assert len(points) == 12

    # array task 7 runs point 7 through srun, with its overrides intact (spaces and quotes survive)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "7"}
    subprocess.run(["bash", str(script)], check=True, env=env, capture_output=True)
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    assert args[1:3] == [str(Path(sweep.__file__).resolve().parents[2] / "run.py"), "fit"]
    name = out["points"][7]
    assert name == "synthetic_ratio=0.5,seed=1,notes=it_s"
    assert f"run_dir={script.parent / name}" in args and "notes=\"it's\"" in args
    assert "data.mix.synthetic_ratio=0.5" in args and "seed=1" in args and "trainer.num_nodes=2" in args
    assert "trainer.devices=4" in args

    # a finished point is skipped by its array task and left out of the next array
    (script.parent / name).mkdir(parents=True, exist_ok=True)
    (script.parent / name / "metrics.json").write_text("{}")
    (tmp_path / "srun_args.txt").unlink()
    subprocess.run(["bash", str(script)], check=True, env=env, capture_output=True)
    assert not (tmp_path / "srun_args.txt").exists()
    again = _run(argv)
    assert "#SBATCH --array=0-10" in Path(again["script"]).read_text()

    # without script_only, and no SLURM here: an error naming what to set
    with pytest.raises(ConfigError, match=r"SLURM is not available here.*slurm.cluster=local.*script_only=true"):
        _run([a for a in argv if a != "sweep.slurm.script_only=true"])
