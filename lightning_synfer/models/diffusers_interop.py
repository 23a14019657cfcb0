"""What makes a Stable Diffusion generator export a folder the diffusers ecosystem reads as it is.

    model_index.json            StableDiffusionPipeline.from_pretrained(export) (safety checker and feature
                                extractor null): unet/ (raw weights; the EMA ones: subfolder="unet_ema"), vae/,
                                text_encoder/, tokenizer/, scheduler/ (the training DDPMScheduler; swap in any
                                other with Scheduler.from_config(pipe.scheduler.config))
    pytorch_lora_weights.safetensors (+ _ema)   LoRA runs only (generator.lora_rank > 0): the LoRA layers in
                                diffusers' format, for pipe.load_lora_weights(export) on the BASE model (SD 1.5,
                                generator.pretrained_path). unet/ already holds them merged: never load both.

The FAU adapter (au_adapter.safetensors, lightning_synfer/models/au_adapter.py) has no diffusers counterpart;
its keys:
    mlp.0.weight/bias, mlp.2.weight/bias, mlp.4.weight/bias   AU vector (K) -> hidden -> hidden -> M x cross_dim
    norm.weight/bias                                          LayerNorm over each of the M tokens
    processors.<layer>.to_k_au.weight, .to_v_au.weight        one pair per cross-attention layer (attn2), <layer>
                                                              = its diffusers processor name with '.' as '__'
                                                              (down_blocks__0__attentions__0__transformer_blocks__0__
                                                              attn2__processor)
    metadata: num_aus, cross_dim, num_tokens, au_names (JSON list, the order of the AU vector)
A stock pipeline ignores it: its images are the generator's at AU scale 0 (tests/lightning_synfer/test_diffusers_interop.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from datamodules.atomic import atomic_write_text

LORA_WEIGHTS = "pytorch_lora_weights{suffix}.safetensors"


def pipeline_index(scheduler_class: str) -> dict[str, Any]:
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", scheduler_class], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


def stock_pipeline_readable(module: Any) -> bool:
    """A stock StableDiffusionPipeline reproduces the generator (at AU scale 0) when it is latent SD with SD's own
    CLIP text encoder feeding the UNet directly (no trained text projection between them)."""
    return (getattr(module, "profile", None) == "sd" and getattr(module.text_encoder, "kind", None) == "clip"
            and isinstance(module.text_proj, nn.Identity))


def write_pipeline_index(module: Any, folder: Path) -> bool:
    """model_index.json into an export folder when a stock pipeline can read it; True when written."""
    if not stock_pipeline_readable(module):
        (folder / "model_index.json").unlink(missing_ok=True)  # an older export's index must not vouch for this one
        return False
    index = pipeline_index(type(module.noise_scheduler).__name__)
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2))
    return True


def save_lora_weights(unet: nn.Module, folder: Path, suffix: str = "") -> bool:
    """The UNet's LoRA layers as diffusers LoRA weights (pipe.load_lora_weights); False when it has none."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in unet.modules()):
        return False
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              weight_name=LORA_WEIGHTS.format(suffix=suffix), safe_serialization=True)
    return True
