"""DINO (Caron et al., ICCV 2021): student sees global + local crops, the EMA teacher only the global ones;
cross-entropy to the centred, sharpened teacher (lightly's DINOLoss; its centre is all-reduced over ranks).
The last head layer stays frozen for ssl.dino_freeze_last_layer_epochs epochs."""
from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from lightly.models.modules.heads import DINOProjectionHead

from lightning_synfer.modules.ssl.momentum import MomentumSSL


class DINO(MomentumSSL):
    # Caron et al. 2021 (official code): SyncBN whenever the model has BatchNorm (ResNet-50, BN heads);
    # converting a BatchNorm-free ViT is a no-op.
    needs_sync_batchnorm = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        s = self.cfg.ssl
        def head() -> DINOProjectionHead:
            return DINOProjectionHead(
                self.feat_dim, s.proj_hidden_dim, s.dino_bottleneck_dim, s.dino_output_dim,
                batch_norm=s.dino_batch_norm, freeze_last_layer=s.dino_freeze_last_layer_epochs,
                norm_last_layer=s.dino_norm_last_layer)

        self.projector = head()
        self.make_teacher("backbone", "projector", projector=head)
        self.criterion = DINOLoss(
            s.dino_output_dim, warmup_teacher_temp=s.dino_warmup_teacher_temp, teacher_temp=s.dino_teacher_temp,
            warmup_teacher_temp_epochs=s.dino_warmup_teacher_temp_epochs, student_temp=s.dino_student_temp,
            center_momentum=s.dino_center_momentum)

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
