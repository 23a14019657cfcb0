"""Loading our checkpoints safely (weights_only=True) and wrapping classifiers for reuse.

Every FER checkpoint that `evaluate` accepts (supervised, labeler, SSL probes) can also serve as a
guidance classifier, an ensemble member in labelling, or a judge of generated faces, through
`ImageClassifier`, which takes raw images in [0, 1] at any size and channel count.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_synfer.modules import MODULES, module_class


class CheckpointError(ValueError):
    pass


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ckpt={path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"ckpt={path}: cannot load as a safe (weights_only) checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "synfer" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt={path}: not a lightning-synfer checkpoint (no 'synfer' metadata)")
    return ckpt


def _deep_update(base: dict, stored: dict) -> dict:
    out = dict(base)
    for key, value in stored.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def with_schema_defaults(stored: dict) -> dict:
    """A stored run config completed with today's schema defaults (older checkpoints stay loadable)."""
    if not stored:
        return stored
    from omegaconf import OmegaConf

    from lightning_synfer.config.compose import schema_config

    # enum_to_str: the schema's Choice defaults become plain strings (checkpoints load with weights_only=True)
    return _deep_update(OmegaConf.to_container(schema_config(), resolve=True, enum_to_str=True), stored)


def load_module(path: str | os.PathLike, *, tasks: Optional[Sequence[str]] = None,
                num_classes: Optional[int] = None) -> Any:
    """Rebuild the LightningModule a checkpoint came from, in eval mode on CPU."""
    ckpt = read_checkpoint(path)
    meta = ckpt["synfer"]
    task = meta.get("task")
    if tasks is not None and task not in tasks:
        raise CheckpointError(f"ckpt={path}: a '{task}' checkpoint; this command needs one of {list(tasks)}")
    if task not in MODULES:
        raise CheckpointError(f"ckpt={path}: unknown task '{task}'; known: {sorted(MODULES)}")
    if num_classes is not None and len(meta.get("label_names", [])) != num_classes:
        raise CheckpointError(f"ckpt={path}: model has {len(meta['label_names'])} classes "
                              f"({meta['label_names']}); expected {num_classes}")
    hparams = dict(ckpt["hyper_parameters"])
    # The weights come from the checkpoint: never re-read (possibly absent) pretrained files.
    # Keys added to the schema after the checkpoint was written take their defaults.
    config = with_schema_defaults(dict(hparams.get("config", {})))
    if isinstance(config.get("model"), dict):
        config["model"] = {**config["model"], "pretrained_path": None}
        hparams["config"] = config
    model_cfg = config.get("model") if isinstance(config, dict) else None
    probe_cfg = (config.get("ssl") or {}).get("probe") if isinstance(config, dict) else None
    if isinstance(probe_cfg, dict) and probe_cfg.get("feature_norm") and task in ("ssl_linear", "ssl_finetune") \
            and "feature_norm.running_mean" not in ckpt["state_dict"]:
        # Written before probes standardised their features: the head reads the raw features.
        config["ssl"] = {**config["ssl"], "probe": {**probe_cfg, "feature_norm": False}}
        hparams["config"] = config
    if isinstance(model_cfg, dict) and model_cfg.get("au_head") and "au_head.weight" not in ckpt["state_dict"]:
        # Written before model.au_head built its head through `fit`: the checkpoint has no AU head.
        config["model"] = {**model_cfg, "au_head": False}
        hparams["config"] = config
    if meta.get("normalization"):
        hparams["normalization"] = meta["normalization"]
    module = module_class(task)(**hparams)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"ckpt={path}: weights do not match the '{task}' module "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module.eval()


def init_weights_from(module: nn.Module, path: str | os.PathLike) -> None:
    """`model.init_from`: copy a classifier checkpoint's weights into a freshly built module (warm start).

    Shapes must match (same backbone, head and label space); the optimizer and schedule start anew.
    """
    ckpt = read_checkpoint(path)
    source = ckpt["synfer"].get("label_names")
    target = getattr(module, "label_names", None)
    if source is not None and target is not None and list(source) != list(target):
        raise CheckpointError(f"model.init_from={path}: classes {source} differ from this run's {target}")
    own = module.state_dict()
    mismatched = [k for k, v in ckpt["state_dict"].items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"model.init_from={path}: shapes differ for {mismatched[:5]} "
                              f"(is it the same model.backbone / model.small_input?)")
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"model.init_from={path}: weights do not match this module "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


class ImageClassifier(nn.Module):
    """Any FER checkpoint as `images in [0, 1] (N, C, H, W) -> logits`, differentiable in the input."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        norm = getattr(module, "normalization", {}) or {}
        self.size = int(norm.get("image_size", 48))
        self.channels = int(norm.get("channels", 1))
        mean = torch.tensor(norm.get("mean", [0.5] * self.channels)).view(1, -1, 1, 1)
        std = torch.tensor(norm.get("std", [0.5] * self.channels)).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.label_names = list(module.label_names)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ImageClassifier":
        return cls(load_module(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.module((x - self.mean.to(x)) / self.std.to(x))
