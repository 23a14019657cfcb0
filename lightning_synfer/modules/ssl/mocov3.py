"""MoCo v3 (Chen, Xie & He, ICCV 2021): 3-layer BN projector, 2-layer predictor, momentum key encoder,
symmetric ctr(q1, k2) + ctr(q2, k1) with keys gathered from every rank (losses/ssl.py: MoCoV3Loss).
Heads as in the official code: no linear biases, BN everywhere except the predictor's output, the
projector's last BN without affine parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from lightly.models.modules.heads import ProjectionHead

from lightning_synfer.config.errors import check
from lightning_synfer.losses.ssl import MoCoV3Loss
from lightning_synfer.modules.ssl import register_method
from lightning_synfer.modules.ssl.momentum import MomentumSSL


@dataclass
class MoCoV3Settings:
    temperature: float = 0.2  # of the contrastive loss ctr(q, k)

    def validate(self, key: str) -> None:
        check(self.temperature > 0, f"{key}.temperature", self.temperature, "a value > 0")


@register_method("mocov3", MoCoV3Settings)
class MoCoV3(MomentumSSL):
    # Chen, Xie & He 2021 (implementation details, official code): SyncBN in the encoder and both MLP heads.
    needs_sync_batchnorm = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        s = self.cfg.ssl
        hid, out = s.proj_hidden_dim, s.proj_output_dim
        self.projector = ProjectionHead([(self.feat_dim, hid, nn.BatchNorm1d(hid), nn.ReLU()),
                                         (hid, hid, nn.BatchNorm1d(hid), nn.ReLU()),
                                         (hid, out, nn.BatchNorm1d(out, affine=False), None)])
        self.predictor = ProjectionHead([(out, s.pred_hidden_dim, nn.BatchNorm1d(s.pred_hidden_dim), nn.ReLU()),
                                         (s.pred_hidden_dim, out, None, None, False)])
        self.make_teacher("backbone", "projector")
        self.criterion = MoCoV3Loss(self.settings.temperature, gather_distributed=True)

    def ssl_step(self, views):
        x1, x2 = views[:2]
        f1, f2 = self.backbone(x1), self.backbone(x2)
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            t = self.teacher
            k1, k2 = t["projector"](t["backbone"](x1)), t["projector"](t["backbone"](x2))
        return self.criterion(q1, k2) + self.criterion(q2, k1), [f1, f2]
