"""Images that pass the header scan but fail to decode at run time: counted and listed in the run dir with loader
workers too (the sample carries the failure to the main process), without changing the mixed batch composition."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from PIL import Image

from datamodules.datamodule import FERDataModule
from datamodules.records import BadImageError, load_image
from fixtures import make_folder_dataset, make_synthetic_set
from lightning_synfer.config import compose
from lightning_synfer.tasks import fit


def truncate_body(path: Path) -> Path:
    """Cut off the second half of the pixel data: the header still parses, the pixels do not decode."""
    data = path.read_bytes()
    start = data.find(b"\xff\xda") if path.suffix == ".jpg" else 64  # JPEG: start of scan; PNG: past IHDR
    path.write_bytes(data[: start + (len(data) - start) // 2])
    with Image.open(path) as img:
        assert img.size  # passes the header scan (data.verify_images)
    with pytest.raises(BadImageError, match="cannot decode"):
        load_image(str(path))
    return path


def _folder_with_truncated_jpeg(tmp_path: Path) -> Path:
    """8 records (one batch of data.batch_size=8), one of them a truncated JPEG."""
    root = make_folder_dataset(tmp_path / "faces", classes=("happy", "sad"), per_class=4, size=32)
    truncate_body(root / "happy" / "0002.jpg")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_runtime_decode_failure_reaches_count_and_run_dir(tiny, tmp_path, monkeypatch, workers):
    """The truncated file is met once per epoch for 2 epochs (in a persistent worker with workers=1): counted
    once, listed by name, and bad_images.txt already holds it when epoch 2 starts."""
    root = _folder_with_truncated_jpeg(tmp_path)
    run = tmp_path / "run"
    seen_at_epoch_2: list[str] = []

    class ReadListAtEpoch2(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1:
                seen_at_epoch_2.append((run / "bad_images.txt").read_text())

    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: real_build(*a, callbacks=[ReadListAtEpoch2()], **k))
    cfg = compose("supervised/embedded", tiny(
        f"data.train.root={root}", "data.train.format=folder", "data.test=null",
        "data.num_classes=7", f"data.num_workers={workers}", "model.backbone=test_resnet", "trainer.max_epochs=2",
        "logger.tensorboard=false", f"run_dir={run}"))
    metrics = fit.run(cfg)
    assert metrics["global_step"] == 2
    assert metrics["num_skipped"] == 1
    assert json.loads((run / "metrics.json").read_text())["num_skipped"] == 1
    listed = (run / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 1 and "0002.jpg" in listed[0] and "cannot decode" in listed[0], listed
    assert seen_at_epoch_2 and "0002.jpg" in seen_at_epoch_2[0]


def test_substitute_keeps_the_mixed_batch_composition(tiny, tmp_path):
    """A bad synthetic image is replaced by another synthetic one inside the worker: every batch keeps exactly the
    sampler's synthetic share, the substitute's `skipped` names the file, and the DataModule counts it once."""
    syn = make_synthetic_set(tmp_path / "syn", n=8, num_classes=8, size=32)
    truncate_body(syn / "images" / "000003.png")
    cfg = compose("supervised/embedded", tiny(
        f"data.synthetic.root={syn}", "data.synthetic.format=synthetic", "data.mix.synthetic_ratio=0.5",
        "data.num_workers=1", "data.val=null", "data.test=null"))
    dm = FERDataModule(cfg, run_dir=str(tmp_path / "run"))
    dm.setup("fit")
    assert dm.num_skipped == 0  # the header scan let it through
    loader = dm.train_dataloader()
    marked = []
    for step, batch in enumerate(loader):
        plan = loader.batch_sampler.global_batch(step)
        assert batch["index"].tolist() == [i if i < 64 else i - 64 for i in plan]
        assert [int(d) for d in batch["domain"]] == [int(i >= 64) for i in plan]
        assert int(batch["domain"].sum()) == 4
        marked += [(int(d), s) for d, s in zip(batch["domain"], batch["skipped"]) if s]
        dm.on_after_batch_transfer(batch, 0)  # what the Trainer calls in the main process
    # 16 steps x 4 synthetic = 8 passes over the 8 synthetic images: the bad one came up 8 times
    assert len(marked) == 8 and all(d == 1 and "000003.png" in s for d, s in marked)
    assert dm.num_skipped == 1 and len(dm.datasets["synthetic"].bad) == 0  # main-process copy: never decoded
    dm.teardown("fit")
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 1 and "000003.png" in listed[0]
