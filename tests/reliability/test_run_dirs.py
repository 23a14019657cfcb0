"""A run directory is never overwritten without overwrite=true: an explicit run_dir holding a finished run or the
checkpoints of an unfinished one is refused unless resume=... or overwrite=true says what to do with it;
resume=auto never picks (and rewrites) a finished run; two runs of one config started in the same second get a
directory each. All of this happens before any training, so these tests take well under a second each."""
from __future__ import annotations

import time

import pytest

from lightning_synfer import runs
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.runs import find_resumable, prepare_run_dir, resolve_resume_checkpoint

STAMP = "20250101-120000"


@pytest.fixture
def same_second(monkeypatch):
    """Every run-dir stamp falls in the same second; the provenance's other time formats stay real."""
    real = time.strftime
    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: STAMP if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a))
    monkeypatch.setenv("SYNFER_RUN_STAMP", "")  # restored (unset) afterwards: prepare_run_dir sets it


def _snapshot(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("leftover", ["checkpoints/last.ckpt", "checkpoints/best.ckpt", "hpc_ckpt_1.ckpt"])
def test_explicit_run_dir_with_checkpoints_but_no_metrics_is_refused_without_resume(tmp_path, tiny, capsys, leftover):
    run = tmp_path / "r"
    args = tiny("model.backbone=test_resnet", "data.test=null", f"run_dir={run}")
    prepare_run_dir(compose("supervised/embedded", args))
    prepare_run_dir(compose("supervised/embedded", args))  # config + provenance only (no checkpoint yet): reusable
    (run / leftover).write_bytes(b"weights of an unfinished run")  # what a crash leaves behind
    before = _snapshot(run)

    capsys.readouterr()
    for extra in ([], ["resume=never"]):
        assert main(["fit", *args, *extra]) == 2
        err = capsys.readouterr().err
        line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(line) == 1 and "Traceback" not in err, err
        assert f"run_dir={run}" in line[0] and leftover.split("/")[-1] in line[0], line[0]
        assert "resume=auto" in line[0] and "overwrite=true" in line[0], line[0]
        assert _snapshot(run) == before  # nothing rewritten, not even config.yaml

    cont = prepare_run_dir(compose("supervised/embedded", [*args, "resume=auto"]))
    assert cont.path == run
    if leftover != "checkpoints/best.ckpt":  # best.ckpt is not a resume point, but still refused above
        assert resolve_resume_checkpoint(compose("supervised/embedded", [*args, "resume=auto"]), cont) == \
            str(run / leftover)
    assert prepare_run_dir(compose("supervised/embedded", [*args, "overwrite=true"])).path == run


def test_resume_auto_never_picks_a_finished_run(tmp_path, tiny, same_second):
    plain = compose("supervised/embedded", tiny())
    auto = compose("supervised/embedded", tiny("resume=auto"))
    crashed = prepare_run_dir(plain)
    (crashed.checkpoints / "last.ckpt").write_bytes(b"x")
    assert prepare_run_dir(auto).path == crashed.path  # the newest unfinished run is continued

    finished = prepare_run_dir(plain)  # a later run of the same config (same second: its own dir)
    (finished.checkpoints / "last.ckpt").write_bytes(b"x")
    (finished.path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    finished.write_metrics({"task": "fit", "best_val_acc": 0.5})
    before = _snapshot(finished.path)
    assert find_resumable(auto, finished.config_hash) is None

    new = prepare_run_dir(auto)
    # Neither the finished run (its results would be rewritten) nor the older crashed run it superseded.
    assert new.path not in (finished.path, crashed.path) and new.resumed_from is None
    assert resolve_resume_checkpoint(auto, new) is None  # a fresh start
    assert _snapshot(finished.path) == before
    assert {p.name for p in new.path.parent.iterdir()} == {f"{STAMP}-{new.config_hash}",
                                                            f"{STAMP}-2-{new.config_hash}", new.path.name}
    assert new.path.name == f"{STAMP}-3-{new.config_hash}"


def test_two_default_runs_started_in_the_same_second_get_their_own_dirs(tmp_path, tiny, same_second, monkeypatch):
    cfg = compose("supervised/embedded", tiny())
    a, b, c = (prepare_run_dir(cfg) for _ in range(3))
    digest = a.config_hash
    assert [a.path.name, b.path.name, c.path.name] == [f"{STAMP}-{digest}", f"{STAMP}-2-{digest}",
                                                       f"{STAMP}-3-{digest}"]
    assert all((r.path / "config.yaml").is_file() and (r.path / "provenance.json").is_file() for r in (a, b, c))
    # A DDP child that Lightning launches inherits rank 0's stamp, suffix included, and joins its dir.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert prepare_run_dir(cfg).path == c.path
    monkeypatch.delenv("LOCAL_RANK")

    # resume=auto takes the newest: -3 over -2 over the plain stamp, and -10 over -9 (not string order).
    auto = compose("supervised/embedded", tiny("resume=auto"))
    for r in (a, b):
        (r.checkpoints / "last.ckpt").write_bytes(b"x")
    assert find_resumable(auto, digest) == b.path
    (c.checkpoints / "last.ckpt").write_bytes(b"x")
    assert find_resumable(auto, digest) == c.path
    for n in (9, 10):
        (a.path.parent / f"{STAMP}-{n}-{digest}" / "checkpoints").mkdir(parents=True)
        (a.path.parent / f"{STAMP}-{n}-{digest}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert find_resumable(auto, digest).name == f"{STAMP}-10-{digest}"

