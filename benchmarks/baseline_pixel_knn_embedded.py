#!/usr/bin/env python
"""Reference points for the SSL proof (docs/BENCHMARKS.md): a weighted kNN and a linear probe on raw pixels.

kNN: the same protocol as the online kNN of the SSL base (k=20, cosine similarity, votes weighted by
exp(sim/T)), bank = the embedded train split, queries = val; features are the flattened pixels, raw and
per-image centred. Linear probe: softmax regression on standardised pixels (train split; full-batch Adam,
L2 weight decay), scored on the test split of unseen identities, the split the offline SSL probes report.
A learnt representation that scores below these carries less expression information than the pixels do.

    .venv/bin/python benchmarks/baseline_pixel_knn_embedded.py [--size 32] [--train 4000] [--val 800] [--test 800]
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


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          num_classes: int, weight_decay: float, steps: int = 500, seed: int = 0) -> float:
    torch.manual_seed(seed)
    xtr, xte = torch.from_numpy(train_x), torch.from_numpy(test_x)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr = torch.from_numpy(train_y)
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + weight_decay * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(xte).argmax(1).numpy() == test_y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=800)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--test", type=int, default=800)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train = render_split("train", args.train, size=args.size, channels=1, seed=0)
    val = render_split("val", args.val, size=args.size, channels=1, seed=0)
    flat = lambda s: s.images.reshape(len(s.images), -1).astype(np.float32) / 255.0  # noqa: E731
    for name, fn in (("raw pixels", lambda x: x), ("centred pixels", lambda x: x - x.mean(1, keepdims=True))):
        acc = knn_accuracy(fn(flat(train)), train.labels, fn(flat(val)), val.labels, len(train.class_names),
                           args.k, args.temperature)
        print(f"{name}: kNN accuracy {100 * acc:.2f}% ({args.train} bank / {args.val} queries, {args.size} px, "
              f"k={args.k}, T={args.temperature}; chance {100 / len(train.class_names):.1f}%)")
    test = render_split("test", args.test, size=args.size, channels=1, seed=0)
    acc = linear_probe_accuracy(flat(train), train.labels, flat(test), test.labels, len(train.class_names),
                                args.weight_decay)
    print(f"standardised pixels: linear probe accuracy {100 * acc:.2f}% (train {args.train} -> test {args.test} "
          f"of unseen identities, {args.size} px, weight decay {args.weight_decay})")


if __name__ == "__main__":
    main()
