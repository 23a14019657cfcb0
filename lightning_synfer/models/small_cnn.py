"""Small residual CNNs for 32-64 px faces, registered with timm (`model.backbone=synfer_cnn_s`).

A ResNet-18 without its stem max-pool costs ~140 MMAC per 32 px face; synfer_cnn_s costs ~12, so the embedded
miniature's classifier trains in a CPU budget. Layout: a 3x3 stem (stride 2 by default: full-resolution
convolutions are the slowest per FLOP on a CPU), stages of ResNet basic blocks (conv-BN-ReLU-conv-BN + shortcut),
global average pooling, dropout and a linear classifier. Plain Conv2d/BatchNorm2d/ReLU only, which oneDNN runs fast
in fp32 on any x86 CPU (channels_last doubles the speed: model.channels_last=true).
Measured: docs/BENCHMARKS.md, "Fast classifier for the miniature".
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["SmallFaceCNN"]


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False),
                               nn.BatchNorm2d(out_chs)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block; a strided 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_chs, out_chs, stride=stride)
        self.conv2 = _conv_bn(out_chs, out_chs, act=False)
        # Zero-initialised last BN: each block starts as the identity, which lets a short schedule use a high lr.
        nn.init.zeros_(self.conv2[1].weight)
        self.shortcut = (nn.Identity() if stride == 1 and in_chs == out_chs
                         else _conv_bn(in_chs, out_chs, kernel_size=1, stride=stride, act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class SmallFaceCNN(nn.Module):
    """A timm-style classifier: `forward_features` (B, C, H, W) -> `forward_head` -> logits.

    widths/depths/strides: channels, blocks and stride per stage; stem_stride 2 halves the input at once (the
    full-resolution convolutions are the slowest per FLOP on a CPU). A 32 px face with stem_stride 2 and
    strides (1, 2, 2) ends on a 4x4 map.
    num_classes=0 gives pooled features (`num_features` of them), as timm's models do.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), depths: Sequence[int] = (1, 1, 1),
                 strides: Sequence[int] = (1, 2, 2), stem_width: int = 32, stem_stride: int = 2, in_chans: int = 3,
                 num_classes: int = 8,
                 drop_rate: float = 0.0, global_pool: str = "avg", **unused: Any) -> None:
        super().__init__()
        if not len(widths) == len(depths) == len(strides) or not widths or min(depths) < 1:
            raise ValueError(f"SmallFaceCNN: widths={list(widths)}, depths={list(depths)} and strides={list(strides)} "
                             f"must be equally long and non-empty, with at least one block per stage")
        if unused:
            raise TypeError(f"SmallFaceCNN got unexpected arguments {sorted(unused)}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = _conv_bn(in_chans, stem_width, stride=stem_stride)
        stages, in_chs, reduction = [], stem_width, stem_stride
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module="stem.2")]  # after its ReLU
        for index, (width, depth, stride) in enumerate(zip(widths, depths, strides)):
            reduction *= stride
            blocks = [BasicBlock(in_chs if b == 0 else width, width, stride if b == 0 else 1) for b in range(depth)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{index}"))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = self._classifier(num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = self._classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights are published (url empty): pretrained=True needs model.pretrained_path, a local file.
    return {"url": "", "num_classes": 8, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "stem.0", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({
    "synfer_cnn_s.untrained": _cfg(pool_size=(4, 4)),
    "synfer_cnn_m.untrained": _cfg(pool_size=(2, 2)),
})

# Per variant: the SmallFaceCNN arguments. s: 32 px faces, ~12 MMAC a face, ~750 training img/s on one fp32 thread;
# m: a fourth stage for 48-64 px, ~1.5x the time at 32 px (docs/BENCHMARKS.md, "Fast classifier for the miniature").
VARIANTS: dict[str, dict[str, Any]] = {
    "synfer_cnn_s": dict(widths=(32, 64, 128), depths=(1, 1, 1), strides=(1, 2, 2), stem_width=32, stem_stride=2),
    "synfer_cnn_m": dict(widths=(32, 64, 128, 256), depths=(1, 1, 1, 1), strides=(1, 2, 2, 2), stem_width=32,
                         stem_stride=2),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SmallFaceCNN:
    kwargs = {**VARIANTS[variant], **kwargs}
    # features_only: the stem and every stage (timm's default of five maps assumes a four-stage network).
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(len(kwargs["widths"]) + 1)))
    return build_model_with_cfg(SmallFaceCNN, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


@register_model
def synfer_cnn_s(pretrained: bool = False, **kwargs: Any) -> SmallFaceCNN:
    return _create("synfer_cnn_s", pretrained, **kwargs)


@register_model
def synfer_cnn_m(pretrained: bool = False, **kwargs: Any) -> SmallFaceCNN:
    return _create("synfer_cnn_m", pretrained, **kwargs)
