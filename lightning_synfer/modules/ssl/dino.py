"""DINO (Caron et al., ICCV 2021): student sees global + local crops, the EMA teacher only the global ones;
cross-entropy to the centred, sharpened teacher (lightly's DINOLoss; its centre is all-reduced over ranks).
The last head layer stays frozen for ssl.methods.dino.freeze_last_layer_epochs epochs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead

from lightning_synfer.config.errors import check
from lightning_synfer.modules.ssl import register_method
from lightning_synfer.modules.ssl.momentum import MomentumSSL


@dataclass
class DINOSettings:
    """ssl.methods.dino: the head (hidden width: ssl.proj_hidden_dim) and the centred, sharpened targets."""

    bottleneck_dim: int = 256
    output_dim: int = 65536
    batch_norm: bool = False  # BN in the head (ResNet backbones in the DINO paper use it)
    norm_last_layer: bool = True
    freeze_last_layer_epochs: int = 1
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # raised linearly to teacher_temp over warmup_teacher_temp_epochs
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9

    def validate(self, key: str) -> None:
        for name in ("bottleneck_dim", "output_dim"):
            check(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), ">= 1")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "a temperature > 0")
        for name in ("freeze_last_layer_epochs", "warmup_teacher_temp_epochs"):
            check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), ">= 0 epochs")
        check(0 <= self.center_momentum < 1, f"{key}.center_momentum", self.center_momentum, "a value in [0, 1)")


@register_method("dino", DINOSettings)
class DINO(MomentumSSL):
    # Caron et al. 2021 (official code): SyncBN whenever the model has BatchNorm (ResNet-50, BN heads);
    # converting a BatchNorm-free ViT is a no-op.
    needs_sync_batchnorm = True
    uses_local_crops = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        d = self.settings

        def head() -> DINOProjectionHead:
            return DINOProjectionHead(
                self.feat_dim, self.cfg.ssl.proj_hidden_dim, d.bottleneck_dim, d.output_dim, batch_norm=d.batch_norm,
                freeze_last_layer=d.freeze_last_layer_epochs, norm_last_layer=d.norm_last_layer)

        self.projector = head()
        self.make_teacher("backbone", "projector", projector=head)
        self.criterion = DINOLoss(
            d.output_dim, warmup_teacher_temp=d.warmup_teacher_temp, teacher_temp=d.teacher_temp,
            warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs, student_temp=d.student_temp,
            center_momentum=d.center_momentum)

    def ssl_step(self, views):
        feats = [self.backbone(v) for v in views]
        student = [self.projector(f) for f in feats]
        with torch.no_grad():
            t = self.teacher
            teacher = [t["projector"](t["backbone"](v)) for v in views[:self.num_global_views]]
        loss = self.criterion(teacher, student, epoch=self.current_epoch)
        return loss, feats[:self.num_global_views]

    def on_after_backward(self) -> None:
        self.projector.cancel_last_layer_gradients(self.current_epoch)
