"""Sampling throughput: our DDIMSampler vs a stock diffusers DDIMPipeline-style loop, and the cost of
classifier-free and semantic guidance.

    python benchmarks/bench_sampling.py [--steps 20 --batch 16 --reps 5 --threads 1 --size 32 --device cpu]

Same UNet (the tiny GeneratorModule of generator/embedded, random weights: speed does not depend on them),
same DDIMScheduler, same steps. Ours and stock run interleaved in one process (rep by rep), medians reported.
"plain" is ours with text_scale=au_scale=1 (one UNet pass per step, as in the stock loop); "cfg" batches the
three passes (uncond, text, text+AU) into one UNet call; "sg" adds semantic guidance in the last 30% / 100%
of the steps with a FER classifier (resnet18 at the image size).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(size: int):
    from datamodules.labels import CANONICAL_8
    from lightning_synfer.config import compose
    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/embedded", [f"data.image_size={size}", "generator.text_encoder=tiny"])
    torch.manual_seed(0)
    gen = GeneratorModule(config=to_container(cfg), label_names=list(CANONICAL_8)).eval()
    return gen


def classifier(size: int):
    from datamodules.labels import CANONICAL_8
    from datamodules.procedural.aus import AU_NAMES
    from lightning_synfer.checkpoints import ImageClassifier
    from lightning_synfer.config import compose
    from lightning_synfer.config.compose import to_container
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("supervised/embedded", [f"data.image_size={size}", "data.channels=1"])
    return ImageClassifier(SupervisedFER(config=to_container(cfg), label_names=list(CANONICAL_8),
                                         au_names=list(AU_NAMES))).eval()


def stock_loop(gen, hidden, seeds, steps, device):
    """diffusers DDIMPipeline.__call__, with encoder_hidden_states for a conditional UNet."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = DDIMScheduler.from_config(gen.noise_scheduler.config)
    shape = gen.sample_shape(len(seeds))
    image = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seeds[0]), device=device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_output = gen.unet(image, t, encoder_hidden_states=hidden).sample
        image = scheduler.step(model_output, t, image, eta=0.0).prev_sample
    return (image / 2 + 0.5).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPU boxes: 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-sg", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_synfer.sampling import DDIMSampler, SamplerSettings, SemanticGuidance

    device = torch.device(args.device)
    gen = build(args.size).to(device)
    n, steps = args.batch, args.steps
    captions = [f"a close-up photo of a face looking {w}" for w in ("happy", "sad", "angry", "calm")] * (n // 4 + 1)
    captions = captions[:n]
    aus = torch.rand(n, len(gen.au_names), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % len(gen.label_names)
    seeds = list(range(n))
    # EMA swap is a per-call parameter copy, not sampling: off on both sides.
    plain = DDIMSampler(gen, SamplerSettings(steps=steps, text_scale=1.0, au_scale=1.0, use_ema=False))
    cfg = DDIMSampler(gen, SamplerSettings(steps=steps, text_scale=3.0, au_scale=2.0, use_ema=False))
    with torch.no_grad():
        hidden = gen.conditioning(gen.encode_text(captions), gen.encode_aus(aus.to(device)))
    runs = {
        "ours_plain": lambda: plain.sample(captions, aus, seeds),
        "stock_ddim_loop": lambda: torch.no_grad()(stock_loop)(gen, hidden, seeds, steps, device),
        "ours_cfg_text+au": lambda: cfg.sample(captions, aus, seeds),
    }
    if not args.no_sg:
        clf = classifier(args.size).to(device)
        for window in (0.3, 1.0):
            sg = DDIMSampler(gen, SamplerSettings(steps=steps, text_scale=3.0, au_scale=2.0, use_ema=False),
                             guidance=SemanticGuidance(clf, 0.05, window, gen.label_names))
            runs[f"ours_cfg+sg_window{window}"] = (lambda s=sg: s.sample(captions, aus, seeds, labels=labels))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved: load changes on a shared box hit every variant alike
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} threads={args.threads} batch={n} steps={steps} size={args.size} reps={args.reps}")
    print(f"{'variant':<26}{'median s':>10}{'images/s':>10}{'vs stock':>10}")
    for k, v in med.items():
        print(f"{k:<26}{v:>10.3f}{n / v:>10.2f}{med['stock_ddim_loop'] / v:>9.3f}x")
    print(f"ours_plain / stock throughput ratio: {med['stock_ddim_loop'] / med['ours_plain']:.3f} (target >= 0.95)")
    if not args.no_sg:
        for w in (0.3, 1.0):
            extra = med[f"ours_cfg+sg_window{w}"] / med["ours_cfg_text+au"] - 1
            print(f"semantic guidance window {w}: +{100 * extra:.1f}% time over CFG sampling")


if __name__ == "__main__":
    main()
