"""The base of every self-supervised method: backbone, multi-view data, optimizer, online evaluation.

A method subclasses `SSLBase` (or `MomentumSSL` for an EMA teacher), registers itself with its settings
dataclass (`@register_method("name", Settings)`, see ssl/__init__.py; `self.settings` is then filled from
ssl.methods.<name>), builds its heads in `__init__` and implements one function:

    ssl_step(views) -> (loss, feats)   views: list of (B, C, H, W) crops, the first `num_global_views`
                                       global; feats: backbone features of the global views (for the
                                       online probe, which sees them detached)

Online evaluation (solo-learn style): a linear probe on detached features, trained with its own
cross-entropy in the same optimizer (its parameter group has no weight decay, so LARS leaves it
unadapted), and a weighted kNN on real validation data (bank: the real train split under the eval
transform, validation dataloader 0; queries: data.val, dataloader 1). Logged as val/linear_acc and
val/knn_acc; best.ckpt tracks val/knn_acc.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2 as T

from datamodules.datamodule import FERDataModule, FERDataset
from datamodules.transforms import MultiView, RandomLightGradient, eval_transform
from lightning_synfer import optim
from lightning_synfer.metrics.knn import WeightedKNN
from lightning_synfer.config.ssl import method_settings
from lightning_synfer.models.backbones import create_backbone
from lightning_synfer.modules.base import CHECKPOINT_FORMAT, default_normalization

# -- multi-view augmentation ------------------------------------------------------------------------


def _view(aug: DictConfig, size: int, channels: int, mean: Sequence[float], std: Sequence[float],
          scale: Sequence[float], blur: float, solarize: float) -> Callable:
    """One BYOL/MoCo v3 style view; colour ops that need RGB are skipped for grayscale faces."""
    j = aug.color_jitter
    jitter = (T.ColorJitter(brightness=j, contrast=j) if channels == 1
              else T.ColorJitter(brightness=j, contrast=j, saturation=j / 2, hue=min(0.1, j / 4)))
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the crop, odd
    ops: list = [T.RandomRotation(aug.rotation, fill=127)] if aug.rotation > 0 else []  # grey corners
    ops += [T.RandomResizedCrop(size, scale=tuple(scale), antialias=True), T.RandomHorizontalFlip(aug.hflip)]
    if j > 0 and aug.color_jitter_prob > 0:
        ops.append(T.RandomApply([jitter], p=aug.color_jitter_prob))
    if channels == 3 and aug.grayscale_prob > 0:
        ops.append(T.RandomGrayscale(aug.grayscale_prob))
    if blur > 0:
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
    if solarize > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize))  # on the PIL image (uint8)
    ops += [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if aug.light_gradient > 0:
        ops.append(RandomLightGradient(aug.light_gradient))
    if aug.noise_std > 0:
        ops.append(T.GaussianNoise(sigma=aug.noise_std, clip=True))
    ops.append(T.Normalize(list(mean), list(std)))
    return T.Compose(ops)


def multi_view_transform(cfg: DictConfig, mean: Sequence[float], std: Sequence[float]) -> MultiView:
    """Two global crops (asymmetric blur/solarize) + `ssl.aug.local_crops` small crops (DINO)."""
    aug, size, ch = cfg.ssl.aug, cfg.data.image_size, cfg.data.channels
    views = [_view(aug, size, ch, mean, std, aug.crop_scale, aug.blur_prob[i], aug.solarize_prob[i]) for i in (0, 1)]
    local_size = aug.local_size or max(8, round(size * 96 / 224))
    views += [_view(aug, local_size, ch, mean, std, aug.local_crop_scale, 0.5, 0.0) for _ in range(aug.local_crops)]
    return MultiView(views)


class SSLDataModule(FERDataModule):
    """FERDataModule with multi-view training batches and, for the online kNN, a bank loader: the real
    train split (at most `ssl.online.knn_bank_size` images, a seeded subset) under the eval transform."""

    def __init__(self, cfg: DictConfig, *, normalization: Optional[dict], run_dir: Optional[str] = None) -> None:
        norm = normalization or {}
        mean = list(cfg.data.mean or norm.get("mean") or [0.5] * cfg.data.channels)
        std = list(cfg.data.std or norm.get("std") or [0.5] * cfg.data.channels)
        super().__init__(cfg, normalization=normalization, train_transform=multi_view_transform(cfg, mean, std),
                         run_dir=run_dir)
        self.online = cfg.ssl.online

    def setup(self, stage: Optional[str] = None) -> None:
        super().setup(stage)
        if not (self.online.knn and self.data.val is not None and "bank" not in self.datasets
                and stage in (None, "fit", "validate")):
            return
        train = self.datasets.get("train")
        records = list(train.records) if train is not None else self.load_records(self.data.train, "data.train")
        n = self.online.knn_bank_size
        if n and n < len(records):
            keep = np.sort(np.random.default_rng(self.cfg.seed).choice(len(records), n, replace=False))
            records = [records[i] for i in keep]
        self.datasets["bank"] = FERDataset(
            records, eval_transform(self.data.image_size, self.mean, self.std), mode=self.mode,
            label_names=self.label_space.names, au_names=self.au_names, on_bad_image=self.data.on_bad_image,
            source="data.train (kNN bank)")

    def val_dataloader(self) -> list:
        if self.data.val is None:
            return []
        loaders = [self._eval_loader("val")]
        if self.online.knn:
            loaders.insert(0, self._eval_loader("bank"))  # the bank first: queries need the whole bank
        return loaders


# -- the base module ---------------------------------------------------------------------------------


class SSLBase(L.LightningModule):
    task_name = "ssl"
    num_global_views = 2
    uses_local_crops = False  # DINO's multi-crop: ssl.aug.local_crops > 0 is an error for the other methods
    # Every method says whether its BatchNorm layers need statistics over the global batch (from its paper);
    # with trainer.sync_batchnorm=null the Trainer factory then turns on SyncBatchNorm for multi-GPU runs.
    needs_sync_batchnorm: Optional[bool] = None

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: DictConfig = OmegaConf.create(config)
        self.label_names = list(label_names)
        method = self.cfg.ssl.method
        # .get: checkpoints written before ssl.methods existed have none (their methods' defaults then apply)
        self.settings = method_settings(method, (self.cfg.ssl.get("methods") or {}).get(method))
        self.num_classes = len(self.label_names)
        m = self.cfg.model
        self.backbone = create_backbone(
            m.backbone, in_chans=self.cfg.data.channels, pretrained_path=m.pretrained_path,
            drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, small_input=m.small_input, **dict(m.extra))
        self.feat_dim = int(self.backbone.num_features)
        self.normalization = dict(normalization or default_normalization(self.cfg, self.backbone))
        online = self.cfg.ssl.online
        self.probe = nn.Linear(self.feat_dim, self.num_classes) if online.linear_probe else None
        self.train_linear_acc = MulticlassAccuracy(self.num_classes, average="micro") if self.probe else None
        self.val_linear_acc = MulticlassAccuracy(self.num_classes, average="micro") if self.probe else None
        self.knn = WeightedKNN(self.num_classes, self.cfg.ssl.knn.k, self.cfg.ssl.knn.temperature) \
            if online.knn else None

    # -- what a method implements --------------------------------------------------------------------
    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement ssl_step(views) -> (loss, feats)")

    # -- fit hooks (see docs/ARCHITECTURE.md "Module families") --------------------------------------
    @staticmethod
    def build_datamodule(cfg: DictConfig, module: "SSLBase", run_dir: str) -> SSLDataModule:
        return SSLDataModule(cfg, normalization=module.normalization, run_dir=run_dir)

    @classmethod
    def trainer_overrides(cls, cfg: DictConfig) -> dict[str, Any]:
        if not isinstance(cls.needs_sync_batchnorm, bool):
            raise TypeError(f"{cls.__name__} (ssl.method={cfg.ssl.method}) must set the class attribute "
                            f"needs_sync_batchnorm to True or False; got {cls.needs_sync_batchnorm!r}")
        out: dict[str, Any] = {"needs_sync_batchnorm": cls.needs_sync_batchnorm}
        if cfg.data.val is None:
            return {**out, "monitor": None, "limit_val_batches": 0}
        online = cfg.ssl.online
        return {**out, "monitor": "val/knn_acc" if online.knn else "val/linear_acc" if online.linear_probe else None}

    def fit_metrics(self, trainer: L.Trainer, datamodule: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.cfg.ssl.method}
        for key in ("val/knn_acc", "val/linear_acc", "train/ssl_loss"):
            if key in trainer.callback_metrics:
                out[key.replace("/", "_")] = float(trainer.callback_metrics[key])
        cb = trainer.checkpoint_callback
        if cb is not None:
            if cb.best_model_score is not None:
                out["best_" + str(cb.monitor).replace("/", "_")] = float(cb.best_model_score)
                out["best_checkpoint"] = cb.best_model_path
            last = cb.last_model_path or (os.path.join(cb.dirpath, "last.ckpt") if cb.dirpath else "")
            if last and os.path.isfile(last):
                out["last_checkpoint"] = last
        return out

    # -- training ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features: what the offline probes and the kNN use."""
        return self.backbone(images)

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """SSL loss + online probe loss, without logging (the DDP test and the benchmark call this)."""
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) < self.num_global_views:
            raise ValueError(f"{type(self).__name__}: batch['image'] must be a list of >= {self.num_global_views} "
                             f"views (the SSL DataModule's MultiView transform); got {type(views).__name__}")
        ssl_loss, feats = self.ssl_step(list(views))
        out = {"ssl_loss": ssl_loss, "loss": ssl_loss}
        if self.probe is not None:
            target = batch["label"]
            keep = batch["domain"] == 0 if self.cfg.ssl.online.probe_domains == "real" else None
            logits = torch.cat([self.probe(f.detach() if keep is None else f.detach()[keep]) for f in feats])
            target = (target if keep is None else target[keep]).repeat(len(feats))
            # Sum, not mean, over an empty selection (no real samples in a synthetic-only batch): loss 0.
            probe_loss = F.cross_entropy(logits, target, reduction="sum") / max(1, target.numel())
            out.update(probe_loss=probe_loss, probe_logits=logits.detach(), probe_target=target,
                       loss=ssl_loss + probe_loss)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        self.log("train/loss", out["loss"], prog_bar=True, sync_dist=True)
        self.log("train/ssl_loss", out["ssl_loss"], sync_dist=True)
        if "probe_loss" in out and out["probe_target"].numel():
            self.log("train/probe_loss", out["probe_loss"], sync_dist=True)
            self.train_linear_acc(out["probe_logits"].argmax(-1), out["probe_target"])
            self.log("train/linear_acc", self.train_linear_acc, on_step=True, on_epoch=False)
        return out["loss"]

    # -- online evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        feats = self.backbone(batch["image"])
        if self.knn is not None and dataloader_idx == 0:
            self.knn.update(train_features=feats, train_targets=batch["label"])
            return
        if self.knn is not None:
            self.knn.update(test_features=feats, test_targets=batch["label"])
        if self.probe is not None:
            self.val_linear_acc.update(self.probe(feats).argmax(-1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        # compute() syncs metric states across ranks; the values are then plain floats on every rank.
        if self.knn is not None and self.knn.update_count:
            self.log("val/knn_acc", self.knn.compute(), prog_bar=True, sync_dist=False)
            self.knn.reset()
        if self.val_linear_acc is not None and self.val_linear_acc.update_count:
            self.log("val/linear_acc", self.val_linear_acc.compute(), prog_bar=True, sync_dist=False)
            self.val_linear_acc.reset()

    # -- optimization --------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Samples per optimizer step: batch per device x devices x nodes (x gradient accumulation)."""
        return optim.effective_batch(int(self.cfg.data.batch_size), self.trainer)

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        main = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("probe.")]
        groups = [{"params": [p for _, p in main if p.ndim > 1], "weight_decay": o.weight_decay},
                  {"params": [p for _, p in main if p.ndim <= 1], "weight_decay": 0.0}]
        if self.probe is not None:
            probe = {"params": list(self.probe.parameters()), "weight_decay": 0.0}
            if self.cfg.ssl.online.probe_lr is not None:
                probe["lr"] = self.cfg.ssl.online.probe_lr
            groups.append(probe)
        groups = [g for g in groups if g["params"]]
        return optim.configure(self, self.trainer, o, int(self.cfg.data.batch_size), groups=groups)

    # -- checkpoint metadata -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["synfer"] = {"task": self.task_name, "format": CHECKPOINT_FORMAT, "method": self.cfg.ssl.method,
                                "label_names": self.label_names, "normalization": self.normalization,
                                "feature_dim": self.feat_dim}
