"""BYOL (Grill et al., NeurIPS 2020): online projector + predictor regress the EMA target's projection of
the other view; symmetric negative cosine similarity (no negatives, so nothing to gather)."""
from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

from lightning_synfer.modules.ssl import register_method
from lightning_synfer.modules.ssl.momentum import MomentumSSL


@register_method("byol")  # no settings beyond the shared head dims and momentum schedule
class BYOL(MomentumSSL):
    # Grill et al. 2020: BN statistics over the whole 4096 batch (cross-replica BN on 512 TPU cores).
    needs_sync_batchnorm = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        s = self.cfg.ssl
        self.projector = BYOLProjectionHead(self.feat_dim, s.proj_hidden_dim, s.proj_output_dim)
        self.predictor = BYOLPredictionHead(s.proj_output_dim, s.pred_hidden_dim, s.proj_output_dim)
        self.make_teacher("backbone", "projector")
        self.criterion = NegativeCosineSimilarity()

    def ssl_step(self, views):
        x1, x2 = views[:2]
        f1, f2 = self.backbone(x1), self.backbone(x2)
        p1, p2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            t = self.teacher
            z1, z2 = t["projector"](t["backbone"](x1)), t["projector"](t["backbone"](x2))
        return 0.5 * (self.criterion(p1, z2) + self.criterion(p2, z1)), [f1, f2]
