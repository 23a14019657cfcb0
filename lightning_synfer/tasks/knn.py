"""`python run.py knn ckpt=SSL.ckpt [experiment=ssl/probe_rafdb]`: weighted kNN (k=ssl.knn.k, cosine,
votes exp(sim / ssl.knn.temperature)) of frozen features: bank = data.train, queries = data.test, both under
the eval transform. metrics.json has `evaluate`'s format (`metrics.fer.report`)."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lightning_synfer.metrics.fer import FERMetrics, format_table, report
from lightning_synfer.metrics.knn import WeightedKNN
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run, timed
from lightning_synfer.tasks.linear import BACKBONE_TASKS, load_backbone_module, probe_config
from lightning_synfer.trainer import build_trainer


class FeatureExtractor(L.LightningModule):
    """predict_step -> backbone features and labels (so extraction runs under the one Trainer factory)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return {"features": self.backbone(batch["image"]).float().cpu(), "label": batch["label"].cpu()}


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    from datamodules.datamodule import FERDataModule
    from datamodules.labels import LabelSpace
    from datamodules.transforms import eval_transform

    source = load_backbone_module(cfg, "knn", BACKBONE_TASKS)
    pcfg = probe_config(cfg, source, "ssl_knn")
    run_dir = start_run(pcfg, argv)
    dm = FERDataModule(pcfg, normalization=source.normalization, run_dir=str(run_dir.path))
    tf = eval_transform(pcfg.data.image_size, dm.mean, dm.std)
    bank, test = dm.build_dataset("train", tf), dm.build_dataset("test", tf)
    loaders = [DataLoader(ds, batch_size=pcfg.data.eval_batch_size, num_workers=pcfg.data.num_workers)
               for ds in (bank, test)]
    trainer = build_trainer(pcfg, None, enable_checkpointing=False, devices=1, num_nodes=1, strategy="auto")
    with timed() as clock:
        bank_out, test_out = trainer.predict(FeatureExtractor(source.backbone.eval()), dataloaders=loaders)
        knn = WeightedKNN(pcfg.data.num_classes, pcfg.ssl.knn.k, pcfg.ssl.knn.temperature)
        for out in bank_out:
            knn.update(train_features=out["features"], train_targets=out["label"])
        for out in test_out:
            knn.update(test_features=out["features"], test_targets=out["label"])
        preds, targets = knn.predictions()
    confusion = FERMetrics(pcfg.data.num_classes)
    confusion.update(preds, targets)
    label_names = list(LabelSpace.from_num_classes(pcfg.data.num_classes).names)
    metrics = report(confusion.compute(), label_names, extra={
        "task": "knn", "ckpt": str(cfg.ckpt), "experiment": pcfg.experiment, "backbone": pcfg.model.backbone,
        "k": pcfg.ssl.knn.k, "temperature": pcfg.ssl.knn.temperature, "bank_size": len(bank),
        "test_root": pcfg.data.test.root, "test_format": pcfg.data.test.format,
        "num_skipped": dm.num_skipped + len(bank.bad) + len(test.bad), "wall_time_s": clock["wall_time_s"],
        **peak_memory_mb()})
    print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
