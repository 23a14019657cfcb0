"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO / solo-learn protocol).

Each test feature votes with its k most cosine-similar bank (train) features; neighbour j adds
exp(sim_j / T) to the score of its class. Features and targets are torchmetrics "cat" states, so under
DDP every rank sees the whole bank and all test features at `compute()`.

    knn = WeightedKNN(num_classes=8, k=20, temperature=0.07)
    knn.update(train_features=f_bank, train_targets=y_bank)   # any number of calls, any order
    knn.update(test_features=f_val, test_targets=y_val)
    knn.compute()                                              # top-1 accuracy
    preds, targets = knn.predictions()                         # for confusion matrices / reports
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.utilities import dim_zero_cat


class WeightedKNN(torchmetrics.Metric):
    full_state_update = False

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"ssl.knn.k={k}: expected at least 1 neighbour")
        if temperature <= 0:
            raise ValueError(f"ssl.knn.temperature={temperature}: expected a value > 0")
        self.num_classes = num_classes
        self.k = k
        self.temperature = temperature
        self.chunk_size = chunk_size  # test features per similarity block (bounds memory: chunk x bank)
        for name in ("train_features", "train_targets", "test_features", "test_targets"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, train_features: Optional[torch.Tensor] = None, train_targets: Optional[torch.Tensor] = None,
               test_features: Optional[torch.Tensor] = None, test_targets: Optional[torch.Tensor] = None) -> None:
        if (train_features is None) != (train_targets is None) or (test_features is None) != (test_targets is None):
            raise ValueError("WeightedKNN.update: pass features together with their targets")
        # Normalise once here: compute() is then a plain matrix product (cosine similarity).
        if train_features is not None:
            self.train_features.append(F.normalize(train_features.detach().float(), dim=1))
            self.train_targets.append(train_targets.detach().long())
        if test_features is not None:
            self.test_features.append(F.normalize(test_features.detach().float(), dim=1))
            self.test_targets.append(test_targets.detach().long())

    @torch.no_grad()
    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted class, target) for every test feature seen so far on every rank."""
        # len(): states are lists locally and concatenated tensors after a DDP sync
        if len(self.train_features) == 0 or len(self.test_features) == 0:
            raise ValueError("WeightedKNN: needs both a bank (train_features) and test_features before compute()")
        bank = dim_zero_cat(self.train_features)
        bank_targets = dim_zero_cat(self.train_targets)
        test = dim_zero_cat(self.test_features)
        test_targets = dim_zero_cat(self.test_targets)
        k = min(self.k, bank.shape[0])
        preds = []
        for start in range(0, test.shape[0], self.chunk_size):
            sim = test[start:start + self.chunk_size] @ bank.T  # (chunk, bank): cosine similarity
            top_sim, top_idx = sim.topk(k, dim=1)
            weights = (top_sim / self.temperature).exp()
            votes = torch.zeros(sim.shape[0], self.num_classes, device=sim.device, dtype=weights.dtype)
            votes.scatter_add_(1, bank_targets[top_idx], weights)
            preds.append(votes.argmax(1))
        return torch.cat(preds), test_targets

    def compute(self) -> torch.Tensor:
        preds, targets = self.predictions()
        return (preds == targets).float().mean()
