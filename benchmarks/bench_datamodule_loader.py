"""The mixing DataModule's train loader against a plain shuffled DataLoader over the same images.

Both read the same FERDataset objects (decode + face augmentation) with the same batch size and workers;
the only difference is the MixingBatchSampler + ResumableDataLoader. Real data: FER2013 JPEGs when
../shared/data/fer2013 exists, else the embedded faces; the synthetic side is an embedded stand-in (ratio 0.25).
Repeats alternate (mixing, plain, plain, mixing, ...) in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_datamodule_loader.py [--batches 40] [--repeats 4] [--workers 0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from torch.utils.data import ConcatDataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.datamodule import FERDataModule  # noqa: E402
from lightning_synfer.config import compose  # noqa: E402


def timed(loader, batches: int) -> float:
    start = time.perf_counter()
    for i, _ in enumerate(loader, 1):
        if i == batches:
            break
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    fer = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
    common = [f"data.num_workers={args.workers}", "data.persistent_workers=false", "data.batch_size=64",
              "data.synthetic={format: embedded, split: train, num_images: 4000, seed: 1000}",
              "data.mix.synthetic_ratio=0.25", "data.val=null", "data.test=null"]
    if fer.is_dir():
        cfg = compose("supervised/fer2013_resnet18", [f"paths.fer2013={fer}", "data.num_classes=7", *common])
        source = "FER2013 train JPEGs"
    else:
        cfg = compose("supervised/embedded", common)
        source = "embedded faces"
    dm = FERDataModule(cfg)
    dm.setup("fit")
    mixing = dm.train_dataloader()
    plain = DataLoader(ConcatDataset([dm.datasets["train"], dm.datasets["synthetic"]]), batch_size=64, shuffle=True,
                       num_workers=args.workers, drop_last=True)
    times = {"mixing": [], "plain": []}
    timed(plain, 5)
    for r in range(args.repeats):
        for name in (("mixing", "plain") if r % 2 == 0 else ("plain", "mixing")):
            times[name].append(timed(mixing if name == "mixing" else plain, args.batches))
    m, p = statistics.median(times["mixing"]), statistics.median(times["plain"])
    images = args.batches * 64
    print(f"{source}, ratio 0.25, batch 64, {args.workers} workers, {args.batches} batches x {args.repeats}")
    print(f"  mixing DataModule loader: {images / m:.1f} img/s   plain DataLoader: {images / p:.1f} img/s")
    print(f"  throughput ratio mixing/plain = {p / m:.3f}")


if __name__ == "__main__":
    main()
