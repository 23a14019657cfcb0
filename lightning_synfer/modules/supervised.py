"""Supervised FER: a timm backbone + linear head, trained on real, synthetic or mixed batches."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_synfer import hardware, optim
from lightning_synfer.batch_mix import BatchMix
from lightning_synfer.losses import SoftTargetCrossEntropy
from lightning_synfer.modules.base import FERClassifierModule


class SupervisedFER(FERClassifierModule):
    task_name = "supervised"

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None,
                 au_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(config, label_names, normalization)
        self.save_hyperparameters()
        self.build_backbone_and_head()
        m = self.cfg.model
        if au_names is None and m.au_head:
            # Batches carry AUs in this one order (datamodules/procedural/aus.py), whatever the dataset.
            from datamodules.procedural.aus import AU_NAMES

            au_names = AU_NAMES
        self.au_names = list(au_names or [])
        # Optional AU regression head: measures the AU error of generated faces (evaluate-generation).
        self.au_head = nn.Linear(self.backbone.num_features, len(self.au_names)) if m.au_head and self.au_names else None
        loss = self.cfg.loss
        self.criterion = SoftTargetCrossEntropy(loss.label_smoothing, loss.class_weights)
        self.mixup = None
        if loss.mixup_alpha > 0 or loss.cutmix_alpha > 0:
            self.mixup = BatchMix(mixup_alpha=loss.mixup_alpha, cutmix_alpha=loss.cutmix_alpha, prob=loss.mixup_prob)
        self.train_acc = nn.ModuleDict({d: MulticlassAccuracy(self.num_classes, average="micro")
                                        for d in ("all", "real", "synthetic")})
        if hardware.choose(self.cfg.trainer, m).channels_last:  # model.channels_last: auto follows the precision
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, target = batch["image"], batch["label_soft"]
        aus, has_aus = batch.get("aus"), batch.get("has_aus")
        if self.mixup is not None:
            # Every target follows the images: soft labels (rectified labels stay soft) and AUs, same partners and
            # coefficient; a mixed face has AU targets only when both of its parts had them.
            images, mix = self.mixup.draw(images)
            if mix is not None:
                target = mix.targets(target)
                if has_aus is not None:
                    aus, has_aus = mix.targets(aus), mix.has_both(has_aus)
        feats = self.backbone(images)
        logits = self.head(feats)
        loss = self.criterion(logits, target)
        if self.au_head is not None and has_aus is not None and has_aus.any():
            au_loss = F.mse_loss(torch.sigmoid(self.au_head(feats[has_aus])), aus[has_aus].to(feats))
            loss = loss + self.cfg.model.au_loss_weight * au_loss
            self.log("train/au_mse", au_loss, sync_dist=True)
        preds = logits.detach().argmax(-1)
        self.train_acc["all"](preds, batch["label"])
        for dom_id, name in ((0, "real"), (1, "synthetic")):
            mask = batch["domain"] == dom_id
            if mask.any():
                self.train_acc[name].update(preds[mask], batch["label"][mask])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc["all"], on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        for name in ("real", "synthetic"):
            metric = self.train_acc[name]
            if metric.update_count:
                self.log(f"train_{name}/acc", metric.compute())
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.au_head is not None:
            checkpoint["synfer"]["au_names"] = self.au_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored_aus = checkpoint.get("synfer", {}).get("au_names")
        if self.au_head is not None and stored_aus is not None:  # resume into this run's AU vocabulary
            from datamodules.au_vocabulary import check_same_aus

            check_same_aus(stored_aus, self.au_names, source="classifier checkpoint (its AU head's outputs)",
                           target="this run's AU vocabulary")

    def predict_aus(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        if self.au_head is None:
            return None
        return torch.sigmoid(self.au_head(self.backbone(images)))

    def configure_optimizers(self) -> Any:
        return optim.configure(self, self.trainer, self.cfg.optim, self.cfg.data.batch_size)
