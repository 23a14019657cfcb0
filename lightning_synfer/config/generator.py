"""`generator` config section: the SynFER diffusion model (UNet + text encoder + FAU adapter) and its training.

Profiles:
    sd    Stable Diffusion 1.5/2.1 from a local diffusers folder (pretrained_path): latent space, frozen
          VAE + CLIP text encoder in `frozen_dtype`, full UNet fine-tune or LoRA (lora_rank > 0).
    tiny  a pixel-space UNet built from the dims below (no download), data.image_size px, data.channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from lightning_synfer.config.choices import Choice, FrozenDtype
from lightning_synfer.config.errors import check


class Profile(Choice):
    tiny = "tiny"
    sd = "sd"


class TextEncoder(Choice):
    minilm = "minilm"
    clip = "clip"  # from <pretrained_path>/text_encoder and tokenizer (profile=sd)
    tiny = "tiny"


class PredictionType(Choice):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


class BetaSchedule(Choice):
    squaredcos_cap_v2 = "squaredcos_cap_v2"
    linear = "linear"
    scaled_linear = "scaled_linear"


@dataclass
class GeneratorConfig:
    profile: Profile = Profile.tiny
    pretrained_path: Optional[str] = None  # sd: diffusers folder (falls back to model.pretrained_path)
    frozen_dtype: FrozenDtype = FrozenDtype.bf16  # dtype of the frozen VAE and text encoder
    lora_rank: int = 0  # > 0: LoRA on to_q/to_k/to_v/to_out.0 instead of a full UNet fine-tune
    lora_alpha: Optional[float] = None  # None: = lora_rank
    train_unet: bool = True  # false: only the AU adapter (and text projection) train on a frozen base
    # An earlier GeneratorModule export (save_pretrained folder) or the name of a base shipped in
    # lightning_synfer/pretrained/: its UNet (architecture and EMA weights), text projection, patching and noise
    # schedule start this run, as SD's weights start a fine-tune; an AU adapter in it loads when its AU list matches.
    # The tiny profile's UNet dims below are then the export's. Stage 2 of the paper's recipe: init_from=<stage 1
    # export> with train_unet=false.
    init_from: Optional[str] = None
    gradient_checkpointing: bool = False

    # text conditioning
    text_encoder: TextEncoder = TextEncoder.minilm
    text_max_length: int = 32  # tokens per caption (clip in sd: 77)
    text_cache_size: int = 4096  # LRU cache of frozen caption embeddings (0 = off)
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)

    # FAU adapter (decoupled cross-attention, IP-Adapter style)
    au_adapter: bool = True
    num_au_tokens: int = 4
    au_hidden: int = 256
    au_scale: float = 1.0
    # to_v_au's start: copy (IP-Adapter: the text branch's values) or zero (the AU branch adds nothing at step 0:
    # a short adapter fine-tune of a frozen base starts from the base's own images)
    au_value_init: str = "copy"
    au_dropout: float = 0.1  # share of AU vectors replaced by zeros (guidance; = the no-AU condition)

    # diffusion
    prediction_type: PredictionType = PredictionType.epsilon
    beta_schedule: BetaSchedule = BetaSchedule.squaredcos_cap_v2
    num_train_timesteps: int = 1000
    snr_gamma: Optional[float] = None  # min-SNR weighting (5.0 is the paper's value); None = plain MSE

    # EMA of the trainable weights (diffusers EMAModel)
    ema: bool = True
    ema_decay: float = 0.999
    ema_update_after_step: int = 0

    # tiny profile: the UNet runs on non-overlapping patch_size x patch_size pixel patches stacked as channels
    # (pixel_unshuffle: a lossless, parameter-free 'latent space'); 4 turns a 32 px face into 8x8x16, ~3x cheaper
    # per denoising step on a CPU than a UNet at full resolution (docs/BENCHMARKS.md).
    patch_size: int = 1
    # tiny profile UNet dims
    block_out_channels: List[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    attention_levels: List[bool] = field(default_factory=lambda: [False, False, True])  # cross-attn per level
    cross_attention_dim: int = 64
    attention_heads: int = 4
    norm_num_groups: int = 8

    # validation samples logged to TensorBoard
    sample_every_n_steps: int = 500  # 0 = never
    sample_steps: int = 25  # DDIM steps of the logged grid
    sample_guidance: float = 3.0  # text CFG scale of the logged grid
    sample_seed: int = 0
    sample_captions: List[str] = field(default_factory=list)  # empty: one label caption per class

    export_on_fit_end: bool = True  # save_pretrained to <run_dir>/export
    # Making a shipped base (experiments/generator/embedded_base.yaml): at the end of the fit the EMA weights go to
    # lightning_synfer/pretrained/<publish_as> beside PROVENANCE.json (lightning_synfer/pretrained/publish.py);
    # publish_judge, a classifier .ckpt, judges publish_samples_per_class label-caption samples for the record.
    publish_as: Optional[str] = None
    publish_judge: Optional[str] = None
    publish_samples_per_class: int = 50
    publish_dir: Optional[str] = None  # where publish_as goes; null: lightning_synfer/pretrained (the package)


def validate_generator(cfg: Any) -> None:
    g = cfg.get("generator")
    if g is None:
        return
    check(g.lora_rank >= 0, "generator.lora_rank", g.lora_rank, "0 (full fine-tune) or a positive rank")
    check(g.text_max_length > 0, "generator.text_max_length", g.text_max_length, "a positive token count")
    check(0.0 <= g.caption_dropout < 1.0, "generator.caption_dropout", g.caption_dropout, "a value in [0, 1)")
    check(0.0 <= g.au_dropout < 1.0, "generator.au_dropout", g.au_dropout, "a value in [0, 1)")
    check(g.num_au_tokens > 0, "generator.num_au_tokens", g.num_au_tokens, "a positive token count")
    check(g.snr_gamma is None or g.snr_gamma > 0, "generator.snr_gamma", g.snr_gamma, "null or a value > 0")
    check(0.0 < g.ema_decay < 1.0, "generator.ema_decay", g.ema_decay, "a value in (0, 1)")
    check(len(g.attention_levels) == len(g.block_out_channels), "generator.attention_levels", list(g.attention_levels),
          f"one flag per entry of generator.block_out_channels ({len(g.block_out_channels)})")
    check(all(c % g.norm_num_groups == 0 for c in g.block_out_channels), "generator.block_out_channels",
          list(g.block_out_channels), f"multiples of generator.norm_num_groups={g.norm_num_groups}")
    if cfg.get("task") == "generator":
        for key in ("mean", "std"):
            value = cfg.data.get(key)
            check(value is None or all(v == 0.5 for v in value), f"data.{key}", value,
                  "null or 0.5 per channel (the generator models images in [-1, 1])")
    check(g.patch_size >= 1, "generator.patch_size", g.patch_size, "a positive patch side in pixels (1 = no patching)")
    if g.profile == "tiny" and not g.init_from:  # with init_from the export's UNet is checked against the data
        down = 2 ** (len(g.block_out_channels) - 1) * g.patch_size
        check(cfg.data.image_size % down == 0, "data.image_size", cfg.data.image_size,
              f"a multiple of {down} (patches of {g.patch_size} px, then the tiny UNet downsamples "
              f"{len(g.block_out_channels) - 1} times)")
        check(g.text_encoder != "clip", "generator.text_encoder", g.text_encoder,
              "minilm or tiny for the tiny profile (clip comes from an SD folder: profile=sd)")
