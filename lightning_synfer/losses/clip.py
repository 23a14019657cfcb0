"""CLIP's symmetric image-caption contrastive loss (Radford et al. 2021, Figure 3), gathered across ranks.

For N image embeddings x and N caption embeddings y (l2-normalised) and a logit scale s = exp(t):

    L = ( CE(s · x yᵀ, arange(N)) + CE(s · y xᵀ, arange(N)) ) / 2

Under DDP every rank holds n = N / W pairs. Like the SSL losses (lightly's NTXentLoss, `MoCoV3Loss`), the
embeddings of every rank are gathered with lightly's differentiable all-gather, and each rank computes the loss of
its own rows against all N columns (OpenCLIP's `local_loss=True, gather_with_grad=True`):

    L_r = ( CE(s · x_r y_allᵀ, arange(n) + r·n) + CE(s · y_r x_allᵀ, arange(n) + r·n) ) / 2

The gather's backward sums the gradients of every rank's loss, so DDP's average over ranks of ∇L_r is ∇L of the
single process that sees the whole global batch; tests/lightning_synfer/test_clip_ddp.py checks that on 2 processes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightly.utils import dist


class CLIPLoss(nn.Module):
    def __init__(self, gather_distributed: bool = True) -> None:
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image, text: (n, D) embeddings of matching pairs (normalised here); logit_scale: s (not its log)."""
        if image.shape != text.shape:
            raise ValueError(f"CLIPLoss: {tuple(image.shape)} image and {tuple(text.shape)} text embeddings; "
                             f"expected one caption per image")
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        n, offset = image.shape[0], 0
        image_all, text_all = image, text
        if self.gather_distributed and dist.world_size() > 1:
            image_all, text_all = torch.cat(dist.gather(image), 0), torch.cat(dist.gather(text), 0)
            offset = dist.rank() * n
        labels = torch.arange(n, device=image.device) + offset
        logits_image = logit_scale * image @ text_all.T
        logits_text = logit_scale * text @ image_all.T
        return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2
