"""Mixup / CutMix on a whole batch, returning what was done so that every target is mixed the same way.

timm's `Mixup` mixes images and one-hot class targets in one call and keeps the coefficient to itself (its batch
coefficient is only reachable through a private method). Our batches carry more targets than one label: soft labels
(`label_soft`, rectified labels stay soft) and AU intensities (`aus`, `has_aus`). `BatchMix.draw` mixes the images
and returns a `Mix` (the partner permutation and the coefficient); `Mix.targets` then mixes any per-sample target
with the same partners and the same coefficient, so an AU head sees AU targets of the images it is shown.

Sampling follows timm's batch mode: lambda ~ Beta(alpha, alpha), CutMix instead of Mixup with probability
`switch_prob` when both alphas are on, a box of relative side sqrt(1 - lambda) at a uniform centre, clipped to the
image, and lambda corrected to the share of pixels kept. Random draws come from torch's RNG (seeded by
`seed_everything`), not numpy's global one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Mix:
    """Sample i of the mixed batch is `lam` of sample i and `1 - lam` of sample `partner[i]`."""

    partner: torch.Tensor  # (B,) int64
    lam: float  # CutMix: the share of sample i's pixels left after pasting the box

    def targets(self, target: torch.Tensor) -> torch.Tensor:
        """lam * target + (1 - lam) * target[partner], for any (B, ...) float target (soft labels, AUs)."""
        return self.lam * target + (1.0 - self.lam) * target[self.partner]

    def has_both(self, present: torch.Tensor) -> torch.Tensor:
        """A mixed sample has a target only when both of its parts had one (a bool (B,) mask, e.g. has_aus)."""
        return present & present[self.partner]


class BatchMix:
    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not mixup_alpha + cutmix_alpha > 0:
            raise ValueError(f"BatchMix: loss.mixup_alpha={mixup_alpha} and loss.cutmix_alpha={cutmix_alpha} must be "
                             f">= 0 with at least one > 0")
        if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"BatchMix: loss.mixup_prob={prob} and switch_prob={switch_prob} must be in [0, 1]")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    def draw(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[Mix]]:
        """(mixed images, the Mix) for an (B, C, H, W) batch; (images, None) when this batch is left unmixed."""
        if _uniform() >= self.prob:
            return images, None
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or _uniform() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = torch.randperm(images.shape[0], device=images.device)
        if not use_cutmix:
            return lam * images + (1.0 - lam) * images[partner], Mix(partner, lam)
        height, width = images.shape[-2:]
        top, bottom, left, right = _box(height, width, lam)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / (height * width)
        return mixed, Mix(partner, kept)


def _uniform() -> float:
    return float(torch.rand(()))


def _box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of relative side sqrt(1 - lam) at a uniform centre, clipped to the image: (top, bottom, left, right)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right
