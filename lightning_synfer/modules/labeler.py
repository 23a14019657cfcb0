"""Pseudo-labeler (task `labeler`): a FERAnno-style classifier on the features of a FROZEN diffusion UNet.

    image in [-1, 1] -> (VAE mean latent * scaling, when the model is latent) -> x_t at timestep labeler.t
    -> one UNet pass with a fixed caption (labeler.caption; + the no-AU tokens of an FAU generator)
    -> branch 1: up-block outputs, pooled + projected (one token per scale)
       branch 2: cross-attention maps of every layer, head-averaged, resized, projected (layer x text-token tokens)
    -> bidirectional cross-attention fusion -> pooled -> linear head over the label space

Only the heads train. The frozen UNet comes from labeler.unet_path (generator export/.ckpt, SD folder, bare
diffusers UNet folder) or, when null, is a random tiny UNet built from labeler.tiny_unet. Its EMA weights are
used when a generator has them.

Checkpoints are self-contained: the frozen weights stay in the state_dict (labeler.store_frozen, default true) and
`frozen_spec` (configs of the UNet/VAE, AU tokens, alpha_bar_t) goes into the hyper-parameters, so `load_module`
rebuilds the exact architecture without the original folder. With store_frozen=false the frozen weights are left
out and re-read from the recorded path when the checkpoint is loaded.
"""
from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_synfer import optim
from lightning_synfer.losses import SoftTargetCrossEntropy
from lightning_synfer.models.diffusion_features import (AttentionTokens, BidirectionalFusion,
                                                        DiffusionFeatureExtractor, FeatureTokens)
from lightning_synfer.modules.base import FERClassifierModule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FROZEN_PREFIXES = ("extractor.unet.", "latent_encoder.")


