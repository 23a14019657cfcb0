"""SSL losses lightly lacks. Everything else (NTXentLoss, DINOLoss, NegativeCosineSimilarity) comes from lightly.

MoCo v3's contrastive loss is *not* lightly's ``NTXentLoss(memory_bank_size=0)``: NT-Xent also uses the
other view's queries as negatives and symmetrises over both inputs, while MoCo v3 (Chen, Xie & He 2021,
Algorithm 1) contrasts each query only with the keys of the momentum encoder:

    ctr(q, k) = CrossEntropy(q · k_allᵀ / τ, labels = arange(N) + rank · N) · 2τ

with q, k l2-normalised and k_all the keys gathered from every rank. tests/lightning_synfer/test_ssl.py
checks this class against that formula and shows that NTXentLoss differs from it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.utils import dist


class MoCoV3Loss(nn.Module):
    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"MoCoV3Loss: temperature={temperature}, expected a value > 0")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: (N, D) queries (predictor output, with grad); k: (N, D) keys (momentum encoder, detached)."""
        q = F.normalize(q, dim=1)
        k = F.normalize(k.detach(), dim=1)
        n, offset = q.shape[0], 0
        if self.gather_distributed and dist.world_size() > 1:
            k = torch.cat(dist.gather(k), 0)  # keys carry no gradient: the gather only widens the negatives
            offset = dist.rank() * n
        logits = q @ k.T / self.temperature
        labels = torch.arange(n, device=q.device) + offset
        # The 2τ factor makes the gradient scale independent of τ (MoCo v3, Algorithm 1).
        return F.cross_entropy(logits, labels) * (2 * self.temperature)
