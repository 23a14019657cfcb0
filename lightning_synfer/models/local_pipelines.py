"""transformers pipelines from local folders only (captioners for `annotate`, the prompt LLM of `synthesize`).

A folder is what `save_pretrained` writes (config.json + weights + tokenizer/processor files). Nothing is
downloaded: a name that is not a folder is an error naming the config key.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from lightning_synfer.config.errors import ConfigError


def image_captioning_task() -> str:
    """The pipeline task of image captioners (BLIP, BLIP-2, LLaVA-style): transformers 5 folded `image-to-text`
    into `image-text-to-text`."""
    from transformers.pipelines import SUPPORTED_TASKS

    return "image-text-to-text" if "image-text-to-text" in SUPPORTED_TASKS else "image-to-text"


def local_pipeline(task: str, model_dir: Optional[str], *, key: str, device: Optional[str] = None) -> Any:
    if not model_dir:
        raise ConfigError(f"config key '{key}' is not set: expected a local transformers model folder for {task}")
    if not os.path.isfile(os.path.join(str(model_dir), "config.json")):
        raise ConfigError(f"config key '{key}' = {model_dir!r}: expected a local transformers model folder "
                          f"(save_pretrained output with config.json); models are never downloaded")
    import torch
    from transformers import pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipeline(task, model=str(model_dir), device=device)