def _plain(config: Any) -> dict:
    """A diffusers FrozenDict (tuples, numpy scalars) as plain JSON types: checkpoints load with weights_only."""
    return json.loads(json.dumps(dict(config), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class LatentEncoder(nn.Module):
    """The encoder half of an AutoencoderKL: image in [-1, 1] -> mean latent * scaling_factor (deterministic)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)
        self.in_channels = int(vae.config.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, _ = moments.chunk(2, dim=1)
        return mean * self.scaling_factor


# ------------------------------------------------------------------------------ frozen model sources

def _alpha_bar(scheduler: Any, t: int) -> float:
    alphas = scheduler.alphas_cumprod
    if not 0 <= t < len(alphas):
        raise ValueError(f"labeler.t={t}: expected a timestep in [0, {len(alphas) - 1}] of the model's scheduler")
    return float(alphas[t])


def _default_scheduler(latent: bool) -> Any:
    from diffusers import DDPMScheduler

    # SD's betas for latent models; the tiny generator's cosine schedule for pixel-space ones.
    if latent:
        return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2")


def _tiny_text_condition(cross_dim: int, tokens: int, caption: str, seed: int) -> torch.Tensor:
    """A fixed random caption encoder for UNets that come without one (tiny, bare UNet folders)."""
    from lightning_synfer.models.text_encoders import TinyTextEncoder

    enc = TinyTextEncoder(dim=cross_dim, max_length=tokens, cache_size=0, seed=seed)
    return enc.encode([caption])[0]


def load_frozen_source(lab: Any, image_size: int, channels: int) -> dict[str, Any]:
    """Load the frozen parts named by labeler.unet_path: {unet, vae (or None), cond (T, D), alpha_bar, spec}."""
    from diffusers import UNet2DConditionModel

    t, caption = int(lab.t), str(lab.caption)
    path = lab.unet_path
    if path is None:
        from lightning_synfer.models.unets import tiny_unet_config

        tu = lab.tiny_unet
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(tu.seed))
            unet = UNet2DConditionModel(**tiny_unet_config(
                image_size, channels, tu.block_out_channels, tu.layers_per_block, tu.attention_levels,
                tu.cross_attention_dim, tu.attention_heads, tu.norm_num_groups))
        cond = _tiny_text_condition(int(tu.cross_attention_dim), int(tu.text_tokens), caption, int(tu.seed))
        return {"unet": unet, "vae": None, "cond": cond, "au": None,
                "alpha_bar": _alpha_bar(_default_scheduler(False), t), "source": "tiny"}
    p = Path(str(path))
    if p.is_file() or (p.is_dir() and (p / "generator_config.json").is_file()):
        return _from_generator(p, t, caption)
    if p.is_dir() and (p / "unet" / "config.json").is_file():
        return _from_sd_folder(p, t, caption, int(lab.tiny_unet.seed))
    if p.is_dir() and (p / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(str(p), local_files_only=True)
        cond = _tiny_text_condition(int(unet.config.cross_attention_dim), int(lab.tiny_unet.text_tokens), caption,
                                    int(lab.tiny_unet.seed))
        sched_dir = p.parent / "scheduler"
        sched = _load_scheduler(sched_dir) if sched_dir.is_dir() else _default_scheduler(unet.config.in_channels == 4)
        return {"unet": unet, "vae": None, "cond": cond, "au": None, "alpha_bar": _alpha_bar(sched, t),
                "source": "diffusers-unet"}
    raise FileNotFoundError(
        f"labeler.unet_path={path}: expected a generator export folder (generator_config.json) or .ckpt, a Stable "
        f"Diffusion folder (unet/config.json, optional vae/ text_encoder/ tokenizer/ scheduler/), or a diffusers "
        f"UNet folder (config.json + diffusion_pytorch_model.safetensors)")


def _load_scheduler(folder: Path) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(str(folder), local_files_only=True)


def _from_generator(path: Path, t: int, caption: str) -> dict[str, Any]:
    from lightning_synfer.modules.generator import GeneratorModule

    gen = GeneratorModule.load(path).eval()
    # The EMA weights are the ones the generator samples with.
    with torch.no_grad(), gen.ema_weights():
        cond = gen.conditioning(gen.encode_text([caption]), None)[0].detach().float().cpu()
        unet = copy.deepcopy(gen.unet)
    for p in unet.parameters():
        p.requires_grad_(False)
    au = None
    if gen.au_adapter is not None:
        proc = next(iter(gen.au_adapter.processors.values()))
        au = {"num_tokens": int(gen.au_adapter.num_tokens), "scale": float(proc.scale)}
    vae = gen.vae
    return {"unet": unet, "vae": vae, "cond": cond, "au": au, "alpha_bar": _alpha_bar(gen.noise_scheduler, t),
            "source": "generator", "patch_size": gen.patch_size}


def _from_sd_folder(root: Path, t: int, caption: str, seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True) if (root / "vae").is_dir() else None
    if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
        from lightning_synfer.models.text_encoders import CLIPTextEncoder

        # SD pads captions to the text model's positions (77); never more than it has.
        positions = json.loads((root / "text_encoder" / "config.json").read_text()).get("max_position_embeddings", 77)
        encoder = CLIPTextEncoder.from_folder(str(root), max_length=int(positions), cache_size=0)
        cond = encoder.encode([caption])[0].cpu()
    else:
        cond = _tiny_text_condition(int(unet.config.cross_attention_dim), 8, caption, seed)
    sched = _load_scheduler(root / "scheduler") if (root / "scheduler").is_dir() \
        else _default_scheduler(vae is not None)
    return {"unet": unet, "vae": vae, "cond": cond, "au": None, "alpha_bar": _alpha_bar(sched, t),
            "source": "sd"}


def source_spec(src: dict[str, Any], path: Optional[str]) -> dict[str, Any]:
    """Everything needed to rebuild the frozen parts' architecture without their folder."""
    return {"source": src["source"], "path": path, "unet_config": _plain(src["unet"].config),
            "vae_config": _plain(src["vae"].config) if src["vae"] is not None else None,
            "au": src["au"], "alpha_bar": float(src["alpha_bar"]), "cond_shape": list(src["cond"].shape),
            "patch_size": int(src.get("patch_size", 1))}


def build_from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Randomly initialised frozen parts with the spec's architecture (the checkpoint's weights fill them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(spec["unet_config"])
    vae = AutoencoderKL.from_config(spec["vae_config"]) if spec.get("vae_config") else None
    return {"unet": unet, "vae": vae, "cond": torch.zeros(spec["cond_shape"]), "au": spec.get("au"),
            "alpha_bar": spec["alpha_bar"], "source": spec["source"], "patch_size": int(spec.get("patch_size", 1))}


# ------------------------------------------------------------------------------------------- module

class PseudoLabelerModule(FERClassifierModule):
    task_name = "labeler"

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None,
                 frozen_spec: Optional[dict] = None) -> None:
        super().__init__(config, label_names, normalization)
        self.save_hyperparameters()
        lab = self.lab = self.cfg.labeler
        channels, size = int(self.cfg.data.channels), int(self.cfg.data.image_size)
        # The UNet models images in [-1, 1]: the DataModule normalises with mean 0.5, std 0.5.
        if not self.normalization:
            self.normalization = {"mean": [0.5] * channels, "std": [0.5] * channels, "image_size": size,
                                  "channels": channels}
        src, spec = self._frozen_source(frozen_spec, size, channels)
        self.frozen_spec = spec
        self.hparams["frozen_spec"] = spec  # saved with the checkpoint's hyper-parameters

        unet = src["unet"]
        if src["au"]:
            from lightning_synfer.models.au_adapter import install_au_processors

            if not any(type(p).__name__ == "AUAttnProcessor" for p in unet.attn_processors.values()):
                install_au_processors(unet, int(src["au"]["num_tokens"]), float(src["au"]["scale"]))
        dtype = DTYPES[lab.frozen_dtype]
        unet.requires_grad_(False).eval()
        if dtype != torch.float32:
            unet.to(dtype)
        self.extractor = DiffusionFeatureExtractor(unet, text_tokens=int(lab.attn_tokens))
        self.latent_encoder: Optional[LatentEncoder] = None
        if src["vae"] is not None:
            self.latent_encoder = LatentEncoder(src["vae"]).requires_grad_(False).eval().to(dtype)  # plain Module
        # Caption (+ no-AU tokens): one constant conditioning for every image; in the state_dict.
        self.register_buffer("conditioning", src["cond"].detach().float().clone())
        self.alpha_bar = float(src["alpha_bar"])
        self.frozen_dtype = dtype
        # A patching generator's UNet denoises pixel_unshuffle(image): its input channels are channels x patch^2.
        self.patch_size = int(src.get("patch_size", 1))
        self.unet_in_channels = int(unet.config.in_channels) // self.patch_size ** 2

        num_au = int(src["au"]["num_tokens"]) if src["au"] else 0
        text_tokens = int(spec["cond_shape"][0]) - num_au
        kept_tokens = min(text_tokens, int(lab.attn_tokens)) if lab.attn_tokens else text_tokens
        d = int(lab.dim)
        self.feature_tokens = FeatureTokens(self.extractor.scale_channels, d, int(lab.feature_grid))
        self.attention_tokens = AttentionTokens(len(self.extractor.attention_layers), kept_tokens,
                                                int(lab.attn_grid), d)
        self.fusion = nn.ModuleList(BidirectionalFusion(d, int(lab.heads), float(lab.dropout))
                                    for _ in range(int(lab.fusion_layers)))
        # Read-out: the feature tokens flattened (their order is scale x position, so where a feature fires
        # reaches the head; a mean over tokens threw that away and stayed at chance), plus the mean attention token.
        num_feature_tokens = len(self.extractor.scale_channels) * int(lab.feature_grid) ** 2
        self.readout_norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Dropout(float(lab.dropout)),
                                  nn.Linear((num_feature_tokens + 1) * d, self.num_classes))

        loss = self.cfg.loss
        self.criterion = SoftTargetCrossEntropy(loss.label_smoothing, loss.class_weights)
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.strict_loading = bool(lab.store_frozen)  # Lightning's own loads (resume, test "best")

    def _frozen_source(self, frozen_spec: Optional[dict], size: int, channels: int) -> tuple[dict, dict]:
        """(the frozen diffusion model's parts, their spec): rebuilt from a checkpoint's spec (its weights come from
        the state_dict), or read from labeler.unet_path on a first build or a checkpoint saved without them."""
        lab = self.lab
        if frozen_spec is not None and lab.store_frozen:
            src = build_from_spec(frozen_spec)  # weights come from the checkpoint's state_dict
            spec = frozen_spec
        else:
            # First build, or a checkpoint without frozen weights (store_frozen=false): read the frozen model.
            path = frozen_spec.get("path") if frozen_spec is not None else lab.unet_path
            if frozen_spec is not None and frozen_spec.get("source") != "tiny" and not path:
                raise ValueError("labeler checkpoint saved with labeler.store_frozen=false records no unet_path; "
                                 "the frozen UNet cannot be rebuilt")
            lab_src = copy.deepcopy(lab)
            lab_src.unet_path = None if path is None else str(path)
            src = load_frozen_source(lab_src, size, channels)
            spec = source_spec(src, lab_src.unet_path)
        return src, spec

    # -- frozen parts stay frozen and in eval mode ------------------------------------------------------------
    def train(self, mode: bool = True) -> "PseudoLabelerModule":
        super().train(mode)
        self.extractor.eval()
        if self.latent_encoder is not None:
            self.latent_encoder.eval()
        return self

    # -- the diffusion read-out --------------------------------------------------------------------------------
    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises (latent or pixels), in the frozen dtype."""
        x = images
        want = self.latent_encoder.in_channels if self.latent_encoder is not None else self.unet_in_channels
        if x.shape[1] != want:
            if x.shape[1] == 1:
                x = x.expand(-1, want, -1, -1)
            elif want == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"labeler: images have {x.shape[1]} channels; the frozen model expects {want} "
                                 f"(set data.channels to 1 or {want})")
        x = x.to(self.frozen_dtype)
        if self.latent_encoder is not None:
            x = self.latent_encoder(x)
        elif self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        return x

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.randn_like(x)
        # Eval/predict: one fixed noise map for every image, so a prediction does not depend on the batch.
        gen = torch.Generator().manual_seed(int(self.lab.noise_seed))
        return torch.randn((1, *x.shape[1:]), generator=gen).to(x).expand_as(x)

    def diffusion_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(up-block features per scale, cross-attention maps per layer) of one UNet pass at labeler.t."""
        # No graph through the frozen model unless the caller differentiates w.r.t. the images (guidance).
        ctx = nullcontext() if images.requires_grad else torch.no_grad()
        with ctx:
            x0 = self.model_input(images)
            x_t = math.sqrt(self.alpha_bar) * x0 + math.sqrt(1.0 - self.alpha_bar) * self.noise_like(x0)
            cond = self.conditioning.to(x_t.dtype).unsqueeze(0).expand(x_t.shape[0], -1, -1)
            t = torch.full((x_t.shape[0],), int(self.lab.t), device=x_t.device, dtype=torch.long)
            return self.extractor(x_t, t, cond)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, maps = self.diffusion_features(images)
        f = self.feature_tokens(features)
        a = self.attention_tokens(maps)
        for block in self.fusion:
            f, a = block(f, a)
        tokens = self.readout_norm(torch.cat([f, a.mean(1, keepdim=True)], dim=1))
        return self.head(tokens.flatten(1))

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._soft_label_loss(self(batch["image"]), batch)

    def configure_optimizers(self) -> Any:
        return optim.configure(self, self.trainer, self.cfg.optim, self.cfg.data.batch_size)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["synfer"]["frozen_source"] = self.frozen_spec["source"]
        checkpoint.setdefault("hyper_parameters", {})["frozen_spec"] = self.frozen_spec
        if not self.lab.store_frozen:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(FROZEN_PREFIXES)}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        if not self.lab.store_frozen:
            # The frozen weights were re-read from the recorded folder at construction: keep them.
            own = super().state_dict()
            state_dict = {**{k: v for k, v in own.items() if k.startswith(FROZEN_PREFIXES)}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["PseudoLabelerModule", "LatentEncoder", "load_frozen_source", "build_from_spec", "source_spec"]
