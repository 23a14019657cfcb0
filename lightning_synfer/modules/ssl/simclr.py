"""SimCLR (Chen et al., ICML 2020): BN projector, NT-Xent over both views with negatives from every rank
(lightly's NTXentLoss(gather_distributed=True): its all-gather passes gradients back to their rank)."""
from __future__ import annotations

from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead

from lightning_synfer.modules.ssl.base import SSLBase


class SimCLR(SSLBase):
    # Chen et al. 2020, Sec. 2.2 "Global BN": per-device BN statistics leak which samples are positives.
    needs_sync_batchnorm = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        s = self.cfg.ssl
        self.projector = SimCLRProjectionHead(self.feat_dim, s.proj_hidden_dim, s.proj_output_dim)
        self.criterion = NTXentLoss(temperature=s.temperature, memory_bank_size=0, gather_distributed=True)

    def ssl_step(self, views):
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        return self.criterion(self.projector(f1), self.projector(f2)), [f1, f2]
