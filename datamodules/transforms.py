"""Face augmentations. Mild on purpose: expressions live in small geometric details.

- `fer`:   random resized crop (scale 0.8-1), horizontal flip, rotation +-10 deg, colour jitter
           (brightness/contrast for grayscale), random erasing.
- `light`: flips only (generator training: the model should learn faces, not crops).
- `none`:  resize only.
Inputs are PIL images already converted to the model's mode (L or RGB) by the dataset.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms import v2 as T


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def train_transform(aug, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    if aug.preset == "none":
        return eval_transform(image_size, mean, std)
    if aug.preset == "light":
        return T.Compose([T.Resize((image_size, image_size), antialias=True), T.RandomHorizontalFlip(aug.hflip),
                          *_to_tensor(mean, std)])
    ops: list = [
        T.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), ratio=(0.9, 1.1), antialias=True),
        T.RandomHorizontalFlip(aug.hflip),
    ]
    if aug.rotation:
        ops.append(T.RandomRotation(aug.rotation))
    if aug.color_jitter:
        j = aug.color_jitter
        ops.append(T.ColorJitter(brightness=j, contrast=j) if channels == 1
                   else T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.05, j / 4)))
    ops += _to_tensor(mean, std)
    if aug.random_erasing:
        ops.append(T.RandomErasing(p=aug.random_erasing, scale=(0.02, 0.15)))
    return T.Compose(ops)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    return T.Compose([T.Resize((image_size, image_size), antialias=True), *_to_tensor(mean, std)])


class MultiView:
    """Apply several transforms to one image and return the list of views (SSL)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]
