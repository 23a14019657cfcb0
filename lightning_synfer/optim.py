"""Optimizers and the warmup-cosine schedule, shared by every LightningModule family."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from omegaconf import DictConfig

from lightning_synfer.trainer import cosine_with_warmup


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (1-D tensors), the usual convention."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(optim_cfg: DictConfig, global_batch: int) -> float:
    """lr x global_batch / 256 when optim.scale_lr_with_batch (global = per device x devices x nodes)."""
    return optim_cfg.lr * global_batch / 256 if optim_cfg.scale_lr_with_batch else optim_cfg.lr


def build_optimizer(groups: Iterable[dict[str, Any]], optim_cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    groups = list(groups)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=True)
    if optim_cfg.name == "lars":
        from lightly.utils.lars import LARS  # the LARS of the SSL literature (no adaptation on 1-D params)

        return LARS(groups, lr=lr, momentum=optim_cfg.momentum)
    raise ValueError(f"optim.name={optim_cfg.name!r}: expected adamw, sgd or lars")


def configure(module: torch.nn.Module, trainer: Any, optim_cfg: DictConfig, global_batch: int,
              groups: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What LightningModule.configure_optimizers returns: optimizer + per-step warmup-cosine."""
    lr = scaled_lr(optim_cfg, global_batch)
    optimizer = build_optimizer(groups if groups is not None else param_groups(module, optim_cfg.weight_decay),
                                optim_cfg, lr)
    if optim_cfg.scheduler == "constant":
        return {"optimizer": optimizer}
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = int(optim_cfg.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup, optim_cfg.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
