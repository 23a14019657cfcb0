"""Procedural renderer throughput on one CPU core: images/s at 32, 48 and 64 px.

    python benchmarks/bench_renderer.py [--images 1000] [--channels 3]

Pins the process to one core (where the OS allows) and reports CPU-time throughput, which is
stable on a shared machine, next to wall-clock throughput. Prints a Markdown table row per size.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datamodules.labels import CANONICAL_8  # noqa: E402
from datamodules.procedural.aus import sample_aus  # noqa: E402
from datamodules.procedural.renderer import SUPERSAMPLE, render_face, sample_identity  # noqa: E402


def bench(size: int, num_images: int, channels: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    people = [sample_identity(rng, seed=i) for i in range(64)]
    aus = [sample_aus(CANONICAL_8[i % 8], rng) for i in range(num_images)]
    for i in range(20):  # warm-up: caches, lazy imports
        render_face(people[i % 64], aus[i], size=size, channels=channels, rng=rng)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num_images):
        render_face(people[i % 64], aus[i], size=size, channels=channels, rng=rng)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return num_images / cpu, num_images / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images rendered per size")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    print(f"# renderer: {args.images} images per size, channels={args.channels}, supersample={SUPERSAMPLE}x, "
          f"one core, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| size | images/s (CPU time, 1 core) | images/s (wall) |")
    print("|---|---|---|")
    for size in (32, 48, 64):
        cpu_rate, wall_rate = bench(size, args.images, args.channels)
        print(f"| {size}x{size} | {cpu_rate:.0f} | {wall_rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
