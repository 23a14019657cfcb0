"""Generation quality: does the judge see the intended expression, are the AUs right, how close to real faces.

- FER accuracy of a judge classifier's prediction vs the label each image was generated for (overall,
  per class, confusion matrix);
- AU error when the judge has an AU-regression head (`model.au_head=true`): MAE and accuracy of
  "active" (> threshold) over the AUs judge and dataset share;
- FID and KID (torchmetrics) against real faces, with features from a classifier backbone by default
  (`BackboneFeatures`, passed as torchmetrics' `feature=`), or Inception when its weights are local.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.labels import canonical_name


def prepare(clf: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """What ImageClassifier does before its module: channels, size, normalisation (images in [0, 1])."""
    x = images01.float()
    if x.shape[1] != clf.channels:
        x = x.mean(1, keepdim=True) if clf.channels == 1 else x.expand(-1, 3, -1, -1)
    if x.shape[-1] != clf.size or x.shape[-2] != clf.size:
        x = F.interpolate(x, size=(clf.size, clf.size), mode="bilinear", align_corners=False, antialias=True)
    return (x - clf.mean.to(x)) / clf.std.to(x)


class BackboneFeatures(nn.Module):
    """images in [0, 1] -> pooled backbone features of a FER classifier (torchmetrics FID/KID `feature=`)."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf.eval().requires_grad_(False)
        module = clf.module
        self._features = module.features if hasattr(module, "features") else module.backbone
        backbone = getattr(module, "backbone", None)
        n = getattr(backbone, "num_features", None)
        if n is None:
            with torch.no_grad():
                n = self._features(prepare(clf, torch.rand(1, clf.channels, clf.size, clf.size))).shape[-1]
        self.num_features = int(n)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.dtype == torch.uint8:  # torchmetrics' dummy input path
            images01 = images01.float() / 255
        return self._features(prepare(self.clf, images01)).flatten(1).double()


def label_index_map(source: Sequence[str], target: Sequence[str]) -> list[int]:
    canon = [canonical_name(n) for n in target]
    return [canon.index(canonical_name(n)) if canonical_name(n) in canon else -1 for n in source]


def au_index_pairs(source: Sequence[str], target: Sequence[str]) -> list[tuple[int, int]]:
    """(dataset index, judge index) of every AU both lists name (any spelling: AU01 == AU1)."""
    from datamodules.au_vocabulary import canonical_au

    where = {canonical_au(n): i for i, n in enumerate(target)}
    return [(i, where[canonical_au(n)]) for i, n in enumerate(source) if canonical_au(n) in where]


class GenerationJudge:
    """Accumulates the judge's verdicts on batches of generated images (labels in the judge's space)."""

    def __init__(self, clf: nn.Module, label_names: Sequence[str], au_pairs: Optional[list[tuple[int, int]]] = None,
                 au_threshold: float = 0.5) -> None:
        self.clf = clf
        self.label_names = list(label_names)
        k = len(self.label_names)
        self.confusion = torch.zeros(k, k, dtype=torch.long)
        self.au_pairs = au_pairs or []
        self.au_threshold = au_threshold
        self.au_abs_sum = torch.zeros(len(self.au_pairs), dtype=torch.float64)
        self.au_hits = torch.zeros(len(self.au_pairs), dtype=torch.float64)
        self.au_count = 0

    @torch.no_grad()
    def update(self, images01: torch.Tensor, labels: torch.Tensor, aus: Optional[torch.Tensor] = None) -> None:
        logits = self.clf(images01)
        preds = logits.argmax(-1).cpu()
        k = len(self.label_names)
        self.confusion += torch.bincount(labels.cpu() * k + preds, minlength=k * k).view(k, k)
        module = self.clf.module
        if self.au_pairs and aus is not None and getattr(module, "au_head", None) is not None:
            pred = module.predict_aus(prepare(self.clf, images01)).double().cpu()
            src = torch.tensor([s for s, _ in self.au_pairs])
            dst = torch.tensor([d for _, d in self.au_pairs])
            target, guess = aus.double().cpu()[:, src], pred[:, dst]
            self.au_abs_sum += (guess - target).abs().sum(0)
            self.au_hits += ((guess > self.au_threshold) == (target > self.au_threshold)).double().sum(0)
            self.au_count += len(aus)

    def report(self, au_names: Sequence[str] = ()) -> dict[str, Any]:
        cm = self.confusion
        total = int(cm.sum())
        per_class = {}
        for i, name in enumerate(self.label_names):
            n = int(cm[i].sum())
            per_class[name] = {"count": n, "accuracy": float(cm[i, i]) / n if n else None}
        out: dict[str, Any] = {
            "num_images": total,
            "fer_accuracy": float(cm.diag().sum()) / total if total else None,
            "per_class": per_class,
            "per_class_counts": {k: v["count"] for k, v in per_class.items()},
            "confusion_matrix": cm.tolist(),
            "label_names": self.label_names,
        }
        if self.au_count:
            mae = self.au_abs_sum / self.au_count
            acc = self.au_hits / self.au_count
            names = [au_names[s] if au_names else str(s) for s, _ in self.au_pairs]
            out["au"] = {"mae": float(mae.mean()), "accuracy": float(acc.mean()), "threshold": self.au_threshold,
                         "num_images": self.au_count, "per_au_mae": dict(zip(names, mae.tolist())),
                         "per_au_accuracy": dict(zip(names, acc.tolist()))}
        return out


def build_fid_kid(feature: nn.Module | int, kid_subset_size: int, *, inception_weights: Optional[str] = None):
    """(FID, KID) torchmetrics objects on [0, 1] float images."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    kwargs: dict[str, Any] = {"normalize": True}
    if isinstance(feature, int):
        kwargs["feature_extractor_weights_path"] = inception_weights
    fid = FrechetInceptionDistance(feature=feature, **kwargs)
    kid = KernelInceptionDistance(feature=feature, subset_size=kid_subset_size, **kwargs)
    return fid, kid


def finite_or_none(value: Any) -> Optional[float]:
    v = float(value)
    return v if math.isfinite(v) else None
