"""Supervised training throughput: our LightningModule under the Trainer vs a plain PyTorch loop.

Same model (SupervisedFER's backbone + head), same in-memory batches, same optimizer; the two are run
interleaved in one process so that machine load affects both alike. Prints images/s and the ratio.

    .venv/bin/python benchmarks/bench_supervised.py [--steps 30] [--repeats 3] [--size 48] [--batch 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_synfer.config import compose, to_container  # noqa: E402
from lightning_synfer.modules.supervised import SupervisedFER  # noqa: E402


class Batches(Dataset):
    """Pre-built batch dicts: measures the training step, not data loading."""

    def __init__(self, n: int, batch: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            label = torch.randint(0, classes, (batch,), generator=g)
            self.items.append({"image": torch.randn(batch, 1, size, size, generator=g), "label": label,
                               "label_soft": torch.nn.functional.one_hot(label, classes).float(),
                               "domain": torch.zeros(batch, dtype=torch.long)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def lightning_run(cfg, data: Batches) -> float:
    module = SupervisedFER(to_container(cfg), label_names=[str(i) for i in range(cfg.data.num_classes)])
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-3)  # same as plain
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(data, batch_size=None, shuffle=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - start


def plain_run(cfg, data: Batches) -> float:
    module = SupervisedFER(to_container(cfg), label_names=[str(i) for i in range(cfg.data.num_classes)])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    loss_fn = module.criterion
    module.train()
    start = time.perf_counter()
    for batch in DataLoader(data, batch_size=None, shuffle=False):
        loss = loss_fn(module(batch["image"]), batch["label_soft"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    cfg = compose("supervised/fer2013_resnet18", [f"data.image_size={args.size}", f"data.batch_size={args.batch}"])
    data = Batches(args.steps, args.batch, args.size, cfg.data.num_classes)
    plain_run(cfg, data)  # warm-up (allocator, kernels)
    times = {"lightning": [], "plain": []}
    for r in range(args.repeats):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
        for name in order:
            times[name].append((lightning_run if name == "lightning" else plain_run)(cfg, data))
    images = args.steps * args.batch
    lt, pt = statistics.median(times["lightning"]), statistics.median(times["plain"])
    print(f"supervised resnet18 {args.size}px batch {args.batch}, {args.steps} steps x {args.repeats} repeats")
    print(f"  lightning: {images / lt:.1f} img/s   plain loop: {images / pt:.1f} img/s")
    print(f"  throughput ratio lightning/plain = {pt / lt:.3f}  (overhead {100 * (lt / pt - 1):.1f}%)")


if __name__ == "__main__":
    main()
