"""The pipeline stage cache: reuse finished stages, retry a failed one without redoing the ones before."""
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_overrides
from lightning_synfer.config import ConfigError, compose
from lightning_synfer.pipeline import runner
from lightning_synfer.pipeline.runner import StageFailed, run_pipeline


def _cfg(tmp_path: Path, eval_overrides=()):
    common = tiny_overrides(tmp_path)
    cfg = compose("supervised/embedded", [f"paths.runs_dir={tmp_path / 'runs'}"])
    cfg.experiment = "pipeline/test"
    cfg.pipeline = OmegaConf.merge(cfg.pipeline, {
        "common": common,
        "stages": [
            {"name": "classifier", "task": "fit", "experiment": "supervised/embedded",
             "overrides": ["trainer.max_epochs=1"], "artifacts": {"ckpt": "checkpoints/best.ckpt"}},
            {"name": "judge", "task": "evaluate", "experiment": "supervised/embedded",
             "overrides": ["ckpt={classifier.ckpt}", *eval_overrides]},
        ]})
    return cfg


def _count_calls(monkeypatch):
    """The task functions that ran in this process (pipeline.parallel=1), in order."""
    import lightning_synfer.tasks as tasks

    calls = []
    real = tasks.load

    def spy(task):
        fn = real(task)
        return lambda cfg, argv: (calls.append(task), fn(cfg, argv))[1]

    monkeypatch.setattr(tasks, "load", spy)
    return calls


