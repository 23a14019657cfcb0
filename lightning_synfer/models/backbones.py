"""timm backbones by name, with weights only from a local file (never from a hub)."""
from __future__ import annotations

import os
from typing import Any, Optional

import timm
import torch.nn as nn

from lightning_synfer.models import small_cnn  # noqa: F401 (registers synfer_cnn_* with timm)


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    pretrained_path: Optional[str] = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    small_input: bool = False,
    **extra: Any,
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`): forward gives pooled features.

    With `pretrained_path`, timm loads that local file through `pretrained_cfg_overlay`, which also
    adapts the stem to `in_chans` (summing RGB filters for grayscale) and drops the classifier.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"model.backbone={name!r} is not a timm model. Similar names: {close}")
    kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, drop_rate=drop_rate, **extra)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_path:
        model = _create_pretrained(name, pretrained_path, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if small_input:
        # 32-64 px faces: a ResNet stem (stride-2 conv + max-pool) leaves a 1x1 map at the last stage;
        # dropping the max-pool keeps 2x the resolution throughout, the usual CIFAR-style adaptation.
        if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            raise ValueError(f"model.small_input=true needs a backbone with a stem max-pool (ResNet family); "
                             f"model.backbone={name!r} has none")
        model.maxpool = nn.Identity()
    return model


def _create_pretrained(name: str, pretrained_path: str, kwargs: dict[str, Any]) -> nn.Module:
    if not os.path.isfile(pretrained_path):
        raise FileNotFoundError(f"model.pretrained_path={pretrained_path}: no such file (timm weights, "
                                f".pth/.bin/.safetensors, are read from disk only; nothing is downloaded)")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_path}, **kwargs)


def normalization_for(model: nn.Module, channels: int, pretrained: bool) -> tuple[list[float], list[float]]:
    """Mean/std from the model's pretrained_cfg when weights were loaded; 0.5/0.5 when training from scratch."""
    if not pretrained:
        return [0.5] * channels, [0.5] * channels
    cfg = timm.data.resolve_data_config(model=model)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if channels == 1 and len(mean) == 3:  # grayscale: the luminance-equivalent statistics
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std
