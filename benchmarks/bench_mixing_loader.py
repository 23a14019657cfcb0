"""Throughput of a DataLoader driven by MixingBatchSampler vs a plain shuffled DataLoader.

Both loaders read the same in-memory ConcatDataset([real, synthetic]) of uint8 face crops through the same
per-item training transform, for the same number of batches. Repeats are interleaved (mixing, plain, plain,
mixing, ...) in one process so drift in machine load hits both sides alike; the report is the median time ratio.

    python benchmarks/bench_mixing_loader.py [--repeats 6] [--batches 30] [--num-workers 0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.mixing import MixingBatchSampler, ResumableDataLoader  # noqa: E402


class InMemoryFaces(Dataset):
    """Pre-decoded uint8 crops plus labels, so the benchmark measures sampling + transform, not disk reads."""

    def __init__(self, num_images: int, image_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8,
                                    generator=generator)
        self.labels = torch.randint(0, 7, (num_images,), generator=generator)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def time_batches(loader: DataLoader, num_batches: int) -> float:
    start = time.perf_counter()
    for seen, _ in enumerate(loader, start=1):
        if seen == num_batches:
            break
    return time.perf_counter() - start


def time_sampler_only(sampler: MixingBatchSampler, epochs: int = 3) -> float:
    """Seconds per batch spent inside the sampler itself (index bookkeeping, no data)."""
    start = time.perf_counter()
    batches = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches += sum(1 for _ in sampler)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-real", type=int, default=3000)
    parser.add_argument("--num-synthetic", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--synthetic-ratio", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=30, help="batches timed per repeat and loader")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-item transforms are tiny; thread fan-out only adds noise

    dataset = ConcatDataset([InMemoryFaces(args.num_real, args.image_size, seed=0),
                             InMemoryFaces(args.num_synthetic, args.image_size, seed=1)])
    sampler = MixingBatchSampler(args.num_real, args.num_synthetic, global_batch_size=args.batch_size,
                                 synthetic_ratio=args.synthetic_ratio, seed=0)
    if len(sampler) < args.batches:
        parser.error(f"--batches={args.batches} exceeds the mixing epoch ({len(sampler)} batches)")
    worker_options = dict(num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    mixing_loader = ResumableDataLoader(dataset, batch_sampler=sampler, **worker_options)
    plain_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(0), **worker_options)

    # Warm-up: first iterations pay for worker start-up and allocator growth.
    time_batches(mixing_loader, 3)
    time_batches(plain_loader, 3)

    mixing_times, plain_times = [], []
    for repeat in range(args.repeats):
        sampler.set_epoch(repeat)
        # Alternate which loader goes first (ABBA...) so neither always runs on a warmer/colder machine.
        if repeat % 2 == 0:
            mixing_times.append(time_batches(mixing_loader, args.batches))
            plain_times.append(time_batches(plain_loader, args.batches))
        else:
            plain_times.append(time_batches(plain_loader, args.batches))
            mixing_times.append(time_batches(mixing_loader, args.batches))

    samples = args.batches * args.batch_size
    mixing_median, plain_median = statistics.median(mixing_times), statistics.median(plain_times)
    sampler_cost = time_sampler_only(MixingBatchSampler(
        args.num_real, args.num_synthetic, global_batch_size=args.batch_size,
        synthetic_ratio=args.synthetic_ratio, seed=0))
    print(f"config: {args.num_real} real + {args.num_synthetic} synthetic, {args.image_size}px, "
          f"batch {args.batch_size}, ratio {args.synthetic_ratio}, workers {args.num_workers}, "
          f"{args.repeats} interleaved repeats x {args.batches} batches")
    print(f"mixing loader : median {mixing_median:.3f}s  ({samples / mixing_median:,.0f} samples/s)  "
          f"runs {[round(t, 3) for t in mixing_times]}")
    print(f"plain shuffled: median {plain_median:.3f}s  ({samples / plain_median:,.0f} samples/s)  "
          f"runs {[round(t, 3) for t in plain_times]}")
    print(f"sampler alone : {sampler_cost * 1e6:.0f} us per batch")
    print(f"ratio mixing/plain time: {mixing_median / plain_median:.3f}")


if __name__ == "__main__":
    main()
