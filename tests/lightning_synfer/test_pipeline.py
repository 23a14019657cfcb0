"""The pipeline stage cache: reuse finished stages, retry a failed one without redoing the ones before."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_overrides
from lightning_synfer.config import compose
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
    calls = []
    real = runner._task_function

    def spy(task):
        fn = real(task)
        return lambda cfg, argv: (calls.append(task), fn(cfg, argv))[1]

    monkeypatch.setattr(runner, "_task_function", spy)
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


SMOKE = [
    "trainer.max_epochs=1", "trainer.max_steps=2", "data.batch_size=8", "data.eval_batch_size=16",
    "data.train.num_images=16", "data.val.num_images=16", "data.test.num_images=16",
    "synth.num_images=16", "synth.batch_size=8", "sampling.steps=2", "ssl.online.knn_bank_size=16",
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
    for name in ("report.md", "accuracy_vs_ratio.png", "confusion_matrices.png", "synthetic_samples.png"):
        assert (report_dir / name).is_file(), name
