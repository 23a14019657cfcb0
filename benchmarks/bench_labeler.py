"""Pseudo-labeler throughput: feature extraction (one instrumented UNet pass) and the full labeler, against a
plain forward of the same UNet architecture without hooks or attention-keeping processors.

    python benchmarks/bench_labeler.py [--profile tiny|generator|sd] [--batch 32 --reps 5 --threads 1 --device cpu]

Profiles (random weights: speed does not depend on them):
    tiny       labeler/embedded as shipped: the random tiny UNet (16/32, cross-attention at both levels), 32 px gray
    generator  the tiny generator of generator/embedded (16/32/64, cross-attention at 8x8, FAU adapter), 32 px gray
    sd         Stable Diffusion 1.5's UNet + VAE encoder shapes, 77 caption tokens, --size px RGB (use a GPU)

Rows: "unet" = VAE encode (latent models) + a plain UNet forward, i.e. the same work without read-out;
"features" = labeler.diffusion_features (VAE encode, noise, instrumented UNet, maps reshaped); "labeler" =
features + token branches + fusion + head (eval, no grad); "train step" = labeler forward + backward of the heads. Variants run interleaved rep by rep, medians reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def build(profile: str, size: int):
    from datamodules.labels import CANONICAL_8
    from lightning_synfer.config import compose
    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.labeler import PseudoLabelerModule

    torch.manual_seed(0)
    if profile == "tiny":
        cfg = compose("labeler/embedded", [f"data.image_size={size}"])
        return PseudoLabelerModule(to_container(cfg), list(CANONICAL_8)), 1
    if profile == "generator":
        from lightning_synfer.modules.generator import GeneratorModule

        gcfg = compose("generator/embedded", [f"data.image_size={size}", "generator.text_encoder=tiny",
                                              "generator.ema=false"])
        folder = Path(tempfile.mkdtemp()) / "export"
        GeneratorModule(config=to_container(gcfg), label_names=list(CANONICAL_8)).save_pretrained(folder)
        cfg = compose("labeler/embedded", [f"data.image_size={size}", f"labeler.unet_path={folder}"])
        return PseudoLabelerModule(to_container(cfg), list(CANONICAL_8)), 1
    # sd: rebuild from a frozen_spec, the way a checkpoint is loaded: no SD folder needed.
    spec = {"source": "sd", "path": None, "unet_config": {"_class_name": "UNet2DConditionModel", **SD15_UNET},
            "vae_config": {"_class_name": "AutoencoderKL", **SD15_VAE}, "au": None, "alpha_bar": 0.9985,
            "cond_shape": [77, 768]}
    cfg = compose("labeler/embedded", [f"data.image_size={size}", "data.channels=3", "labeler.dim=256",
                                       "labeler.heads=8", "labeler.attn_tokens=16"])
    return PseudoLabelerModule(to_container(cfg), list(CANONICAL_8), frozen_spec=spec), 3


def plain_unet(module):
    """The same UNet architecture without the labeler's hooks and processors (AU processors re-installed)."""
    from diffusers import UNet2DConditionModel

    from lightning_synfer.models.au_adapter import install_au_processors

    unet = UNet2DConditionModel.from_config(module.extractor.unet.config)
    if module.frozen_spec.get("au"):
        install_au_processors(unet, int(module.frozen_spec["au"]["num_tokens"]))
    return unet.eval().to(module.frozen_dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=("tiny", "generator", "sd"), default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="image size (default 32; sd: 512)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="frozen UNet/VAE dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size or (512 if args.profile == "sd" else 32)
    module, channels = build(args.profile, size)
    from lightning_synfer.modules.labeler import DTYPES

    if args.dtype != "fp32":
        module.frozen_dtype = DTYPES[args.dtype]
        module.extractor.to(module.frozen_dtype)
        if module.latent_encoder is not None:
            module.latent_encoder.to(module.frozen_dtype)
    device = torch.device(args.device)
    module = module.to(device).eval()
    plain = plain_unet(module).to(device)
    images = (torch.rand(args.batch, channels, size, size, device=device) * 2 - 1)
    with torch.no_grad():
        x0 = module.model_input(images)
    cond = module.conditioning.to(device, x0.dtype).unsqueeze(0).expand(args.batch, -1, -1)
    t = torch.full((args.batch,), int(module.lab.t), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_unet():
        with torch.no_grad():
            plain(module.model_input(images), t, encoder_hidden_states=cond)  # VAE encode + plain UNet

    def run_features():
        with torch.no_grad():
            module.diffusion_features(images)

    def run_labeler():
        with torch.no_grad():
            module(images)

    def run_train():
        module.train()
        module(images).logsumexp(-1).mean().backward()
        module.zero_grad(set_to_none=True)
        module.eval()

    variants = {"unet (plain, no read-out)": run_unet, "features (labeler read-out)": run_features,
                "labeler forward": run_labeler, "train step (heads)": run_train}
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    print(f"profile={args.profile} size={size} batch={args.batch} reps={args.reps} threads={args.threads} "
          f"device={args.device} dtype={args.dtype}; frozen {frozen / 1e6:.2f}M params, heads {trainable / 1e6:.2f}M; "
          f"{len(module.extractor.attention_layers)} cross-attention layers, "
          f"{len(module.extractor.scale_channels)} scales")
    base = statistics.median(times["unet (plain, no read-out)"])
    print("| variant | images/s | time vs plain UNet |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = args.batch / med
        shown = f"{rate:.1f}" if rate >= 10 else f"{rate:.3f}"
        print(f"| {name} | {shown} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
