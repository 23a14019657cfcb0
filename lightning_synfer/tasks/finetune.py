"""`python run.py finetune ckpt=SSL.ckpt [experiment=ssl/finetune_rafdb]`: fine-tune an SSL backbone with a
linear head (backbone lr = optim.lr x ssl.probe.backbone_lr_ratio); same outputs as `linear`."""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from lightning_synfer.tasks import linear


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    return linear.run(cfg, argv, kind="finetune")
