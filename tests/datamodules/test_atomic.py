"""Atomic writes respect the umask (files a group on a shared cluster can read), leave no temporaries behind, and
every writer of the suite goes through the one helper in datamodules/atomic.py."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import atomic
from datamodules.atomic import (atomic_open, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                current_umask)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[0o022, 0o007], ids=["umask022", "umask007"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expected(umask: int) -> int:
    return 0o666 & ~umask  # what open(path, "w") would create: 0o644 under 0o022, 0o660 under 0o007


def test_current_umask_is_the_process_umask(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask  # reading it left the umask as it was


def test_every_helper_creates_files_with_the_umask_mode(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    atomic_write_json(tmp_path / "metrics.json", {"acc": 1.0})
    with atomic_path(tmp_path / "c.pt") as tmp:
        torch.save({"w": torch.zeros(1)}, tmp)
    with atomic_open(tmp_path / "d.npz", "wb") as fh:
        np.savez(fh, a=np.zeros(2))
    for name in ("a.txt", "b.bin", "metrics.json", "c.pt", "d.npz"):
        assert _mode(tmp_path / name) == _expected(umask), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.pt", "d.npz", "metrics.json"]


def test_run_dir_config_metrics_and_checkpoint_get_the_umask_mode(tmp_path, tiny, umask, monkeypatch):
    from lightning_synfer.config import compose
    from lightning_synfer.runs import prepare_run_dir
    from lightning_synfer.trainer import AtomicCheckpointIO

    monkeypatch.setenv("SYNFER_RUN_STAMP", "")
    run = prepare_run_dir(compose("supervised/embedded", tiny("model.backbone=test_resnet", "data.test=null")))
    run.write_metrics({"test/acc": 0.5})
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, run.checkpoints / "last.ckpt")
    for path in (run.path / "config.yaml", run.path / "provenance.json", run.metrics_path,
                 run.checkpoints / "last.ckpt"):
        assert _mode(path) == _expected(umask), path


def test_a_fit_writes_group_readable_checkpoints_and_metrics(tmp_path, tiny):
    """Through Lightning's ModelCheckpoint (best.ckpt, last.ckpt) and our RunDir, under a group umask."""
    from lightning_synfer.config import compose
    from lightning_synfer.tasks import fit

    old = os.umask(0o007)
    try:
        fit.run(compose("supervised/embedded", tiny("model.backbone=test_resnet", "data.test=null",
                                                    "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")))
    finally:
        os.umask(old)
    (run,) = {p.parent for p in (tmp_path / "runs").rglob("metrics.json")}
    files = [run / "config.yaml", run / "metrics.json", run / "checkpoints" / "best.ckpt",
             run / "checkpoints" / "last.ckpt"]
    assert {str(p): oct(_mode(p)) for p in files} == {str(p): oct(0o660) for p in files}


def test_synthetic_manifest_header_and_image_writers_get_the_umask_mode(tmp_path, umask):
    from datamodules.procedural.dataset import render_split_cached
    from datamodules.synthetic import read_manifest, write_manifest
    from fixtures import make_synthetic_set
    from lightning_synfer.synthesis.writer import write_image_atomic

    root = make_synthetic_set(tmp_path / "syn", n=2)
    _, records = read_manifest(str(root))
    write_manifest(str(root), records, version=2)
    write_image_atomic(root / "images" / "x.png", np.zeros((4, 4), dtype=np.uint8))
    for path in (root / "dataset.json", root / "manifest.v2.jsonl", root / "images" / "x.png"):
        assert _mode(path) == _expected(umask), path

    render_split_cached("val", 4, size=16, channels=1, seed=0, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    assert _mode(cache) == _expected(umask), cache


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_no_overwrite_refuses_an_existing_file_and_keeps_it(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_text(path, "first")
    with pytest.raises(FileExistsError, match=r"m\.json"):
        atomic_write_text(path, "second", overwrite=False)
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_no_overwrite_race_has_exactly_one_winner(tmp_path):
    """Two writers of one new file: the check before the write passes for both; the commit lets only one in."""
    path = tmp_path / "v2.jsonl"
    barrier, outcomes = threading.Barrier(2), []

    def write(text: str) -> None:
        try:
            with atomic_path(path, overwrite=False) as tmp:
                tmp.write_text(text)
                barrier.wait()
            outcomes.append(text)
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[-1] == "refused" and path.read_text() in outcomes
    assert [p.name for p in tmp_path.iterdir()] == ["v2.jsonl"]


def test_umask_fallback_without_proc(monkeypatch, umask):
    monkeypatch.setattr(atomic, "_PROC_STATUS", "/nonexistent/status")
    assert current_umask() == umask


def test_no_other_atomic_write_implementation_in_the_package():
    """One helper: no other module of ours renames a temporary file into place or makes one with mkstemp."""
    out = subprocess.run(["git", "grep", "-n", "-E", r"mkstemp|NamedTemporaryFile|os\.replace\(|os\.rename\(",
                          "--", "*.py", ":!tests/", ":!datamodules/atomic.py"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and not out.stdout, out.stdout  # 1: git grep found nothing


def test_umask_is_read_without_changing_it_from_another_thread():
    """The /proc path never sets the umask to 0, so a thread creating a file meanwhile keeps its mode."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc on this platform (the fallback swaps the umask briefly)")
    code = ("import os, datamodules.atomic as a\n"
            "calls = []\n"
            "real = os.umask\n"
            "os.umask = lambda m: calls.append(m) or real(m)\n"
            "a.current_umask()\n"
            "print(calls)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
