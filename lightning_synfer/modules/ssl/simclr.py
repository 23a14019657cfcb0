"""SimCLR (Chen et al., ICML 2020): BN projector, NT-Xent over both views with negatives from every rank
(lightly's NTXentLoss(gather_distributed=True): its all-gather passes gradients back to their rank)."""
from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead

from lightning_synfer.config.errors import check
from lightning_synfer.modules.ssl import register_method
from lightning_synfer.modules.ssl.base import SSLBase


@dataclass
class SimCLRSettings:
    temperature: float = 0.2  # NT-Xent

    def validate(self, key: str) -> None:
        check(self.temperature > 0, f"{key}.temperature", self.temperature, "a value > 0")


@register_method("simclr", SimCLRSettings)
class SimCLR(SSLBase):
    # Chen et al. 2020, Sec. 2.2 "Global BN": per-device BN statistics leak which samples are positives.
    needs_sync_batchnorm = True

    def __init__(self, config, label_names, normalization=None) -> None:
        super().__init__(config, label_names, normalization)
        s = self.cfg.ssl
        self.projector = SimCLRProjectionHead(self.feat_dim, s.proj_hidden_dim, s.proj_output_dim)
        self.criterion = NTXentLoss(temperature=self.settings.temperature, memory_bank_size=0,
                                    gather_distributed=True)

    def ssl_step(self, views):
        f1, f2 = self.backbone(views[0]), self.backbone(views[1])
        return self.criterion(self.projector(f1), self.projector(f2)), [f1, f2]
