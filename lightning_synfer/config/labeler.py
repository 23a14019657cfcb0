"""`labeler` and `labeling` config sections: the FERAnno-style diffusion-feature pseudo-labeler (a model, like
`generator`) and the `label` task that rectifies a synthetic set's labels with an ensemble.

    python run.py fit experiment=labeler/embedded                                   # train the labeler
    python run.py label labeling.dataset=DIR labeling.ensemble=[CKPT,...]           # rectify a synthetic set's labels
    python run.py label labeling.dataset=DIR labeling.mode=none                     # "no labeler": intended labels kept

`labeling.ensemble` names the voters: any checkpoints `evaluate` accepts, the diffusion labeler's included; every
member votes with the same weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from lightning_synfer.config.choices import Choice, FrozenDtype
from lightning_synfer.config.errors import check


@dataclass
class TinyLabelerUNetConfig:
    """The frozen UNet when labeler.unet_path is null: a random tiny pixel-space UNet (tests, CPU smoke runs)."""

    block_out_channels: List[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    attention_levels: List[bool] = field(default_factory=lambda: [True, True])  # cross-attn per level
    cross_attention_dim: int = 32
    attention_heads: int = 2
    norm_num_groups: int = 8
    text_tokens: int = 8  # tokens of the (tiny, random) caption encoder
    seed: int = 0  # weights of the random UNet and caption encoder


@dataclass
class LabelerConfig:
    # Frozen diffusion model: a generator export folder or .ckpt (GeneratorModule.load), a Stable Diffusion
    # folder (unet/ [+ vae/ text_encoder/ tokenizer/ scheduler/]), or a bare diffusers UNet folder (config.json +
    # weights). null: a tiny random UNet from `tiny_unet`.
    unet_path: Optional[str] = None
    tiny_unet: TinyLabelerUNetConfig = field(default_factory=TinyLabelerUNetConfig)
    t: int = 1  # diffusion timestep of the single UNet pass (FERAnno: small t, nearly clean image)
    caption: str = ""  # fixed caption: never the record's own (it names the intended label)
    noise_seed: int = 0  # eval/predict add this fixed noise map (training draws fresh noise)
    frozen_dtype: FrozenDtype = FrozenDtype.fp32  # the frozen UNet/VAE
    store_frozen: bool = True  # keep the frozen UNet/VAE weights in checkpoints (self-contained)

    # trainable heads
    dim: int = 128  # token width of both branches
    heads: int = 4
    fusion_layers: int = 1  # bidirectional cross-attention blocks
    attn_grid: int = 8  # every attention map is resized to attn_grid x attn_grid
    feature_grid: int = 4  # every up-block output is pooled to feature_grid x feature_grid tokens (1 = global)
    attn_tokens: int = 0  # text tokens whose maps are kept (0 = all; SD's 77 can be cut to e.g. 16)
    dropout: float = 0.1


class LabelingMode(Choice):
    rectify = "rectify"  # the ensemble vote keeps, softens or drops each intended label
    none = "none"  # no labeler: intended labels kept, a new manifest version still written


@dataclass
class LabelingConfig:
    """`python run.py label`: rectify the intended labels of `dataset` with the `ensemble`'s vote."""

    dataset: Optional[str] = None  # input and output: the synthetic dataset; new manifest versions go beside the old
    ensemble: List[str] = field(default_factory=list)  # input: the voters' checkpoints (any `evaluate`-able ones)
    mode: LabelingMode = LabelingMode.rectify
    source_version: int = 1  # manifest version whose intended labels are checked (1 = as generated)
    min_confidence: Optional[float] = None  # drop records whose ensemble max probability is below this
    # weight of the intended label in the soft label of a disagreeing record (labeling/rectify.py): 0 = the
    # ensemble's mean alone; 1 = the generator's intention as one more vote (softened, not overwritten)
    intended_weight: float = 0.0
    batch_size: int = 32  # per device


def validate_labeler(cfg: Any) -> None:
    lab = cfg.get("labeler")
    if lab is not None:
        check(lab.t >= 0, "labeler.t", lab.t, "a diffusion timestep >= 0")
        check(lab.dim > 0 and lab.heads > 0 and lab.dim % lab.heads == 0, "labeler.dim", lab.dim,
              f"a positive width divisible by labeler.heads={lab.heads}")
        check(lab.fusion_layers >= 1, "labeler.fusion_layers", lab.fusion_layers, "at least 1")
        check(lab.attn_grid >= 1, "labeler.attn_grid", lab.attn_grid, "a grid size >= 1")
        check(lab.feature_grid >= 1, "labeler.feature_grid", lab.feature_grid, "a grid size >= 1")
        check(lab.attn_tokens >= 0, "labeler.attn_tokens", lab.attn_tokens, "0 (all) or a positive token count")
        check(0.0 <= lab.dropout < 1.0, "labeler.dropout", lab.dropout, "a value in [0, 1)")
        tu = lab.tiny_unet
        check(len(tu.attention_levels) == len(tu.block_out_channels), "labeler.tiny_unet.attention_levels",
              list(tu.attention_levels), f"one flag per entry of labeler.tiny_unet.block_out_channels "
                                         f"({len(tu.block_out_channels)})")
        check(any(tu.attention_levels), "labeler.tiny_unet.attention_levels", list(tu.attention_levels),
              "at least one level with cross-attention (the attention branch needs maps)")
        check(all(c % tu.norm_num_groups == 0 for c in tu.block_out_channels), "labeler.tiny_unet.block_out_channels",
              list(tu.block_out_channels), f"multiples of labeler.tiny_unet.norm_num_groups={tu.norm_num_groups}")
        check(tu.cross_attention_dim % 2 == 0, "labeler.tiny_unet.cross_attention_dim", tu.cross_attention_dim,
              "an even width (the tiny caption encoder has 2 heads)")
        if cfg.get("task") == "labeler":
            for key in ("mean", "std"):
                value = cfg.data.get(key)
                check(value is None or all(v == 0.5 for v in value), f"data.{key}", value,
                      "null or 0.5 per channel (the labeler feeds the diffusion UNet images in [-1, 1])")
            if lab.unet_path is None:
                down = 2 ** (len(tu.block_out_channels) - 1)
                check(cfg.data.image_size % down == 0, "data.image_size", cfg.data.image_size,
                      f"a multiple of {down} (labeler.tiny_unet downsamples {len(tu.block_out_channels) - 1} times)")
    lc = cfg.get("labeling")
    if lc is not None:
        check(lc.source_version >= 1, "labeling.source_version", lc.source_version, "a manifest version >= 1")
        check(lc.min_confidence is None or 0.0 <= lc.min_confidence <= 1.0, "labeling.min_confidence",
              lc.min_confidence, "null or a probability in [0, 1]")
        check(lc.batch_size >= 1, "labeling.batch_size", lc.batch_size, "a per-device batch size >= 1")
        check(lc.intended_weight >= 0, "labeling.intended_weight", lc.intended_weight, "a vote weight >= 0")
