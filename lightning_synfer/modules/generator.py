"""SynFER generator: UNet2DConditionModel + DDPM training schedule + (sd) frozen VAE + text encoder + FAU adapter.

INTERFACE (sampling/synthesis code relies on exactly this):

    class GeneratorModule(L.LightningModule):            # task `generator`
        unet: UNet2DConditionModel; vae: Optional[AutoencoderKL]; text_encoder: TextEncoder
        au_adapter: Optional[AUAdapter]
        noise_scheduler: DDPMScheduler    # training schedule; samplers: DDIMScheduler.from_config(noise_scheduler.config)
        prediction_type: str              # "epsilon" | "v_prediction"
        label_names: list[str]; au_names: list[str]
        encode_text(captions: list[str]) -> Tensor (B, T, D_cross)      # after the text projection
        encode_aus(aus: Tensor (B, K) in [0,1]) -> Optional[Tensor (B, M, D_cross)]   # None without adapter
        conditioning(text_emb, au_tokens) -> Tensor    # encoder_hidden_states = cat([text (T), au (M)], dim=1)
        denoise(x_t, t, encoder_hidden_states, use_ema=False) -> Tensor  # the UNet's prediction (eps or v)
        images_to_model_space(images_m11) -> Tensor    # VAE encode * scaling (sd) or identity (tiny)
        model_space_to_images(z) -> Tensor             # VAE decode (sd) or identity; returns [-1, 1]
        sample_shape(batch) -> (B, C, H, W)            # shape of x_T
        ema_weights()                                  # context manager: EMA weights swapped in
        GeneratorModule.load(path)                     # export folder (save_pretrained) or Lightning .ckpt
    Unconditional inputs for guidance: caption "" and an all-zero AU vector (what dropout trains).
    set_au_scale(module.unet, s) from lightning_synfer.models.au_adapter changes the AU strength.

EXPORT (save_pretrained(folder); GeneratorModule.load(folder) reads it back):
    unet/, unet_ema/                  diffusers UNet2DConditionModel folders (LoRA merged, no AU processor keys)
    au_adapter.safetensors (+ _ema)   the AU MLP and every cross-attention layer's to_k_au / to_v_au
    text_projection.safetensors (+ _ema)   when the text width differs from cross_attention_dim
    text_encoder.json (+ text_encoder/ for the tiny encoder; sd copies text_encoder/, tokenizer/, vae/)
    scheduler/                        the training DDPMScheduler
    model_index.json, pytorch_lora_weights[_ema].safetensors   stock diffusers loading (models/diffusers_interop.py)
    generator_config.json             label/AU names, image size, channels, profile, prediction type, ...
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from datamodules.atomic import atomic_write_text
from datamodules.procedural.aus import AU_NAMES, EMFACS_PROTOTYPES, au_vector
from lightning_synfer import optim
from lightning_synfer.models.au_adapter import (AUAdapter, install_au_processors, load_au_adapter,
                                                save_au_adapter, set_au_scale)
from lightning_synfer.models.diffusers_interop import save_lora_weights, write_pipeline_index
from lightning_synfer.models.text_encoders import DTYPES, TextEncoder, build_text_encoder, TinyTextEncoder
from lightning_synfer.models.unets import build_tiny_unet, check_sd_folder, load_unet
from lightning_synfer.pretrained import resolve_export

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
EXPORT_FORMAT = 1
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def merged_unet_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights under plain diffusers names: LoRA merged into the base weights, AU processors left out."""
    lora_layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    state: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        if ".processor." in key or ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    for name, layer in lora_layers.items():
        for adapter in layer.active_adapters:
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = w + layer.get_delta_weight(adapter).to(w)
    return {k: v.float().contiguous().cpu() for k, v in state.items()}


