"""UNets for the generator: a tiny pixel-space UNet from config dims, or SD's UNet from a local diffusers folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from diffusers import UNet2DConditionModel


def tiny_unet_config(image_size: int, channels: int, block_out_channels: Sequence[int] = (16, 32, 64),
                     layers_per_block: int = 1, attention_levels: Sequence[bool] = (False, False, True),
                     cross_attention_dim: int = 64, attention_heads: int = 4, norm_num_groups: int = 8) -> dict:
    """UNet2DConditionModel config: cross-attention only at the levels flagged in attention_levels.

    The default (16/32/64, attention at the 8x8 level of a 32 px input, ~1M params) is what a 2-core
    CPU can train; the mid block always carries cross-attention at the lowest resolution.
    """
    if len(attention_levels) != len(block_out_channels):
        raise ValueError(f"generator.attention_levels={list(attention_levels)}: expected one flag per entry of "
                         f"generator.block_out_channels={list(block_out_channels)}")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(list(attention_levels))]
    return dict(sample_size=image_size, in_channels=channels, out_channels=channels,
                block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
                cross_attention_dim=cross_attention_dim, attention_head_dim=attention_heads,  # = number of heads
                norm_num_groups=norm_num_groups)


def build_tiny_unet(gen_cfg: Any, image_size: int, channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**tiny_unet_config(
        image_size, channels, gen_cfg.block_out_channels, gen_cfg.layers_per_block, gen_cfg.attention_levels,
        gen_cfg.cross_attention_dim, gen_cfg.attention_heads, gen_cfg.norm_num_groups))


SD_REQUIRED = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def check_sd_folder(path: Any, key: str = "generator.pretrained_path", required: Sequence[str] = SD_REQUIRED) -> Path:
    """A local diffusers SD folder, or an error that names the path and the missing file."""
    if not path:
        raise FileNotFoundError(f"{key} is not set; generator.profile=sd needs a local Stable Diffusion folder in "
                                f"diffusers format (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    root = Path(str(path))
    if not root.is_dir():
        raise FileNotFoundError(f"{key}={root}: no such directory (expected a diffusers Stable Diffusion folder)")
    for rel in required:
        if not (root / rel).exists():
            raise FileNotFoundError(f"{key}={root}: missing {rel} (not a diffusers Stable Diffusion folder)")
    return root


def load_unet(folder: Any) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
