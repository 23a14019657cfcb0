"""Deterministic DDIM inversion: a real face -> the x_t that DDIM (eta=0) maps back onto it.

Used by the layout start: the face's pose/identity layout survives in x_T while sampling under a new
caption and AUs changes the expression. The step uses the usual approximation eps(x_{t-1}, t) ~ eps(x_t, t),
with the conditional embedding (no CFG, which would break the reconstruction).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from lightning_synfer.sampling.ddim import DDIMSampler, split_prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def inverted_steps(num_steps: int, strength: float) -> int:
    """How many of the last DDIM steps a layout start inverts and re-samples (strength in (0, 1])."""
    return max(1, min(num_steps, int(math.ceil(strength * num_steps - 1e-9))))


@torch.no_grad()
def ddim_invert(sampler: DDIMSampler, images_m11: torch.Tensor, captions: Sequence[str],
                aus: Optional[torch.Tensor] = None, num_steps: Optional[int] = None,
                seeds: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, int]:
    """Invert images in [-1, 1] through the last `num_steps` of the sampler's DDIM schedule.

    Returns (x, start_index): sampler.sample(..., x_start=x, start_index=start_index) continues from it.
    """
    from lightning_synfer.sampling.ddim import Conditioner

    gen = sampler.gen
    timesteps = sampler.timesteps
    n = len(timesteps)
    k = n if num_steps is None else int(num_steps)
    if not 1 <= k <= n:
        raise ValueError(f"ddim_invert: num_steps={k}, expected 1..{n} (the sampler's DDIM steps)")
    start_index = n - k
    with sampler._ema():
        cond = Conditioner(gen, captions, aus, 1.0, 1.0)  # conditional pass only
        hidden = cond.batched()
        unet_param = next(gen.unet.parameters())
        x = encode_seeded(gen, images_m11.to(device=unet_param.device, dtype=torch.float32), seeds)
        x = x.to(unet_param.dtype)
        sched = sampler.scheduler
        prev_alpha = sched.final_alpha_cumprod.to(x.device, x.dtype)
        # Clean image -> timesteps[n-1] -> ... -> timesteps[start_index], i.e. the sampling order reversed.
        for i in range(n - 1, start_index - 1, -1):
            t = timesteps[i]
            alpha = sampler.alpha_bar(t).to(x.device, x.dtype)
            out = sampler._model(x, t, hidden, 1)
            _, eps = split_prediction(out, x, alpha, gen.prediction_type)
            x0 = (x - (1 - prev_alpha).sqrt() * eps) / prev_alpha.sqrt()
            x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
            prev_alpha = alpha
    return x, start_index


def encode_seeded(gen: Any, images_m11: torch.Tensor, seeds: Optional[Sequence[int]]) -> torch.Tensor:
    """images_to_model_space, one image at a time under its own seed when the encoder samples (a VAE's
    latent_dist.sample() draws from the global RNG): the same spec then inverts to the same x_T."""
    if getattr(gen, "vae", None) is None or seeds is None:
        return gen.images_to_model_space(images_m11)
    devices = [images_m11.device] if images_m11.device.type == "cuda" else []
    out = []
    for image, seed in zip(images_m11, seeds):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
            out.append(gen.images_to_model_space(image[None]))
    return torch.cat(out)


def list_layout_images(root: str, fmt: str = "images", split: str = "train",
                       key: str = "synthesis.layout.root") -> list[str]:
    """Sorted image paths of a layout/real source: any image files below root, or a dataset adapter."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"{key}={root}: no such folder (expected a folder of face images)")
    if fmt == "images":
        paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        from datamodules.adapters import load_records
        from datamodules.labels import LabelSpace

        records = load_records(fmt, root, split, LabelSpace.from_num_classes(8), key=key)
        paths = [r.image for r in records if isinstance(r.image, str)]
    if not paths:
        raise FileNotFoundError(f"{key}={root}: no images found (format {fmt}; suffixes {IMAGE_SUFFIXES})")
    return paths


def load_image_m11(path: str, size: int, channels: int) -> torch.Tensor:
    """One image as a (C, size, size) float tensor in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def image_geometry(gen: Any) -> tuple[int, int]:
    """(size, channels) of the generator's images: decode one model-space sample to find out."""
    cached = getattr(gen, "_synfer_image_geometry", None)
    if cached is not None:
        return cached
    shape = tuple(gen.sample_shape(1))
    param = next(gen.parameters())
    with torch.no_grad():
        img = gen.model_space_to_images(torch.zeros(shape, device=param.device, dtype=param.dtype))
    geom = (int(img.shape[-1]), int(img.shape[1]))
    try:
        gen._synfer_image_geometry = geom
    except AttributeError:
        pass
    return geom