def save_unet_folder(unet: UNet2DConditionModel, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_config(str(folder))
    save_file(merged_unet_state(unet), str(folder / "diffusion_pytorch_model.safetensors"))


def base_unet_folder(base: Path) -> Path:
    """The UNet a fine-tune starts from: the base's EMA weights (the ones it samples with) when it has them."""
    return base / "unet_ema" if (base / "unet_ema" / "config.json").is_file() else base / "unet"


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) at the sampled timesteps' alpha_bar:
    min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets; SNR = a / (1 - a)."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


class GeneratorModule(L.LightningModule):
    task_name = "generator"

    def __init__(self, config: dict, label_names: Sequence[str], au_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: DictConfig = OmegaConf.create(config)
        g = self.gcfg = self.cfg.generator
        self.label_names = list(label_names)
        self.au_names = list(au_names) if au_names is not None else list(AU_NAMES)
        self.profile = g.profile
        self.prediction_type = g.prediction_type
        channels = int(self.cfg.data.channels)
        # Generators see images in [-1, 1]: the DataModule normalises with mean 0.5, std 0.5.
        self.normalization = {"mean": [0.5] * channels, "std": [0.5] * channels,
                              "image_size": int(self.cfg.data.image_size), "channels": channels}
        if g.lora_rank > 0 and not g.train_unet:
            raise ValueError(f"generator.lora_rank={g.lora_rank} trains LoRA weights of the UNet but "
                             f"generator.train_unet=false; set train_unet=true or lora_rank=0")

        self.vae: Optional[AutoencoderKL] = None
        self.base: Optional[Path] = resolve_export(g.init_from) if g.init_from else None
        self.base_meta: dict = json.loads((self.base / "generator_config.json").read_text()) if self.base else {}
        self.patch_size = int(self.base_meta.get("patch_size", 1)) if self.base else int(g.patch_size)
        self._build_diffusion_model(g, channels)
        self.text_encoder: TextEncoder = build_text_encoder(g, str(self.sd_path) if g.profile == "sd" else None)
        cross_dim = int(self.unet.config.cross_attention_dim)
        # Trainable map from the frozen text width to the UNet's cross-attention width.
        self.text_proj: nn.Module = nn.Linear(self.text_encoder.dim, cross_dim) \
            if self.text_encoder.dim != cross_dim else nn.Identity()
        # Before the AU processors go in: freezing the UNet must not freeze their to_k_au / to_v_au.
        self._set_unet_trainable(g)
        self.au_adapter: Optional[AUAdapter] = None
        if g.au_adapter:
            self.au_adapter = AUAdapter(len(self.au_names), cross_dim, g.num_au_tokens, g.au_hidden, self.au_names)
            self.au_adapter.processors = install_au_processors(self.unet, g.num_au_tokens, g.au_scale,
                                                             str(g.au_value_init))
        if self.base is not None:
            self._init_from_base()
        if g.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # Frozen pretrained parts are not stored in Lightning checkpoints (they are re-read from pretrained_path).
        self.strict_loading = False
        self._frozen_prefixes = tuple(p for p, frozen in (("vae.", self.vae is not None),
                                                            ("text_encoder.", not isinstance(self.text_encoder,
                                                                                             TinyTextEncoder))) if frozen)
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

        # Fixed at construction: the EMA swap must not depend on later requires_grad changes (e.g. a sampler freezing).
        self._trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        self.ema = None
        if g.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable_parameters(), decay=g.ema_decay,
                                update_after_step=g.ema_update_after_step, use_ema_warmup=False, foreach=True)
        self._ema_active = False
        self._last_loss: Optional[float] = None

    # -- construction helpers -------------------------------------------------------------------------
    def _build_diffusion_model(self, g: DictConfig, channels: int) -> None:
        """The UNet and noise schedule (plus the frozen VAE for Stable Diffusion) of generator.profile."""
        if g.profile == "sd":
            root = check_sd_folder(self.sd_path)
            if g.text_encoder == "clip":
                check_sd_folder(root, required=("text_encoder/config.json", "tokenizer"))
            self.unet = load_unet(base_unet_folder(self.base) if self.base else root / "unet")
            self.vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True,
                                                     dtype=DTYPES[g.frozen_dtype])
            self.vae.requires_grad_(False).eval()
            self.noise_scheduler = self._sd_scheduler(root)
        elif self.base is not None:
            size, meta = int(self.cfg.data.image_size), self.base_meta
            if (meta.get("image_size"), meta.get("channels")) != (size, channels) or meta.get("profile") != "tiny":
                raise ValueError(f"generator.init_from={g.init_from}: a {meta.get('profile')} generator of "
                                 f"{meta.get('image_size')} px x {meta.get('channels')} channels; this run has "
                                 f"profile=tiny, data.image_size={size}, data.channels={channels}")
            self.unet = load_unet(base_unet_folder(self.base))
            self.noise_scheduler = self._sd_scheduler(self.base)  # the base's betas, as for SD
        else:
            p = self.patch_size
            self.unet = build_tiny_unet(g, int(self.cfg.data.image_size) // p, channels * p * p)
            self.noise_scheduler = DDPMScheduler(num_train_timesteps=g.num_train_timesteps, beta_schedule=g.beta_schedule,
                                                 prediction_type=g.prediction_type, clip_sample=True)

    def _init_from_base(self) -> None:
        """The base's text projection (and AU adapter, when it has one for these AUs), EMA weights first."""
        from safetensors.torch import load_file

        base, meta = self.base, self.base_meta
        ours, theirs = self.text_encoder.reference(), meta.get("text_encoder") or {}
        if ours.get("kind") != theirs.get("kind"):
            raise ValueError(f"generator.init_from={self.gcfg.init_from}: its text encoder is {theirs.get('kind')}, "
                             f"this run's generator.text_encoder is {ours.get('kind')}; they must match")
        if isinstance(self.text_encoder, TinyTextEncoder):
            self.text_encoder = TinyTextEncoder.from_folder(base / "text_encoder", cache_size=self.gcfg.text_cache_size)

        def best(name: str) -> Optional[Path]:
            for suffix in ("_ema", ""):
                if (base / f"{name}{suffix}.safetensors").is_file():
                    return base / f"{name}{suffix}.safetensors"
            return None

        if isinstance(self.text_proj, nn.Linear):
            weights = best("text_projection")
            if weights is None:
                raise FileNotFoundError(f"generator.init_from={base}: missing text_projection.safetensors (the map "
                                        f"from the {ours.get('kind')} text width to the UNet's)")
            self.text_proj.load_state_dict(load_file(str(weights)))
        adapter = best("au_adapter")
        if self.au_adapter is not None and adapter is not None:
            same = meta.get("au_names") == self.au_names and int(meta.get("num_au_tokens", -1)) == \
                int(self.gcfg.num_au_tokens)
            if same:
                self.load_au_adapter(adapter)
            else:
                log.info("generator.init_from=%s: its AU adapter (%s AUs, %s tokens) does not fit this run's "
                         "(%d AUs, %d tokens): the adapter starts fresh", base, len(meta.get("au_names") or []),
                         meta.get("num_au_tokens"), len(self.au_names), int(self.gcfg.num_au_tokens))

    def _set_unet_trainable(self, g: DictConfig) -> None:
        """The UNet's trainable set: all of it, LoRA weights only, or nothing (adapter-only on a frozen base)."""
        if not g.train_unet or g.lora_rank > 0:
            self.unet.requires_grad_(False)
        if g.lora_rank > 0:
            self.unet.add_adapter(LoraConfig(r=g.lora_rank, lora_alpha=g.lora_alpha or g.lora_rank,
                                             init_lora_weights="gaussian", target_modules=LORA_TARGETS))
            for name, p in self.unet.named_parameters():
                p.requires_grad_("lora_" in name)

    @property
    def sd_path(self) -> Optional[str]:
        # An SD-profile export is itself a complete SD folder: init_from alone is enough.
        return self.gcfg.pretrained_path or self.cfg.model.get("pretrained_path") or \
            (str(self.base) if self.base is not None and self.profile == "sd" else None)

    def _sd_scheduler(self, root: Path) -> DDPMScheduler:
        g = self.gcfg
        pre = DDPMScheduler.from_pretrained(str(root / "scheduler"), local_files_only=True)
        # The pretrained UNet was trained with its own betas; replacing them would undo the pretraining.
        if pre.config.beta_schedule != g.beta_schedule:
            log.warning("generator.beta_schedule=%s ignored for profile=sd: %s/scheduler uses %s",
                        g.beta_schedule, root, pre.config.beta_schedule)
        if pre.config.prediction_type != g.prediction_type:
            log.warning("generator.prediction_type=%s differs from the pretrained %s (fine-tuning switches target)",
                        g.prediction_type, pre.config.prediction_type)
        return DDPMScheduler.from_config(pre.config, prediction_type=g.prediction_type)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train (and that EMA tracks), in a fixed order; shared tensors once."""
        params = dict(self.named_parameters())
        return [params[n] for n in self._trainable_names]

    # -- the interface samplers use ---------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        emb = self.text_encoder.encode(list(captions)).to(self.device)
        return self.text_proj(emb)

    def encode_aus(self, aus: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.au_adapter is None:
            return None
        if aus is None:
            raise ValueError("encode_aus: pass an AU tensor (B, K); zeros mean 'no AU condition'")
        aus = torch.as_tensor(aus, dtype=torch.float32, device=self.device)
        if aus.ndim != 2 or aus.shape[1] != len(self.au_names):
            raise ValueError(f"AU vector of shape {tuple(aus.shape)}: expected (batch, {len(self.au_names)}) with "
                             f"intensities in [0, 1] ordered as {self.au_names}")
        if aus.numel() and not bool(((aus >= 0) & (aus <= 1)).all()):  # also catches NaN (comparisons are False)
            bad = aus[~((aus >= 0) & (aus <= 1))]
            raise ValueError(f"AU intensities must be finite numbers in [0, 1] (ordered as {self.au_names}); "
                             f"got {bad[:5].tolist()}")
        return self.au_adapter(aus)

    def conditioning(self, text_emb: torch.Tensor, au_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        if self.au_adapter is None:
            return text_emb
        if au_tokens is None:  # the no-AU condition: what AU dropout trains
            au_tokens = self.encode_aus(torch.zeros(text_emb.shape[0], len(self.au_names), device=text_emb.device))
        return torch.cat([text_emb, au_tokens.to(text_emb.dtype)], dim=1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                use_ema: bool = False) -> torch.Tensor:
        ctx = self.ema_weights() if use_ema and not self._ema_active else nullcontext()
        with ctx:
            return self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states).sample

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def images_to_model_space(self, images_m11: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return F.pixel_unshuffle(images_m11, self.patch_size) if self.patch_size > 1 else images_m11
        rgb = int(self.vae.config.in_channels) == 3 and images_m11.shape[1] == 1
        x = images_m11.expand(-1, 3, -1, -1) if rgb else images_m11  # SD's VAE is RGB
        with torch.no_grad():
            z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        return (z * self.vae.config.scaling_factor).float()

    def model_space_to_images(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return (F.pixel_shuffle(z, self.patch_size) if self.patch_size > 1 else z).clamp(-1, 1)
        x = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return x.float().clamp(-1, 1)

    def sample_shape(self, batch: int) -> tuple:
        size = int(self.cfg.data.image_size)
        if self.vae is None:
            p = self.patch_size
            return (batch, int(self.cfg.data.channels) * p * p, size // p, size // p)
        return (batch, int(self.vae.config.latent_channels), size // self.vae_scale, size // self.vae_scale)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights into the trainable parameters for the duration (no-op without EMA)."""
        if self.ema is None or self._ema_active:
            yield
            return
        params = self.trainable_parameters()
        self._ema_to_device()
        self.ema.store(params)
        self.ema.copy_to(params)
        self._ema_active = True
        try:
            yield
        finally:
            self.ema.restore(params)
            self._ema_active = False

    def save_au_adapter(self, path: str | os.PathLike) -> None:
        if self.au_adapter is None:
            raise ValueError("save_au_adapter: this generator has no AU adapter (generator.au_adapter=false)")
        save_au_adapter(self.au_adapter, path)

    def load_au_adapter(self, path: str | os.PathLike) -> None:
        if self.au_adapter is None:
            raise ValueError("load_au_adapter: this generator has no AU adapter (generator.au_adapter=false)")
        load_au_adapter(self.au_adapter, path)

    def set_au_scale(self, scale: float) -> None:
        set_au_scale(self.unet, scale)

    # -- training -----------------------------------------------------------------------------------------
    def _step_generator(self, salt: int) -> torch.Generator:
        """Noise/timestep RNG seeded by (seed, rank, step): every rank draws its own, resume replays exactly."""
        g = torch.Generator(device=self.device)
        g.manual_seed(zlib.crc32(f"{self.cfg.seed}:{self.global_rank}:{self.global_step}:{salt}".encode()))
        return g

    def _drop(self, n: int, p: float, gen: torch.Generator) -> torch.Tensor:
        if p <= 0 or not self.training:
            return torch.zeros(n, dtype=torch.bool, device=self.device)
        return torch.rand(n, generator=gen, device=self.device) < p

    def diffusion_loss(self, batch: dict[str, Any], gen: torch.Generator, *, dropout: bool = True) -> torch.Tensor:
        g = self.gcfg
        x0 = self.images_to_model_space(batch["image"])
        b = x0.shape[0]
        captions = list(batch["caption"])
        if dropout:
            drop = self._drop(b, g.caption_dropout, gen).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        au_tokens = None
        if self.au_adapter is not None:
            aus = batch["aus"].float()
            if "has_aus" in batch:  # no AUs known: the zero (= AU-dropped) condition, branch effectively off
                aus = aus * batch["has_aus"].to(aus).view(-1, 1)
            if dropout:
                aus = aus * (~self._drop(b, g.au_dropout, gen)).to(aus).view(-1, 1)
            au_tokens = self.encode_aus(aus)
        cond = self.conditioning(self.encode_text(captions), au_tokens)
        noise = torch.randn(x0.shape, generator=gen, device=self.device, dtype=x0.dtype)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=gen, device=self.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)
        pred = self.unet(x_t, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if g.snr_gamma:
            per_sample = per_sample * min_snr_weights(self.alphas_cumprod.to(self.device)[t], g.snr_gamma,
                                                      self.prediction_type)
        return per_sample.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self._step_generator(0))
        self._last_loss = float(loss.detach())
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Validate the EMA weights; swapped once per epoch (a swap copies every trainable tensor).
        self._val_ema = self.ema_weights()
        self._val_ema.__enter__()

    def on_validation_epoch_end(self) -> None:
        ctx, self._val_ema = getattr(self, "_val_ema", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same noise every validation
        loss = self.diffusion_loss(batch, gen, dropout=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self._ema_to_device()
            self.ema.step(self.trainable_parameters())

    def _ema_to_device(self) -> None:
        if self.ema is not None and self.ema.shadow_params and self.ema.shadow_params[0].device != self.device:
            self.ema.to(device=self.device)

    def on_fit_start(self) -> None:
        self._ema_to_device()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.gcfg.sample_every_n_steps
        if n and self.global_step % n == 0 and self.global_step > 0 and self.trainer.is_global_zero:
            self.log_samples()

    def on_train_end(self) -> None:
        # While the loggers are still open (fit_metrics runs after they are finalised).
        if self.gcfg.sample_every_n_steps and self.trainer.is_global_zero and self.global_step > 0:
            self.log_samples("samples_final")

    def configure_optimizers(self) -> Any:
        return optim.configure(self, self.trainer, self.cfg.optim, self.cfg.data.batch_size)

    # -- validation samples -----------------------------------------------------------------------------
    def sample_conditions(self) -> tuple[list[str], torch.Tensor]:
        """Fixed captions and AUs of the logged grid: one label caption (and EMFACS prototype) per class."""
        from datamodules.datamodule import label_caption

        captions = list(self.gcfg.sample_captions) or [label_caption(n) for n in self.label_names]
        aus = torch.zeros(len(captions), len(self.au_names))
        if not self.gcfg.sample_captions and list(AU_NAMES) == self.au_names:
            for i, name in enumerate(self.label_names):
                if name in EMFACS_PROTOTYPES:
                    aus[i] = torch.from_numpy(au_vector(EMFACS_PROTOTYPES[name]))
        return captions, aus

    @torch.no_grad()
    def sample(self, captions: Sequence[str], aus: Optional[torch.Tensor] = None, steps: int = 25,
               guidance: float = 3.0, seed: int = 0, use_ema: bool = True) -> torch.Tensor:
        """A plain DDIM loop with classifier-free guidance ("" + zero AUs); images in [-1, 1]."""
        b = len(captions)
        sched = DDIMScheduler.from_config(self.noise_scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.sample_shape(b), generator=gen).to(self.device) * sched.init_noise_sigma
        zeros = torch.zeros(b, len(self.au_names), device=self.device)
        cond = self.conditioning(self.encode_text(captions), self.encode_aus(aus if aus is not None else zeros))
        uncond = self.conditioning(self.encode_text([""] * b), self.encode_aus(zeros))
        both = torch.cat([uncond, cond])
        with self.ema_weights() if use_ema else nullcontext():
            for t in sched.timesteps:
                pred_u, pred_c = self.denoise(torch.cat([x, x]), t, both).chunk(2)
                x = sched.step(pred_u + guidance * (pred_c - pred_u), t, x).prev_sample
        return self.model_space_to_images(x)

    def log_samples(self, tag: str = "samples") -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        captions, aus = self.sample_conditions()
        was_training = self.training
        self.eval()
        try:
            images = self.sample(captions, aus, steps=self.gcfg.sample_steps, guidance=self.gcfg.sample_guidance,
                                 seed=self.gcfg.sample_seed, use_ema=True)
        finally:
            self.train(was_training)
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=min(8, len(captions)))
        for lg in loggers:
            lg.experiment.add_image(tag, grid.clamp(0, 1), global_step=self.global_step)

    # -- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["synfer"] = {"task": self.task_name, "format": CHECKPOINT_FORMAT, "label_names": self.label_names,
                                "au_names": self.au_names, "normalization": self.normalization}
        if self._frozen_prefixes:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith(self._frozen_prefixes)}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored_aus = checkpoint.get("synfer", {}).get("au_names")
        if self.au_adapter is not None and stored_aus is not None:  # resume / warm start into this run's vocabulary
            from datamodules.au_vocabulary import check_same_aus

            check_same_aus(stored_aus, self.au_names, source="generator checkpoint (its FAU adapter's inputs)",
                           target="this run's AU vocabulary")
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            self._ema_to_device()

    # -- the fit task hooks -----------------------------------------------------------------------------------
    @staticmethod
    def trainer_overrides(cfg: DictConfig) -> dict:
        return {"monitor": None}  # no accuracy to select on: keep last.ckpt

    def fit_metrics(self, trainer: L.Trainer, datamodule: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"final_loss": self._last_loss, "steps": int(trainer.global_step)}
        if self.gcfg.export_on_fit_end and trainer.default_root_dir:
            folder = Path(trainer.default_root_dir) / "export"
            if trainer.is_global_zero:
                self.save_pretrained(folder)
            out["export_dir"] = str(folder)
        if self.gcfg.publish_as and trainer.is_global_zero:
            out["published"] = self._publish(trainer, datamodule)
        return out

    def _publish(self, trainer: L.Trainer, datamodule: Any) -> dict[str, Any]:
        from lightning_synfer.pretrained.publish import judged_sample_accuracy, publish

        g = self.gcfg
        sample_accuracy = None
        if g.publish_judge:
            sample_accuracy = judged_sample_accuracy(self.eval(), g.publish_judge, int(g.publish_samples_per_class),
                                                     int(g.sample_steps), float(g.sample_guidance))
        prov_path = Path(str(trainer.default_root_dir)) / "provenance.json"
        argv = json.loads(prov_path.read_text()).get("argv", []) if prov_path.is_file() else []
        from lightning_synfer.config.schema import VOLATILE_KEYS

        # where and how it ran (run dir, resumption), not what it computes
        argv = [a for a in argv if not a.startswith(tuple(f"{k}=" for k in VOLATILE_KEYS))]
        train = OmegaConf.to_container(self.cfg.data.train, resolve=True)
        folder = publish(self, g.publish_as, argv=argv, steps=int(trainer.global_step), final_loss=self._last_loss,
                         data={"train": train, "image_size": int(self.cfg.data.image_size),
                               "images_seen": int(trainer.global_step) * int(self.cfg.data.batch_size)},
                         sample_accuracy=sample_accuracy, **({"dest_root": Path(g.publish_dir)} if g.publish_dir else {}))
        log.info("published the generator base %s (sample accuracy %s)", folder,
                 sample_accuracy and f"{100 * sample_accuracy['accuracy']:.1f}%")
        return {"dir": str(folder), "sample_accuracy": sample_accuracy and sample_accuracy["accuracy"]}

    # -- export ---------------------------------------------------------------------------------------------
    def _write_weights(self, folder: Path, suffix: str) -> None:
        from safetensors.torch import save_file

        save_unet_folder(self.unet, folder / f"unet{suffix}")
        save_lora_weights(self.unet, folder, suffix)  # LoRA runs: diffusers LoRA weights for the base model
        if self.au_adapter is not None:
            self.save_au_adapter(folder / f"au_adapter{suffix}.safetensors")
        if isinstance(self.text_proj, nn.Linear):
            save_file({k: v.detach().float().contiguous().cpu() for k, v in self.text_proj.state_dict().items()},
                      str(folder / f"text_projection{suffix}.safetensors"))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the diffusers-format export described in the module docstring; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # generator_config.json marks a complete export: an old one must not vouch for the files rewritten below.
        (folder / "generator_config.json").unlink(missing_ok=True)
        self._write_weights(folder, "")
        if self.ema is not None:
            with self.ema_weights():
                self._write_weights(folder, "_ema")
        self.noise_scheduler.save_pretrained(str(folder / "scheduler"))
        ref = self.text_encoder.reference()
        if isinstance(self.text_encoder, TinyTextEncoder):
            self.text_encoder.save(folder / "text_encoder")
        if self.profile == "sd":
            # A self-contained SD folder: the frozen parts are copied byte for byte.
            src = Path(str(self.sd_path)).resolve()
            for sub in ("vae", "text_encoder", "tokenizer", "feature_extractor"):
                if (src / sub).is_dir() and src != folder.resolve():
                    if sub == "text_encoder" and ref["kind"] != "clip":
                        continue
                    shutil.copytree(src / sub, folder / sub, dirs_exist_ok=True)
        (folder / "text_encoder.json").write_text(json.dumps(ref, indent=2))
        write_pipeline_index(self, folder)  # model_index.json: a stock StableDiffusionPipeline reads the folder
        meta = {
            "format": EXPORT_FORMAT, "task": self.task_name, "profile": self.profile,
            "label_names": self.label_names, "au_names": self.au_names,
            "image_size": int(self.cfg.data.image_size), "channels": int(self.cfg.data.channels),
            "sample_shape": list(self.sample_shape(1)[1:]), "prediction_type": self.prediction_type,
            "au_adapter": self.au_adapter is not None, "num_au_tokens": int(self.gcfg.num_au_tokens),
            "au_scale": float(self.gcfg.au_scale), "text_encoder": ref, "ema": self.ema is not None,
            "cross_attention_dim": int(self.unet.config.cross_attention_dim), "patch_size": self.patch_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        atomic_write_text(folder / "generator_config.json", json.dumps(meta, indent=2))  # last: marks a complete export
        return folder

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeneratorModule":
        """An export folder (save_pretrained) or a Lightning .ckpt, in eval mode on CPU."""
        path = Path(str(path))
        if path.is_dir():
            return cls.from_export(path)
        if path.is_file():
            return cls.from_checkpoint(path)
        raise FileNotFoundError(f"generator {path}: no such export folder or checkpoint file")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "GeneratorModule":
        from lightning_synfer.checkpoints import CheckpointError, read_checkpoint

        ckpt = read_checkpoint(path)
        if ckpt["synfer"].get("task") != cls.task_name:
            raise CheckpointError(f"ckpt={path}: a '{ckpt['synfer'].get('task')}' checkpoint; expected a generator")
        module = cls(**ckpt["hyper_parameters"])
        missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
        missing = [k for k in missing if not k.startswith(module._frozen_prefixes)] if module._frozen_prefixes \
            else list(missing)
        if missing or unexpected:
            raise CheckpointError(f"ckpt={path}: weights do not match the generator config "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        module.on_load_checkpoint(ckpt)
        return module.eval()

    @classmethod
    def from_export(cls, folder: str | os.PathLike) -> "GeneratorModule":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / "generator_config.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"generator export {folder}: missing generator_config.json "
                                    f"(not a complete GeneratorModule.save_pretrained folder)")
        meta = json.loads(meta_path.read_text())
        config = meta["config"]
        gen = dict(config["generator"])
        gen["lora_rank"] = 0  # the export holds merged weights
        # The UNet's architecture, patching and schedule are the export's own (the base it started from may be gone).
        gen["init_from"] = str(folder)
        if meta["profile"] == "sd":
            gen["pretrained_path"] = str(folder)  # the export is itself an SD folder
            config["model"] = {**config.get("model", {}), "pretrained_path": None}
        config = {**config, "generator": gen}
        module = cls(config, meta["label_names"], meta["au_names"])
        if isinstance(module.text_encoder, TinyTextEncoder):
            module.text_encoder = TinyTextEncoder.from_folder(folder / "text_encoder",
                                                              cache_size=module.gcfg.text_cache_size)

        def load_weights(suffix: str) -> None:
            weights = folder / f"unet{suffix}" / "diffusion_pytorch_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"generator export {folder}: missing {weights.relative_to(folder)} "
                                        f"(the UNet weights; not a complete GeneratorModule.save_pretrained folder)")
            state = load_file(str(weights))
            missing, unexpected = module.unet.load_state_dict(state, strict=False)
            missing = [k for k in missing if ".processor." not in k]
            if missing or unexpected:
                raise ValueError(f"generator export {folder}/unet{suffix}: weights do not match its config "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
            if module.au_adapter is not None:
                module.load_au_adapter(folder / f"au_adapter{suffix}.safetensors")
            if isinstance(module.text_proj, nn.Linear):
                module.text_proj.load_state_dict(load_file(str(folder / f"text_projection{suffix}.safetensors")))

        if module.ema is not None and meta.get("ema") and (folder / "unet_ema").is_dir():
            load_weights("_ema")  # EMA first: the shadow copy is taken from these, then the raw weights load
            module.ema.shadow_params = [p.detach().clone() for p in module.trainable_parameters()]
        load_weights("")
        return module.eval()
