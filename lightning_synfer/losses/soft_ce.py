"""Cross-entropy against soft targets, with label smoothing.

Hard labels arrive as one-hot `label_soft`, so one loss covers real data, intended synthetic labels,
rectified soft labels and Mixup/CutMix targets.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftTargetCrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0, class_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits: (N, C); target: (N, C) distributions or (N,) class indices."""
        num_classes = logits.shape[-1]
        if target.dim() == 1:
            target = F.one_hot(target.long(), num_classes).to(logits.dtype)
        target = target.to(logits.dtype)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        per_class = -target * F.log_softmax(logits.float(), dim=-1)
        if self.class_weights is not None:
            per_class = per_class * self.class_weights.to(per_class)
        return per_class.sum(-1).mean()
