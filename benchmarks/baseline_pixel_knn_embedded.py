#!/usr/bin/env python
"""Reference point for the SSL proof (docs/BENCHMARKS.md): a weighted kNN on raw pixels of the embedded faces.

The same protocol as the online kNN of the SSL base (k=20, cosine similarity, votes weighted by exp(sim/T)),
bank = the embedded train split, queries = val; features are the flattened pixels, raw and per-image centred.
A learnt representation that scores below this carries less expression information than the pixels do.

    .venv/bin/python benchmarks/baseline_pixel_knn_embedded.py [--size 32] [--train 4000] [--val 800]
"""
import argparse

import numpy as np
import torch

from datamodules.procedural.dataset import render_split
from lightning_synfer.metrics.knn import WeightedKNN


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                 num_classes: int, k: int, temperature: float) -> float:
    metric = WeightedKNN(num_classes, k, temperature)
    metric.update(train_features=torch.from_numpy(bank), train_targets=torch.from_numpy(bank_labels),
                  test_features=torch.from_numpy(queries), test_targets=torch.from_numpy(query_labels))
    return float(metric.compute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=800)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.07)
    args = ap.parse_args()
    train = render_split("train", args.train, size=args.size, channels=1, seed=0)
    val = render_split("val", args.val, size=args.size, channels=1, seed=0)
    flat = lambda s: s.images.reshape(len(s.images), -1).astype(np.float32) / 255.0  # noqa: E731
    for name, fn in (("raw pixels", lambda x: x), ("centred pixels", lambda x: x - x.mean(1, keepdims=True))):
        acc = knn_accuracy(fn(flat(train)), train.labels, fn(flat(val)), val.labels, len(train.class_names),
                           args.k, args.temperature)
        print(f"{name}: kNN accuracy {100 * acc:.2f}% ({args.train} bank / {args.val} queries, {args.size} px, "
              f"k={args.k}, T={args.temperature}; chance {100 / len(train.class_names):.1f}%)")


if __name__ == "__main__":
    main()
