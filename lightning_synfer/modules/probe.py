"""Offline evaluation of a self-supervised backbone: a linear probe (frozen backbone) or a fine-tune.

Both are FER classifiers (`FERClassifierModule`), so `evaluate`, guidance and the labelling ensemble accept
their checkpoints (tasks `ssl_linear`, `ssl_finetune`). `lightning_synfer/tasks/linear.py` builds them
from an `ssl` checkpoint: the config's model section is the SSL run's, the weights are copied in.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_synfer import optim
from lightning_synfer.losses import SoftTargetCrossEntropy
from lightning_synfer.modules.base import FERClassifierModule


class SSLProbe(FERClassifierModule):
    task_name = "ssl_probe"
    freeze_backbone = True

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None) -> None:
        super().__init__(config, label_names, normalization)
        self.save_hyperparameters()
        self.build_backbone_and_head()
        probe_cfg = self.cfg.get("ssl", {}).get("probe", {})
        self.feature_norm = (nn.BatchNorm1d(self.backbone.num_features, affine=False)
                             if probe_cfg.get("feature_norm", False) else nn.Identity())
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        self.criterion = SoftTargetCrossEntropy(self.cfg.loss.label_smoothing, self.cfg.loss.class_weights)
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")

    def load_backbone(self, backbone: nn.Module) -> None:
        self.backbone.load_state_dict(backbone.state_dict())

    def train(self, mode: bool = True) -> "SSLProbe":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen features: BatchNorm statistics and dropout stay as pre-trained
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_norm(self.backbone(images)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.set_grad_enabled(not self.freeze_backbone):
            feats = self.backbone(batch["image"])
        return self._soft_label_loss(self.head(self.feature_norm(feats)), batch)

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        global_batch = int(self.cfg.data.batch_size)
        groups = optim.param_groups(self.head, o.weight_decay)  # feature_norm has statistics, no parameters
        if not self.freeze_backbone:
            backbone_lr = (optim.scaled_lr(o, optim.effective_batch(global_batch, self.trainer))
                           * self.cfg.ssl.probe.backbone_lr_ratio)
            groups += [{**g, "lr": backbone_lr} for g in optim.param_groups(self.backbone, o.weight_decay)]
        return optim.configure(self, self.trainer, o, global_batch, groups=[g for g in groups if g["params"]])


class LinearProbe(SSLProbe):
    task_name = "ssl_linear"
    freeze_backbone = True


class FinetuneProbe(SSLProbe):
    task_name = "ssl_finetune"
    freeze_backbone = False
