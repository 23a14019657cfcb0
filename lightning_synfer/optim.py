"""Optimizers and the warmup-cosine schedule, shared by every LightningModule family."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from omegaconf import DictConfig

from lightning_synfer.trainer import cosine_with_warmup, per_device_batch


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (1-D tensors), the usual convention."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_batch(global_batch: int, trainer: Any) -> int:
    """Samples per optimizer step: the global batch (data.batch_size, split over devices x nodes) x
    trainer.accumulate_grad_batches. The one definition every family's learning-rate scaling uses."""
    world = max(1, int(trainer.num_devices) * int(trainer.num_nodes))
    per_device = per_device_batch(int(global_batch), world)  # refuses a batch the devices cannot share evenly
    return per_device * world * int(trainer.accumulate_grad_batches)


def scaled_lr(optim_cfg: DictConfig, samples_per_step: int) -> float:
    """lr x samples_per_step / 256 when optim.scale_lr_with_batch (samples_per_step: `effective_batch`)."""
    return optim_cfg.lr * samples_per_step / 256 if optim_cfg.scale_lr_with_batch else optim_cfg.lr


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
    """What LightningModule.configure_optimizers returns: optimizer + per-step warmup-cosine.

    `global_batch` is data.batch_size; the lr is scaled by `effective_batch` (x gradient accumulation).
    """
    lr = scaled_lr(optim_cfg, effective_batch(global_batch, trainer))
    optimizer = build_optimizer(groups if groups is not None else param_groups(module, optim_cfg.weight_decay),
                                optim_cfg, lr)
    if optim_cfg.scheduler == "constant":
        return {"optimizer": optimizer}
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = int(optim_cfg.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup, optim_cfg.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
