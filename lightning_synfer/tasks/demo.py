"""The main job (`python run.py`): train a supervised FER classifier on the embedded data, test it,
and print its metrics. The full SynFER pipeline replaces this as its stages land."""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from lightning_synfer.tasks import fit


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    return fit.run(cfg, argv)
