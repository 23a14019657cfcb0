"""`run.py evaluate ckpt=<embedded checkpoint> data.test.root=DIR`, as a new user types it (no data.test.format):
DIR is read as a class-per-folder set (and the log says so), its problems are errors naming the key, and the
reported numbers are DIR's. An explicit data.test.format=embedded with a root is refused (embedded reads no folder).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from datamodules.procedural.dataset import render_split
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.tasks import fit

# The faces the checkpoint was trained on: 8 classes, 1 channel, 32 px (tiny_overrides' image size).
SIZE, CHANNELS = 32, 1


@pytest.fixture(scope="module")
def embedded_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    metrics = fit.run(compose("supervised/embedded", tiny_overrides(root, "model.backbone=test_resnet",
                                                                    "data.test=null", f"data.channels={CHANNELS}")))
    return Path(metrics["best_checkpoint"])


def _evaluate(tmp_path: Path, ckpt: Path, *extra: str) -> int:
    """The user's command: no experiment, no data.test.format, no data.test.num_images."""
    return main(["evaluate", f"ckpt={ckpt}", "trainer=cpu", "data.num_workers=0", "trainer.enable_progress_bar=false",
                 f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}", *extra])


def _metrics(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "runs").rglob("metrics.json")
    return json.loads(path.read_text())


def _faces_folder(root: Path, per_class: int = 2) -> dict[str, int]:
    """root/<class>/<i>.png from rendered embedded faces (labels known); returns files per class."""
    faces = render_split("val", 8 * per_class, size=SIZE, channels=CHANNELS, seed=5)
    counts: dict[str, int] = {}
    for i, (image, label) in enumerate(zip(faces.images, faces.labels)):
        name = faces.class_names[int(label)]
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if CHANNELS == 1 else image).save(root / name / f"{i:03d}.png")
        counts[name] = counts.get(name, 0) + 1
    return counts


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_root_without_format_evaluates_that_folder_and_says_so(tmp_path, embedded_ckpt, caplog):
    folder = tmp_path / "faces"
    counts = _faces_folder(folder)
    with caplog.at_level(logging.WARNING, logger="lightning_synfer.tasks.evaluate"):
        assert _evaluate(tmp_path, embedded_ckpt, f"data.test.root={folder}") == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "data.test.format" in said and "folder" in said and str(folder) in said, said
    metrics = _metrics(tmp_path)
    assert metrics["test_format"] == "folder" and metrics["test_root"] == str(folder)
    assert metrics["num_images"] == sum(counts.values()) == 16  # every file of DIR, not the embedded test set
    rows = dict(zip(metrics["label_names"], map(sum, metrics["confusion_matrix"])))
    assert {name: n for name, n in rows.items() if n} == counts  # DIR's labels, class by class


def test_missing_root_is_an_error_naming_the_key(tmp_path, embedded_ckpt, capsys):
    missing = tmp_path / "no_such_dir"
    assert _evaluate(tmp_path, embedded_ckpt, f"data.test.root={missing}") == 2
    line = _error_line(capsys)
    assert f"data.test.root={missing}" in line and "does not exist" in line, line


def test_unknown_class_folder_is_an_error_naming_the_folder(tmp_path, embedded_ckpt, capsys):
    folder = tmp_path / "faces"
    _faces_folder(folder, per_class=1)
    (folder / "happy").rename(folder / "grumpy")
    assert _evaluate(tmp_path, embedded_ckpt, f"data.test.root={folder}") == 2
    line = _error_line(capsys)
    assert "grumpy" in line and "happy" in line, line  # the folder, and the names it could have been


def test_corrupt_images_are_skipped_and_counted_or_refused(tmp_path, embedded_ckpt, capsys):
    folder = tmp_path / "faces"
    counts = _faces_folder(folder)
    (folder / "sad" / "broken.png").write_bytes(b"\x89PNG not really an image")
    assert _evaluate(tmp_path, embedded_ckpt, f"data.test.root={folder}", "data.on_bad_image=skip") == 0
    metrics = _metrics(tmp_path)
    assert metrics["num_skipped"] == 1 and metrics["num_images"] == sum(counts.values())
    capsys.readouterr()
    assert _evaluate(tmp_path / "strict", embedded_ckpt, f"data.test.root={folder}", "data.on_bad_image=error") == 2
    assert "broken.png" in _error_line(capsys)


def test_explicit_embedded_format_with_a_root_is_an_error(tmp_path, embedded_ckpt, capsys):
    folder = tmp_path / "faces"
    _faces_folder(folder, per_class=1)
    assert _evaluate(tmp_path, embedded_ckpt, f"data.test.root={folder}", "data.test.format=embedded") == 2
    line = _error_line(capsys)
    assert "data.test.root" in line and "data.test.format=embedded" in line and "folder" in line, line
    assert not list((tmp_path / "runs").rglob("metrics.json"))