def test_rerun_reuses_finished_stages(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    first = run_pipeline(_cfg(tmp_path), log=lambda s: None)
    assert calls == ["fit", "evaluate"]
    assert Path(first["classifier"]["artifacts"]["ckpt"]).is_file()
    assert 0 <= first["judge"]["metrics"]["accuracy"] <= 1
    second = run_pipeline(_cfg(tmp_path), log=lambda s: None)
    assert calls == ["fit", "evaluate"]  # nothing ran again
    assert second["judge"]["key"] == first["judge"]["key"]


def test_failed_stage_retries_alone_and_upstream_change_invalidates(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    with pytest.raises(StageFailed, match="judge"):
        run_pipeline(_cfg(tmp_path, ["data.test.format=folder", f"data.test.root={tmp_path/'missing'}"]),
                     log=lambda s: None)
    assert calls == ["fit", "evaluate"]
    run_pipeline(_cfg(tmp_path), log=lambda s: None)
    assert calls == ["fit", "evaluate", "evaluate"]  # the classifier was reused
    changed = _cfg(tmp_path)
    changed.pipeline.stages[0].overrides.append("seed=1")
    run_pipeline(changed, log=lambda s: None)
    assert calls[-2:] == ["fit", "evaluate"]  # upstream change re-runs downstream too


def test_unknown_placeholder_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.pipeline.stages[1].overrides = ["ckpt={nope.ckpt}"]
    with pytest.raises(Exception, match="nope"):
        run_pipeline(cfg, log=lambda s: None)


def _parallel_cfg(tmp_path: Path, judge_overrides=(), start_method="spawn"):
    cfg = _cfg(tmp_path, judge_overrides)
    stages = list(cfg.pipeline.stages)
    # an independent stage listed after the judge; `after` orders it behind the classifier without an artifact
    stages.insert(1, {"name": "other", "task": "fit", "experiment": "supervised/embedded",
                      "overrides": ["trainer.max_epochs=1", "seed=1"]})
    stages.append({"name": "last", "task": "fit", "experiment": "supervised/embedded", "after": ["other"],
                   "overrides": ["trainer.max_epochs=1", "seed=2"]})
    cfg.pipeline = OmegaConf.merge(cfg.pipeline, {"stages": stages, "parallel": 2, "start_method": start_method})
    return cfg


def test_parallel_stages_run_as_processes_in_dependency_order(tmp_path):
    lines = []
    first = run_pipeline(_parallel_cfg(tmp_path), log=lines.append)
    assert list(first) == ["classifier", "other", "judge", "last"]  # list order, whatever order they finished in
    for name, rec in first.items():
        assert (Path(rec["run_dir"]).parent / "stage.log").is_file(), name
    assert 0 <= first["judge"]["metrics"]["accuracy"] <= 1
    started = [line.split(":")[0].split()[-1] for line in lines if ": running" in line]
    assert started.index("classifier") < started.index("judge") and started.index("other") < started.index("last")
    # the two independent stages overlapped: `other` started before `classifier` finished
    order = [line for line in lines if ": running" in line or ": done" in line]
    assert order.index(next(x for x in order if "other: running" in x)) < \
        order.index(next(x for x in order if "classifier: done" in x))
    again = run_pipeline(_parallel_cfg(tmp_path), log=lines.append)
    assert {k: v["key"] for k, v in again.items()} == {k: v["key"] for k, v in first.items()}
    assert sum(": cached" in line for line in lines) == 4


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_parallel_failure_names_the_log_and_keeps_finished_stages(tmp_path, start_method):
    bad = ["data.test.format=folder", f"data.test.root={tmp_path / 'missing'}"]
    with pytest.raises(StageFailed, match=r"'judge' failed \(exit code 2; log .*stage\.log"):
        run_pipeline(_parallel_cfg(tmp_path, bad, start_method), log=lambda s: None)
    judge_log = next((tmp_path / "runs" / "pipeline" / "pipeline_test").glob("*-judge-*/stage.log")).read_text()
    assert "error:" in judge_log and "missing" in judge_log  # the stage's own one-line error, in its log
    lines = []
    run_pipeline(_parallel_cfg(tmp_path, start_method=start_method), log=lines.append)
    assert any("classifier: cached" in line for line in lines)


def test_forked_stages_match_spawned_ones(tmp_path):
    """pipeline.start_method=forkserver (stages fork a server that imported torch once) computes what fresh
    interpreters compute: the same metrics, each stage in its own process and log."""
    lines = []
    forked = run_pipeline(_parallel_cfg(tmp_path / "fork", start_method="forkserver"), log=lines.append)
    spawned = run_pipeline(_parallel_cfg(tmp_path / "spawn"), log=lambda s: None)
    for name in forked:
        for key in ("accuracy", "loss", "global_step"):
            if key in spawned[name]["metrics"]:
                assert forked[name]["metrics"][key] == pytest.approx(spawned[name]["metrics"][key], abs=1e-6), (name, key)
        assert "[synfer] metrics:" in (Path(forked[name]["run_dir"]).parent / "stage.log").read_text()
    pids = {line.split("pid ")[1].split(",")[0] for line in lines if ": pid " in line}
    assert len(pids) == 4 and str(os.getpid()) not in pids


def test_unknown_start_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'pipeline.start_method' = 'thread': expected one of spawn, forkserver"):
        run_pipeline(_parallel_cfg(tmp_path, start_method="thread"), log=lambda s: None)
    with pytest.raises(ConfigError, match=r"'pipeline.start_method' = 'fork' is now 'forkserver'"):
        run_pipeline(_parallel_cfg(tmp_path, start_method="fork"), log=lambda s: None)
    with pytest.raises(ConfigError, match=r"'pipeline.parallel' = 0: expected a number of processes >= 1 or 'auto'"):
        cfg = _parallel_cfg(tmp_path)
        cfg.pipeline.parallel = 0
        run_pipeline(cfg, log=lambda s: None)


def test_after_must_name_an_earlier_stage(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.pipeline.stages[0].after = ["judge"]
    with pytest.raises(Exception, match="needs stage 'judge', which does not run before"):
        run_pipeline(cfg, log=lambda s: None)


SMOKE = [
    "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=1",
    "data.batch_size=8", "data.eval_batch_size=16",
    "data.train.num_images=16", "data.val.num_images=16", "data.test.num_images=16",
    "synthesis.num_images=16", "synthesis.batch_size=8", "sampling.steps=2", "ssl.online.knn_bank_size=16",
]


@pytest.mark.slow
def test_main_pipeline_runs_end_to_end_shrunk(tmp_path, capsys):
    """Every stage of experiments/pipeline/embedded.yaml, shrunk to a few steps, then the report."""
    from lightning_synfer.tasks import pipeline as pipeline_task

    cfg = compose("pipeline/embedded", [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}",
                                        f"pipeline.force={SMOKE}".replace("'", "")])
    pipeline_task.run(cfg)
    out = capsys.readouterr().out
    assert "Supervised FER: real, synthetic and mixed" in out
    assert "Self-supervised pre-training" in out
    assert "Pseudo-label rectification" in out
    # synthetic-only on the intended labels (v1) and on the rectified ones (v2), side by side
    assert "| synthetic only | 1.00 | intended (v1) |" in out
    assert "| synthetic only | 1.00 | rectified (v2) |" in out
    report_dir = tmp_path / "runs" / "pipeline" / "pipeline_embedded" / "report"
    for name in ("report.md", "accuracy_vs_ratio.png", "confusion_matrices.png", "synthetic_samples.png",
                 "au_sweep.png", "real_vs_generated.png"):
        assert (report_dir / name).is_file(), name
    summary = json.loads((report_dir / "summary.json").read_text())
    for key in SUMMARY_KEYS:  # the figures issue 15 names, under these keys; every one measured, none guessed
        assert key in summary, key
        assert summary[key] is not None, key
    assert summary["mixed_ratio"] in (0.5, 0.75) and summary["precision"] == "32-true"
    assert 0 <= summary["generated_accuracy"] <= 1 and summary["pipeline_seconds"] > 0


SUMMARY_KEYS = ("judge_accuracy", "generated_accuracy", "generated_accuracy_no_guidance", "real_only_accuracy",
                "synthetic_only_accuracy", "mixed_accuracy", "mixed_ratio", "intended_labels_accuracy",
                "rectified_labels_accuracy", "pipeline_seconds", "precision")


def test_summary_takes_the_best_of_several_stages_and_its_config(tmp_path):
    from lightning_synfer.pipeline.summary import build_summary

    def record(name, acc, ratio):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"data:\n  mix:\n    synthetic_ratio: {ratio}\n")
        (run / "provenance.json").write_text(json.dumps({"hardware": {"precision": "bf16-mixed",
                                                                      "precision_reason": "AMX"}}))
        return {"task": "fit", "run_dir": str(run), "metrics": {"test": {"accuracy": acc}}}

    stages = {"a": record("a", 0.5, 0.25), "b": record("b", 0.7, 0.75), "c": record("c", None, 0.0)}
    figures = {"mixed_accuracy": {"stages": ["a", "b"], "metric": "test.accuracy",
                                  "config": {"mixed_ratio": "data.mix.synthetic_ratio"}},
               "missing": {"stages": ["c"], "metric": "test.accuracy", "config": {}}}
    out = build_summary(stages, figures, 12.0, "cpu")
    assert out["mixed_accuracy"] == 0.7 and out["mixed_accuracy_stage"] == "b" and out["mixed_ratio"] == 0.75
    assert out["missing"] is None  # not measured: null, never a default
    assert out["precision"] == "bf16-mixed" and out["precision_reason"] == "AMX" and out["pipeline_seconds"] == 12.0


# -- stage 1: render the embedded faces into the cache the later stages read ---------------------------------


def test_render_task_counts_faces_and_later_runs_load_its_cache(tmp_path, monkeypatch, capsys):
    import json

    from PIL import Image

    from datamodules.datamodule import FERDataModule
    from datamodules.procedural import dataset as procedural
    from lightning_synfer.cli import main
    from lightning_synfer.tasks import render

    argv = tiny_overrides(tmp_path)
    metrics = render.run(compose("supervised/embedded", argv))
    splits = metrics["splits"]
    assert set(splits) == {"train", "val", "test"} and metrics["num_rendered_now"] == 64 + 32 + 32
    assert list(splits["train"]["per_class"]) == metrics["label_names"] and len(metrics["label_names"]) == 8
    for name, n in (("train", 64), ("val", 32), ("test", 32)):  # the renderer balances classes exactly
        assert splits[name]["per_class"] == dict.fromkeys(metrics["label_names"], n // 8), name
        assert not splits[name]["reused"] and Path(splits[name]["cache"]).is_file()
    with Image.open(metrics["samples"]) as grid:  # 8 rows of 32 px faces (+ 2 px gaps), 8 per row + a name margin
        assert grid.size == (64 + 8 * 34, 8 * 34)

    # A later run of the same data draws nothing: every split comes from the cache.
    def no_drawing(*args, **kwargs):
        raise AssertionError("render_split called: the embedded cache was not used")

    monkeypatch.setattr(procedural, "render_split", no_drawing)
    dm = FERDataModule(compose("supervised/embedded", argv))
    dm.setup("fit")
    dm.setup("test")
    assert [len(dm.datasets[n]) for n in ("train", "val", "test")] == [64, 32, 32]
    assert main(["render", *argv]) == 0
    again = json.loads(max((tmp_path / "runs").rglob("metrics.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert again["num_rendered_now"] == 0 and again["num_reused"] == 128
    assert all(s["reused"] for s in again["splits"].values())
    capsys.readouterr()
    # nothing embedded to render: one line naming the data sets
    assert main(["render", *argv, "data.train.format=folder", f"data.train.root={tmp_path}", "data.val=null",
                 "data.test=null"]) == 2
    assert "render: nothing to render (data.train.format=folder)" in capsys.readouterr().err


def _stage_config(stage, common, tmp_path):
    overrides = [runner.PLACEHOLDER.sub("/upstream/artifact", o).replace("{run}", str(tmp_path))
                 for o in [*common, *stage.overrides]]
    return compose(stage.experiment, [*overrides, f"paths.cache_dir={tmp_path / 'cache'}"])


def test_embedded_pipeline_renders_first_and_its_stages_reuse_that_cache(tmp_path):
    """experiments/pipeline/embedded.yaml: `render` is stage 1, and the embedded splits of the classifier, generator,
    synthesis, downstream and probe stages are exactly files it renders (composition only, nothing runs)."""
    from lightning_synfer.tasks.render import SPLITS, cache_path

    pipe = compose("pipeline/embedded").pipeline
    stages = {s.name: s for s in pipe.stages}
    first, second = pipe.stages[0], pipe.stages[1]
    assert (first.name, first.task) == ("render", "render") and first.title.startswith("1. render the real")
    assert (second.name, second.task) == ("render_pool", "render")

    def rendered_by(stage) -> set:
        cfg = _stage_config(stage, pipe.common, tmp_path)
        return {cache_path(cfg, cfg.data[n]) for n in SPLITS
                if cfg.data.get(n) is not None and cfg.data[n].format == "embedded"}

    rendered, pool = rendered_by(first), rendered_by(second)
    assert len(rendered) == 3 and len(pool - rendered) == 1  # the pool shares val and test with the real set

    def loaded(stage) -> set:
        cfg = _stage_config(stage, pipe.common, tmp_path)
        names = ("train",) if stage.task == "synthesize" else SPLITS  # synthesis reads AU statistics of data.train
        return {cache_path(cfg, cfg.data[n]) for n in names
                if cfg.data.get(n) is not None and cfg.data[n].format == "embedded"}

    reuse = ["real_only", "generator", "synthetic", "synthetic_no_guidance", "synthetic_only",
             "synthetic_only_intended", "ssl_real", "ssl_synthetic", "ssl_both", "probe_real", "probe_synthetic",
             "probe_both"]
    own_sizes = ["labeler", "real_low", "mixed_low_050", "mixed_low_075"]  # 400 test / 320 training faces
    no_data = ["generation_quality", "generation_quality_no_guidance", "label", "au_sweep"]  # read sets or models
    assert set(stages) == {"render", "render_pool", "judge", *reuse, *own_sizes, *no_data}
    assert loaded(stages["judge"]) and loaded(stages["judge"]) <= rendered | pool
    for name in reuse:
        assert loaded(stages[name]) and loaded(stages[name]) <= rendered, name
    for name in own_sizes:
        assert loaded(stages[name]) - rendered, name


def test_embedded_pipeline_trains_on_rectified_labels_only_after_the_vote():
    """With stages in parallel, a stage that reads the newest manifest must wait for `label` (which writes it);
    one that pins the intended labels (version 1) need not. Found when 6b and 6b' trained on the same labels."""
    from lightning_synfer.pipeline.runner import stage_dependencies

    pipe = compose("pipeline/embedded").pipeline
    assert pipe.parallel == "auto"  # several stages at once on any machine with 2+ cores
    names = [s.name for s in pipe.stages]
    for i, stage in enumerate(pipe.stages):
        deps = stage_dependencies(stage, list(pipe.common), tuple(pipe.force), names[:i])
        reads_set = any("{synthetic.dir}" in o for o in stage.overrides) and stage.task == "fit"
        if reads_set and not any("version: 1" in o for o in stage.overrides):
            assert "label" in deps, stage.name
        if stage.name == "synthetic_only_intended":
            assert "label" not in deps


# -- the cache key: the stage's composed config (defect 4) ---------------------------------------------------


def test_edited_experiment_file_reruns_its_stage(tmp_path, monkeypatch):
    """An experiment that composes only with the stage's overrides (here it reads `notes` from an environment
    variable the pipeline replaces) was left out of the key (`except ConfigError: pass`), so an edit of the file
    was served from the cache. The key is now the stage's composed config: the edit reruns the stage."""
    import shutil

    experiments = tmp_path / "experiments"
    shutil.copytree(Path(__file__).resolve().parents[2] / "experiments", experiments)
    monkeypatch.setenv("SYNFER_EXPERIMENTS_DIR", str(experiments))
    monkeypatch.delenv("SYNFER_TEST_UNSET", raising=False)
    edited = experiments / "supervised" / "edited.yaml"
    body = "defaults:\n  - supervised/embedded\nnotes: ${oc.env:SYNFER_TEST_UNSET}\nseed: %d\n"
    edited.write_text(body % 1)
    calls = _count_calls(monkeypatch)
    cfg = _cfg(tmp_path)
    cfg.pipeline = OmegaConf.merge(cfg.pipeline, {"stages": [{"name": "render", "task": "render",
                                                             "experiment": "supervised/edited",
                                                             "overrides": ["notes=from_the_pipeline"]}]})
    first = run_pipeline(cfg, log=lambda s: None)
    assert calls == ["render"] and "seed: 1" in (Path(first["render"]["run_dir"]) / "config.yaml").read_text()
    run_pipeline(cfg, log=lambda s: None)
    assert calls == ["render"]  # unchanged: cached

    edited.write_text(body % 7)
    second = run_pipeline(cfg, log=lambda s: None)
    assert calls == ["render", "render"] and second["render"]["key"] != first["render"]["key"]
    assert "seed: 7" in (Path(second["render"]["run_dir"]) / "config.yaml").read_text()

    # a stage whose config does not compose is an error of the pipeline config, naming the stage
    cfg.pipeline.stages[0].overrides = []
    with pytest.raises(ConfigError, match=r"pipeline stage 'render' \(experiment=supervised/edited\): .*"
                                          r"SYNFER_TEST_UNSET"):
        run_pipeline(cfg, log=lambda s: None)


@pytest.mark.slow
def test_base_pipeline_publishes_a_loadable_base_shrunk(tmp_path):
    """pipeline/embedded_base shrunk: the judge, then the base, published (to tmp) with its judged samples."""
    from lightning_synfer.modules.generator import GeneratorModule
    from lightning_synfer.pretrained import check_provenance
    from lightning_synfer.tasks import pipeline as pipeline_task

    shipped = tmp_path / "shipped"
    force = [*SMOKE, f"generator.publish_dir={shipped}", "generator.publish_samples_per_class=2",
             "trainer.max_time=null"]
    cfg = compose("pipeline/embedded_base", [f"paths.runs_dir={tmp_path / 'runs'}",
                                             f"paths.cache_dir={tmp_path / 'cache'}", f"pipeline.force={force}"
                                             .replace("'", "")])
    pipeline_task.run(cfg)
    prov = check_provenance(shipped / "embedded_base")
    assert prov["sample_accuracy"]["images"] == 16 and 0 <= prov["sample_accuracy"]["accuracy"] <= 1
    assert "experiment=generator/embedded_base" in prov["command"]
    assert GeneratorModule.load(shipped / "embedded_base").patch_size == 4


def test_long_variant_adds_stages_and_seed_copies_that_read_their_own_copies(tmp_path, capsys):
    """pipeline/embedded_long: the main job's stages, extra 2x/5x stages, 3-seed copies wired to each other; its
    graph checks (every stage after the ones it reads). Its stages are configs the main-job test runs shrunk."""

    main = [s.name for s in compose("pipeline/embedded").pipeline.stages]
    cfg = compose("pipeline/embedded_long", [f"paths.runs_dir={tmp_path / 'runs'}", "pipeline.dry_run=true"])
    stages = {s.name: s for s in cfg.pipeline.stages}
    assert [n for n in stages if n in main] == main
    assert {"synthetic_5x", "label_5x", "synthetic_only_5x", "synthetic_only_5x_seed2"} <= set(stages)
    copy = stages["synthetic_only_5x_seed1"]
    assert copy.overrides[-1] == "seed=1" and list(copy.after) == ["label_5x"]  # label_5x is not repeated
    assert stages["real_only_seed2"].overrides[-1] == "seed=2"
    runner._check_stages(cfg)
    names = list(stages)
    graph = {s.name: runner.stage_dependencies(s, list(cfg.pipeline.common), (), names[:i])
             for i, s in enumerate(cfg.pipeline.stages)}
    assert graph["synthetic_only_5x_seed2"] == ["label_5x", "synthetic_5x"]


def test_seed_copies_read_the_copies_of_repeated_stages():
    cfg = compose("pipeline/embedded", ["pipeline.repeat.seeds=[0,5]", "pipeline.repeat.stages=[ssl_real,probe_real]"])
    stages = {s.name: s for s in cfg.pipeline.stages}
    assert stages["probe_real_seed5"].overrides[0] == "ckpt={ssl_real_seed5.ckpt}"
    assert stages["probe_real"].overrides[0] == "ckpt={ssl_real.ckpt}"
    with pytest.raises(ConfigError, match="pipeline.repeat.stages"):
        compose("pipeline/embedded", ["pipeline.repeat.seeds=[0,1]", "pipeline.repeat.stages=[nope]"])


def test_summary_of_seed_copies_is_mean_and_std(tmp_path):
    from lightning_synfer.pipeline.summary import build_summary

    stages = {n: {"task": "fit", "run_dir": str(tmp_path), "metrics": {"test": {"accuracy": a}}}
              for n, a in (("row", 0.5), ("row_seed1", 0.7), ("row_seed2", 0.6), ("rowx", 0.9))}
    out = build_summary(stages, {"acc": {"stages": ["row"], "metric": "test.accuracy", "config": {}}}, 1.0)
    assert out["acc"] == pytest.approx(0.6) and out["acc_std"] == pytest.approx(0.1) and out["acc_seeds"] == 3


def test_plan_estimate_replays_the_schedule_and_scales_to_this_machine():
    from lightning_synfer.pipeline.estimate import makespan, scaled_estimates, speed_probe

    graph = {"a": [], "b": [], "c": ["a"], "d": ["b", "c"]}
    secs = {"a": 10.0, "b": 4.0, "c": 5.0, "d": 1.0}
    assert makespan(list(graph), graph, secs, 1) == 20.0
    assert makespan(list(graph), graph, secs, 2) == 16.0  # c waits for a (10 s), d for c
    assert makespan(list(graph), graph, secs, 2, done=["a", "b"]) == 6.0
    # while c waits for a, the later e takes the free slot (as run_graph starts it): 15 s, not 18 in list order
    gap = {"a": [], "c": ["a"], "b": [], "e": []}
    assert makespan(list(gap), gap, {"a": 10.0, "c": 5.0, "b": 4.0, "e": 4.0}, 2) == 15.0
    # a machine twice as fast as the reference halves every estimate; no reference score: as measured
    assert scaled_estimates({"a": 10.0, "b": None}, 200.0, 400.0) == {"a": 5.0}
    assert scaled_estimates({"a": 10.0}, None, 400.0) == {"a": 10.0}
    assert speed_probe(seconds=0.1) > 0
