"""Face augmentations. Mild on purpose: expressions live in small geometric details.

- `fer`:   random resized crop (scale 0.8-1), horizontal flip, rotation +-10 deg, colour jitter
           (brightness/contrast for grayscale), random erasing.
- `light`: flips only (generator training: the model should learn faces, not crops).
- `none`:  resize only.
Inputs are PIL images, normally already converted to the model's mode (L or RGB) by the dataset; a PIL image
of the other mode is converted first (RGB -> L luminance, L -> RGB replicated), so the output always has the
model's channel count (`channels`, or len(mean) for `eval_transform`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


class ToMode:
    """PIL image -> `mode` ("L" or "RGB"); other inputs pass through. Without it an RGB image would reach a
    1-channel model as 3 channels (Normalize broadcasts a 1-value mean over them)."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: expected 1 (grayscale) or 3 (RGB)")
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, image):
        if isinstance(image, Image.Image) and image.mode != self.mode:
            return image.convert(self.mode)
        return image

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class RandomLightGradient:
    """Directional lighting on a [0, 1] image tensor: x * (1 + s * (cos(phi) * u + sin(phi) * v)), u and v the
    pixel coordinates in [-1, 1], phi uniform, s uniform in [0, strength]; clipped back to [0, 1]. One side of the
    face gets brighter and the other darker, as with a lamp off to one side."""

    def __init__(self, strength: float) -> None:
        if strength < 0:
            raise ValueError(f"RandomLightGradient strength={strength}: expected >= 0")
        self.strength = float(strength)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        phi = float(torch.rand(())) * 2 * math.pi
        s = float(torch.rand(())) * self.strength
        u = torch.linspace(-1.0, 1.0, w).view(1, w)
        v = torch.linspace(-1.0, 1.0, h).view(h, 1)
        gain = 1.0 + s * (math.cos(phi) * u + math.sin(phi) * v)
        return (image * gain).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"RandomLightGradient(strength={self.strength})"


def train_transform(aug, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean={list(mean)} / data.std={list(std)}: expected {channels} values each "
                         f"(data.channels={channels})")
    if aug.preset == "none":
        return eval_transform(image_size, mean, std)
    if aug.preset == "light":
        return T.Compose([ToMode(channels), T.Resize((image_size, image_size), antialias=True),
                          T.RandomHorizontalFlip(aug.hflip), *_to_tensor(mean, std)])
    ops: list = [
        ToMode(channels),
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
    """Deterministic: resize to image_size x image_size, scale to [0, 1], normalise. Channels = len(mean)."""
    return T.Compose([ToMode(len(mean)), T.Resize((image_size, image_size), antialias=True), *_to_tensor(mean, std)])


class MultiView:
    """Apply several transforms to one image and return the list of views (SSL)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]
