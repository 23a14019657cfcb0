"""The prepared GPU check of issue 17: Stable Diffusion 1.5 at full size, random weights, one GPU, <= 8 minutes.

    benchmarks/gpu/check.sh                  # one H100/H200; results in $OUT (or benchmarks/gpu/results/<date>)
    benchmarks/gpu/check.sh --cpu-smoke      # the same code paths on CPU with a tiny SD at 64 px, in seconds
    benchmarks/gpu/check.sh --dry-run        # the plan of this check and the paper pipeline's stage graph

Nothing is downloaded: the SD 1.5 folder (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + a character-level
CLIPTokenizer, DDPMScheduler) is built from SD 1.5's config dicts with random weights and saved with
save_pretrained, and every module below is built from the paper configs (experiments/paper/*) pointed at it, the
way `run.py` builds them. Speed does not depend on the weights' values. What it measures:

  finetune     stage 1 of the generator (paper/generator/sd15_fetext: full UNet, bf16-mixed, gradient checkpointing,
               min-SNR 5, EMA, grad clip 1) at batch 16, 512 px: GeneratorModule in a Lightning Trainer from
               build_trainer, against a plain diffusers train_text_to_image-style loop (same parts and settings,
               no Lightning) in the same process; s/step, images/s, the ratio ours/plain, peak memory of each.
  sampling     25 DDIM steps with classifier-free guidance (the paper/synthesize configs' text/AU scales) through
               the synthesize task's SynthesisModule.predict_step on the SynFER generator (FAU adapter): without
               semantic guidance; with it in the last 30% of the steps (guidance.window=0.3, the paper configs'
               bound on its cost) and at every step (window 1.0); and the full SynFER row (window 0.3 + the layout
               start: DDIM inversion of a real face through the VAE encoder). images/s and peak memory of each:
               semantic guidance backpropagates through the UNet, the VAE decoder and the classifier.
  labeler      FERAnno (paper/labeler/feranno_affectnet, 512 px, bf16 frozen UNet + VAE encoder): images/s of the
               forward pass (rectification) and of a training step of its heads.

Results: check.json and check.md (GPU name, torch/diffusers/transformers/lightning versions, UTC date, commit) in
--out, $OUT, or benchmarks/gpu/results/<UTC date>. Every phase records what it ran (batch, steps, shapes); a phase
that would not fit the time budget is recorded as skipped, never estimated.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LABELS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"]  # AffectNet's 7 classes

# Stable Diffusion 1.5's architecture (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
                 downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1)  # ids of our tokenizer's specials
# The same parts, tiny (as tests/fixtures.make_tiny_sd): the CPU smoke run.
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16, vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
# SD 1.5's training schedule (its scheduler/ folder holds a PNDMScheduler with these betas and steps_offset 1).
SD15_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                     steps_offset=1, num_train_timesteps=1000)


@dataclass
class Scale:
    """Everything that differs between the GPU check and its CPU smoke run; the code paths are the same."""

    name: str
    device: str
    image_size: int
    unet: dict
    vae: dict
    text: dict
    train_batch: int
    train_warmup: int
    train_steps: int
    sample_batch: int
    sample_steps: int
    warmup_calls: int  # untimed calls first (cuDNN autotuning, the allocator's first growth)
    sample_reps: int
    labeler_batch: int
    labeler_reps: int
    precision: str  # the Trainer's; autocast of the sampling and labeler phases follows it
    overrides: dict = field(default_factory=dict)  # per config family: what the smoke run shrinks

    @property
    def autocast_dtype(self):
        import torch

        return torch.bfloat16 if self.precision.startswith("bf16") else None


GPU = Scale(name="gpu", device="cuda", image_size=512, unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT,
            train_batch=16, train_warmup=3, train_steps=12, sample_batch=16, sample_steps=25, warmup_calls=1,
            sample_reps=2,
            labeler_batch=64, labeler_reps=5, precision="bf16-mixed")
CPU_SMOKE = Scale(name="cpu-smoke", device="cpu", image_size=64, unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT,
                  train_batch=2, train_warmup=0, train_steps=2, sample_batch=2, sample_steps=3, warmup_calls=0,
                  sample_reps=1,
                  labeler_batch=2, labeler_reps=1, precision="32-true",
                  overrides={"generator": ["generator.text_max_length=16", "generator.frozen_dtype=fp32",
                                           "generator.au_hidden=32"],
                             "labeler": ["labeler.frozen_dtype=fp32", "labeler.dim=16", "labeler.heads=2",
                                         "labeler.fusion_layers=1", "labeler.attn_grid=4", "labeler.feature_grid=2",
                                         "labeler.attn_tokens=0"],
                             "classifier": ["model.backbone=synfer_cnn_s", "data.image_size=32"]})


class NoCudaDevice(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- environment

def require_device(scale: Scale) -> None:
    import torch

    if scale.device == "cuda" and not torch.cuda.is_available():
        raise NoCudaDevice(
            f"benchmarks/gpu/check.sh: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}, torch.cuda.is_available() is False). This check measures SD 1.5 on one "
            f"H100/H200; run it on a GPU machine, or pass --cpu-smoke to run the same code paths on CPU in seconds")


def environment(scale: Scale) -> dict[str, Any]:
    import diffusers
    import lightning
    import torch
    import transformers

    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "mode": scale.name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "lightning": lightning.__version__,
           "python": platform.python_version(), "host_cpu": platform.processor() or platform.machine(),
           "commit": _git(["rev-parse", "HEAD"]), "working_tree_dirty": bool(_git(["status", "--porcelain"]))}
    if scale.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_count_visible=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, torch_threads=torch.get_num_threads())
    return env


def _git(args: list[str]) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- the SD folder

def build_sd_folder(root: Path, scale: Scale) -> Path:
    """A diffusers SD folder from config dicts, random weights, every part saved with save_pretrained (fp32, as
    the reference checkpoint). The tokenizer is character-level (no vocabulary can be downloaded) and pads to the
    text model's positions, as SD's CLIPTokenizer does; captions therefore cost what real ones cost."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lightning_synfer.models.diffusers_interop import pipeline_index

    torch.manual_seed(0)
    init_device = scale.device  # random init of 1.1B parameters is seconds on a GPU, a minute on CPU
    with torch.device(init_device):
        parts = {"unet": UNet2DConditionModel(**scale.unet), "vae": AutoencoderKL(**scale.vae),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**scale.text))}
    for name, model in parts.items():
        model.to("cpu").save_pretrained(root / name)
    del parts
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "',.-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    source = root / "tokenizer_source"
    source.mkdir(parents=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")  # no merges: character-level BPE
    CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"),
                  model_max_length=int(scale.text["max_position_embeddings"])).save_pretrained(root / "tokenizer")
    shutil.rmtree(source)
    DDPMScheduler(**SD15_SCHEDULE).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(pipeline_index("DDPMScheduler")))
    return root


# ---------------------------------------------------------------------------------------------- measuring

class Clock:
    """Wall time of GPU work: synchronises before reading the clock."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":  # CPU runs have no peak to reset (and a collection of the whole heap is ~1 s there)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, Optional[float]]:
    import torch

    if device != "cuda":
        from lightning_synfer.tasks.common import peak_memory_mb

        return {"peak_allocated_gib": None, "peak_reserved_gib": None,
                "process_peak_rss_gib": round(peak_memory_mb()["peak_rss_mb"] / 1024, 2)}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def timing(seconds: list[float], images: int) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"median_s": round(median, 4), "mean_s": round(statistics.mean(seconds), 4),
            "min_s": round(min(seconds), 4), "max_s": round(max(seconds), 4), "reps": len(seconds),
            "images_per_s": round(images / median, 3)}


def compose_for(scale: Scale, experiment: str, sd: Path, families: tuple[str, ...], extra: list[str]):
    from lightning_synfer.config import compose

    overrides = [f"paths.stable_diffusion={sd}", f"data.image_size={scale.image_size}",
                 *(o for f in families for o in scale.overrides.get(f, [])), *extra]
    return compose(experiment, overrides)


def captions_for(step: int, batch: int) -> list[str]:
    """Distinct captions every step (FEText's are per image): the generator's caption cache cannot hit."""
    words = ("happy", "sad", "surprised", "fearful", "disgusted", "angry", "neutral")
    return [f"a close-up photo of a {words[(step + i) % 7]} face, brows raised, sample {step}-{i}"
            for i in range(batch)]


# ---------------------------------------------------------------------------------------------- fine-tune

def finetune_config(scale: Scale, sd: Path):
    return compose_for(scale, "paper/generator/sd15_fetext", sd, ("generator",),
                       [f"data.batch_size={scale.train_batch}", f"trainer.precision={scale.precision}",
                        "generator.sample_every_n_steps=0", "trainer.enable_progress_bar=false",
                        f"trainer.max_steps={scale.train_warmup + scale.train_steps}"])


def training_batches(scale: Scale, steps: int) -> list[dict[str, Any]]:
    """Host batches, copied to the device inside each timed step by both loops alike (neither pins them)."""
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(scale.train_batch, 3, scale.image_size, scale.image_size, generator=g) * 2 - 1
    return [{"image": images, "caption": captions_for(i, scale.train_batch),
             "label": torch.zeros(scale.train_batch, dtype=torch.long)} for i in range(steps)]


class PlainTextToImageLoop:
    """diffusers' examples/text_to_image/train_text_to_image.py, reduced to its step, with the recipe's settings:
    VAE latents * scaling_factor, CLIP text states, DDPM noise, the UNet under bf16 autocast, min-SNR-gamma MSE,
    backward, grad-norm clip, AdamW, zero_grad, EMAModel.step. Frozen VAE/text encoder in the recipe's dtype."""

    def __init__(self, cfg: Any, sd: Path, device: str) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import EMAModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from lightning_synfer.models.text_encoders import DTYPES

        g = cfg.generator
        weight_dtype = DTYPES[g.frozen_dtype]
        self.device, self.max_length, self.snr_gamma = device, int(g.text_max_length), g.snr_gamma
        self.clip = float(cfg.trainer.gradient_clip_val or 0)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16) if cfg.trainer.precision.startswith("bf16") \
            else nullcontext()
        self.scheduler = DDPMScheduler.from_pretrained(str(sd / "scheduler"))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(sd / "tokenizer"))
        self.text_encoder = CLIPTextModel.from_pretrained(str(sd / "text_encoder")).to(device, weight_dtype)
        self.vae = AutoencoderKL.from_pretrained(str(sd / "vae")).to(device, weight_dtype)
        self.text_encoder.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(str(sd / "unet")).to(device).train()
        if g.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=float(cfg.optim.lr),
                                           weight_decay=float(cfg.optim.weight_decay))
        self.ema = EMAModel(self.unet.parameters(), decay=float(g.ema_decay), foreach=True) if g.ema else None
        if self.ema is not None:
            self.ema.to(device=device)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    def step(self, batch: dict[str, Any]) -> float:
        import torch
        import torch.nn.functional as F

        ids = self.tokenizer(batch["caption"], max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        pixels = batch["image"].to(self.device)  # the host-to-device copy a prepared DataLoader makes
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample()
            latents = (latents * self.vae.config.scaling_factor).float()
            states = self.text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.autocast:
            pred = self.unet(noisy, t, states, return_dict=False)[0]
        if self.snr_gamma:
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            weights = torch.clamp(snr, max=self.snr_gamma) / snr
            loss = (F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        else:
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        return float(loss.detach())


def measure_plain_loop(scale: Scale, sd: Path, cfg: Any) -> dict[str, Any]:
    reset_peak(scale.device)
    loop = PlainTextToImageLoop(cfg, sd, scale.device)
    batches = training_batches(scale, scale.train_warmup + scale.train_steps)
    clock, seconds, losses = Clock(scale.device), [], []
    for i, batch in enumerate(batches):
        start = clock.now()
        losses.append(loop.step(batch))
        if i >= scale.train_warmup:
            seconds.append(clock.now() - start)
    out = {**timing(seconds, scale.train_batch), **peak_memory(scale.device), "final_loss": round(losses[-1], 5),
           "trainable_params_m": round(sum(p.numel() for p in loop.unet.parameters()) / 1e6, 1)}
    del loop, batches
    return out


def measure_generator_module(scale: Scale, sd: Path, cfg: Any) -> dict[str, Any]:
    import lightning as L
    import torch

    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.generator import GeneratorModule
    from lightning_synfer.trainer import build_trainer

    class StepTimes(L.Callback):
        """End of one step to the end of the next: the loader's fetch, the device copy and every hook count."""

        def __init__(self) -> None:
            self.clock, self.seconds, self.previous_end = Clock(scale.device), [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 0:  # no step ended before the first one
                self.previous_end = self.clock.now()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            now = self.clock.now()
            if batch_idx >= scale.train_warmup:
                self.seconds.append(now - self.previous_end)
            self.previous_end = now

    reset_peak(scale.device)
    module = GeneratorModule(to_container(cfg), LABELS)
    batches = training_batches(scale, scale.train_warmup + scale.train_steps)
    times = StepTimes()
    trainer = build_trainer(cfg, None, monitor=None, enable_checkpointing=False, callbacks=[times],
                            accelerator="gpu" if scale.device == "cuda" else "cpu", devices=1, num_nodes=1,
                            strategy="auto", max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    if len(times.seconds) != scale.train_steps:
        raise RuntimeError(f"finetune: GeneratorModule ran {len(times.seconds)} timed steps, expected "
                           f"{scale.train_steps} (trainer.max_steps={cfg.trainer.max_steps})")
    out = {**timing(times.seconds, scale.train_batch), **peak_memory(scale.device),
           "final_loss": round(float(module._last_loss), 5), "precision": str(trainer.precision),
           "trainable_params_m": round(sum(p.numel() for p in module.trainable_parameters()) / 1e6, 1)}
    del trainer, module, batches, loader
    return out


def phase_finetune(scale: Scale, sd: Path) -> dict[str, Any]:
    cfg = finetune_config(scale, sd)
    g = cfg.generator
    plain = measure_plain_loop(scale, sd, cfg)
    ours = measure_generator_module(scale, sd, cfg)
    return {"experiment": "paper/generator/sd15_fetext", "batch": scale.train_batch, "image_size": scale.image_size,
            "warmup_steps": scale.train_warmup, "timed_steps": scale.train_steps, "precision": scale.precision,
            "recipe": {"gradient_checkpointing": bool(g.gradient_checkpointing), "snr_gamma": g.snr_gamma,
                       "ema": bool(g.ema), "frozen_dtype": g.frozen_dtype, "optimizer": cfg.optim.name,
                       "gradient_clip_val": cfg.trainer.gradient_clip_val, "text_max_length": int(g.text_max_length)},
            "generator_module": ours, "plain_diffusers_loop": plain,
            "throughput_ratio_ours_over_plain": round(plain["median_s"] / ours["median_s"], 3)}


# ---------------------------------------------------------------------------------------------- sampling

def random_classifier(scale: Scale):
    """The semantic-guidance classifier's architecture (paper/supervised/affectnet_resnet50), random weights,
    wrapped as synthesize wraps a checkpoint (ImageClassifier: [0, 1] images, resized and normalised)."""
    from lightning_synfer.checkpoints import ImageClassifier
    from lightning_synfer.config import compose
    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("paper/supervised/affectnet_resnet50", ["model.pretrained_path=null",
                                                          *scale.overrides.get("classifier", [])])
    return ImageClassifier(SupervisedFER(to_container(cfg), LABELS)).eval(), cfg.model.backbone


def write_layout_faces(folder: Path, count: int, size: int) -> list[str]:
    import numpy as np
    from PIL import Image

    from datamodules.atomic import atomic_open

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"face_{i:03d}.png"
        with atomic_open(path, "wb") as fh:
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(fh, format="PNG")
        paths.append(str(path))
    return paths


def phase_sampling(scale: Scale, sd: Path, work: Path) -> dict[str, Any]:
    import torch

    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.generator import GeneratorModule
    from lightning_synfer.sampling.ddim import SamplerSettings
    from lightning_synfer.sampling.guidance import SemanticGuidance
    from lightning_synfer.tasks.synthesize import SynthesisModule

    gen_cfg = compose_for(scale, "paper/generator/sd15_synfer", sd, ("generator",),
                          ["generator.sample_every_n_steps=0"])
    syn_cfg = compose_for(scale, "paper/synthesize/synfer", sd, (), [f"sampling.steps={scale.sample_steps}"])
    gen = GeneratorModule(to_container(gen_cfg), LABELS).to(scale.device).eval()
    classifier, backbone = random_classifier(scale)
    classifier = classifier.to(scale.device)
    settings = SamplerSettings.from_config(syn_cfg.sampling)
    layout = write_layout_faces(work / "layout_faces", scale.sample_batch, scale.image_size)
    scale_g, window = float(syn_cfg.guidance.scale), float(syn_cfg.guidance.window)

    def module(window: Optional[float], with_layout: bool) -> SynthesisModule:
        guidance = SemanticGuidance(classifier, scale_g, window, LABELS) if window else None
        return SynthesisModule(gen, settings, guidance=guidance, layout_paths=layout if with_layout else None,
                               layout_strength=float(syn_cfg.synthesis.layout.strength), generator_id="random-sd15")

    variants = {"cfg": module(None, False), f"cfg + semantic guidance (window {window:g})": module(window, False),
                "cfg + semantic guidance (window 1)": module(1.0, False),
                f"SynFER row: cfg + guidance (window {window:g}) + layout start": module(window, True)}
    b = scale.sample_batch
    rng = torch.Generator().manual_seed(0)
    batch = {"id": [f"s{i}" for i in range(b)], "index": torch.arange(b), "label": torch.arange(b) % len(LABELS),
             "aus": torch.rand(b, len(gen.au_names), generator=rng), "caption": captions_for(0, b),
             "caption_source": ["templates"] * b, "seed": list(range(b))}
    autocast = torch.autocast(scale.device, dtype=scale.autocast_dtype) if scale.autocast_dtype else nullcontext()
    clock, rows = Clock(scale.device), {}
    for name, synth in variants.items():
        # synthesize runs predict in inference mode unless guidance differentiates (inference_mode=guidance is None)
        grad_mode = torch.inference_mode() if synth.guidance is None else torch.no_grad()
        reset_peak(scale.device)
        seconds = []
        for rep in range(scale.warmup_calls + scale.sample_reps):
            start = clock.now()
            with autocast, grad_mode:
                out = synth.predict_step(batch, 0)
            if rep >= scale.warmup_calls:
                seconds.append(clock.now() - start)
        if out["images"].shape[0] != b or len(out["records"]) != b:
            raise RuntimeError(f"sampling variant '{name}': predict_step returned {out['images'].shape[0]} images "
                               f"for a batch of {b}")
        rows[name] = {**timing(seconds, b), **peak_memory(scale.device),
                      "guided_steps": int(synth.sampler.last_stats.get("guided_steps", 0)),
                      "layout_start": synth.layout_paths is not None}
    base = rows["cfg"]["median_s"]
    for row in rows.values():
        row["time_vs_cfg"] = round(row["median_s"] / base, 3)
    return {"generator_experiment": "paper/generator/sd15_synfer (FAU adapter, random weights)",
            "synthesis_experiment": "paper/synthesize/synfer", "batch": b, "image_size": scale.image_size,
            "ddim_steps": scale.sample_steps, "text_scale": settings.text_scale, "au_scale": settings.au_scale,
            "guidance_scale": scale_g, "guidance_classifier": f"{backbone} (random weights)",
            "autocast": str(scale.autocast_dtype), "variants": rows}


# ---------------------------------------------------------------------------------------------- labeler

def phase_labeler(scale: Scale, sd: Path) -> dict[str, Any]:
    import torch

    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.labeler import PseudoLabelerModule

    cfg = compose_for(scale, "paper/labeler/feranno_affectnet", sd, ("labeler",), [f"labeler.unet_path={sd}"])
    module = PseudoLabelerModule(to_container(cfg), LABELS).to(scale.device)
    b = scale.labeler_batch
    images = torch.rand(b, 3, scale.image_size, scale.image_size, device=scale.device) * 2 - 1
    labels = torch.arange(b, device=scale.device) % len(LABELS)
    heads = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(heads, lr=float(cfg.optim.lr))
    autocast = torch.autocast(scale.device, dtype=scale.autocast_dtype) if scale.autocast_dtype else nullcontext()

    def forward() -> None:
        module.eval()
        with autocast, torch.inference_mode():
            module(images)

    def train_step() -> None:
        module.train()
        with autocast:
            loss = torch.nn.functional.cross_entropy(module(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock, rows = Clock(scale.device), {}
    for name, fn in {"forward (rectification)": forward, "training step (heads)": train_step}.items():
        reset_peak(scale.device)
        seconds = []
        for rep in range(scale.warmup_calls + scale.labeler_reps):
            start = clock.now()
            fn()
            if rep >= scale.warmup_calls:
                seconds.append(clock.now() - start)
        rows[name] = {**timing(seconds, b), **peak_memory(scale.device)}
    return {"experiment": "paper/labeler/feranno_affectnet", "batch": b, "image_size": scale.image_size,
            "timestep": int(cfg.labeler.t), "frozen_dtype": cfg.labeler.frozen_dtype,
            "head_params_m": round(sum(p.numel() for p in heads) / 1e6, 2), "variants": rows}


# ---------------------------------------------------------------------------------------------- report

def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({env['mode']}): {env.get('gpu') or 'CPU'}", "",
             f"{env['date_utc']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
             f"transformers {env['transformers']}, lightning {env['lightning']}; commit {env['commit']}"
             f"{' (dirty tree)' if env['working_tree_dirty'] else ''}; total {result['total_seconds']:.0f} s.", "",
             "SD 1.5 architecture with random weights (benchmarks/gpu/check.py); speed does not depend on the weights.",
             ""]

    def mem(row: dict) -> str:
        if row.get("peak_allocated_gib") is None:
            return f"RSS {row.get('process_peak_rss_gib')} GiB"
        return f"{row['peak_allocated_gib']} GiB ({row['peak_reserved_gib']} reserved)"

    f = result["phases"].get("finetune")
    if f and "skipped" not in f:
        lines += [f"## Fine-tune step ({f['experiment']}, batch {f['batch']}, {f['image_size']} px, "
                  f"{f['precision']})", "",
                  "| loop | s/step (median) | images/s | peak memory |", "|---|---|---|---|"]
        for name, key in (("GeneratorModule in Lightning", "generator_module"),
                          ("plain diffusers loop", "plain_diffusers_loop")):
            r = f[key]
            lines.append(f"| {name} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | {mem(r)} |")
        lines += ["", f"Throughput ratio ours / plain: **{f['throughput_ratio_ours_over_plain']:.3f}** "
                      f"({f['timed_steps']} timed steps after {f['warmup_steps']} warm-up; "
                      f"recipe {json.dumps(f['recipe'])}).", ""]
    s = result["phases"].get("sampling")
    if s and "skipped" not in s:
        lines += [f"## Sampling ({s['ddim_steps']} DDIM steps, CFG text {s['text_scale']:g} / AU {s['au_scale']:g}, "
                  f"batch {s['batch']}, {s['image_size']} px, guidance lambda {s['guidance_scale']:g}, "
                  f"classifier {s['guidance_classifier']})", "",
                  "| variant | images/s | time vs CFG | guided steps | peak memory |", "|---|---|---|---|---|"]
        for name, r in s["variants"].items():
            lines.append(f"| {name} | {r['images_per_s']:.3f} | {r['time_vs_cfg']:.2f}x | {r['guided_steps']} | "
                         f"{mem(r)} |")
        lines.append("")
    lab = result["phases"].get("labeler")
    if lab and "skipped" not in lab:
        lines += [f"## FERAnno labeler ({lab['experiment']}, batch {lab['batch']}, {lab['image_size']} px, "
                  f"t={lab['timestep']}, frozen {lab['frozen_dtype']})", "",
                  "| pass | images/s | peak memory |", "|---|---|---|"]
        for name, r in lab["variants"].items():
            lines.append(f"| {name} | {r['images_per_s']:.2f} | {mem(r)} |")
        lines.append("")
    skipped = {k: v["skipped"] for k, v in result["phases"].items() if "skipped" in v}
    if skipped:
        lines += ["## Not measured", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def default_out_dir() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "benchmarks" / "gpu" / "results" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run_check(scale: Scale, out: Path, phases: list[str], time_budget_s: float) -> dict[str, Any]:
    import torch

    from datamodules.atomic import atomic_write_json, atomic_write_text

    require_device(scale)
    if scale.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    result: dict[str, Any] = {"environment": environment(scale), "phases": {}}
    work = Path(tempfile.mkdtemp(prefix="synfer_gpu_check_"))
    try:
        sd = build_sd_folder(work / "sd15_random", scale)
        result["sd_folder_seconds"] = round(time.perf_counter() - start, 1)
        runners = {"finetune": lambda: phase_finetune(scale, sd), "sampling": lambda: phase_sampling(scale, sd, work),
                   "labeler": lambda: phase_labeler(scale, sd)}
        for name in phases:
            elapsed = time.perf_counter() - start
            if elapsed > time_budget_s:
                result["phases"][name] = {"skipped": f"time budget {time_budget_s:.0f} s spent "
                                                     f"({elapsed:.0f} s elapsed)"}
                continue
            phase_start = time.perf_counter()
            print(f"[gpu-check] {name} ...", flush=True)
            result["phases"][name] = {**runners[name](), "phase_seconds": round(time.perf_counter() - phase_start, 1)}
            reset_peak(scale.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "check.json", result)
    atomic_write_text(out / "check.md", markdown(result))
    return result


def dry_run(scale: Scale, phases: list[str]) -> int:
    print(f"[gpu-check] plan ({scale.name}, nothing runs): SD 1.5 folder from config dicts, random weights "
          f"(UNet {scale.unet['block_out_channels']}, VAE {scale.vae['block_out_channels']}, "
          f"CLIP text {scale.text['num_hidden_layers']} layers x {scale.text['hidden_size']})")
    plan = {"finetune": f"paper/generator/sd15_fetext: GeneratorModule in Lightning vs plain diffusers loop, batch "
                        f"{scale.train_batch} @ {scale.image_size} px, {scale.precision}, {scale.train_warmup} + "
                        f"{scale.train_steps} steps each",
            "sampling": f"paper/synthesize/synfer: {scale.sample_steps} DDIM steps with CFG, "
                        f"batch {scale.sample_batch}; "
                        f"without / with semantic guidance (window 0.3, 1) / + layout start; {scale.sample_reps} reps",
            "labeler": f"paper/labeler/feranno_affectnet: forward and heads' training step, "
                       f"batch {scale.labeler_batch}"}
    for name in phases:
        print(f"[gpu-check]   {name}: {plan[name]}")
    print("[gpu-check] the paper pipeline's stage graph (python run.py experiment=pipeline/paper --dry-run):",
          flush=True)
    return subprocess.call([sys.executable, str(REPO / "run.py"), "experiment=pipeline/paper", "--dry-run"], cwd=REPO)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code paths on CPU, tiny SD at 64 px, seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the paper pipeline's graph; run nothing")
    ap.add_argument("--out", type=Path, default=None,
                    help="result folder (default: $OUT, else benchmarks/gpu/results/<date>)")
    ap.add_argument("--phases", default="finetune,sampling,labeler", help="comma-separated subset, in this order")
    ap.add_argument("--time-budget-s", type=float, default=420.0,
                    help="no phase starts after this many seconds (check.sh kills the run at 480 s)")
    args = ap.parse_args(argv)
    scale = CPU_SMOKE if args.cpu_smoke else GPU
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in ("finetune", "sampling", "labeler")]
    if unknown:
        ap.error(f"--phases={args.phases}: unknown {unknown}; expected a subset of finetune,sampling,labeler")
    if args.dry_run:
        return dry_run(scale, phases)
    out = args.out or default_out_dir()
    try:
        result = run_check(scale, out, phases, args.time_budget_s)
    except NoCudaDevice as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(f"[gpu-check] wrote {out / 'check.json'} and {out / 'check.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
