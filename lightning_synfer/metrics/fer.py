"""FER metrics: accuracy, macro-F1, per-class recall and the confusion matrix, one report format.

`evaluate`, the probes and the pipeline all write `FERReport.as_dict()` into metrics.json.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torchmetrics
from torchmetrics.classification import MulticlassConfusionMatrix


class FERMetrics(torchmetrics.Metric):
    """Accumulates a confusion matrix (synced across ranks) and derives every FER number from it."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() == 2:
            preds = preds.argmax(-1)
        self.confusion.update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:
        return summarize_confusion(self.confusion.compute())

    def reset(self) -> None:
        super().reset()
        self.confusion.reset()


def summarize_confusion(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """cm[i, j] = count of true class i predicted as j."""
    cm = cm.double()
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = cm.diag()
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.nan)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where((precision + recall.nan_to_num(0)) > 0,
                     2 * precision * recall.nan_to_num(0) / (precision + recall.nan_to_num(0)).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0  # macro averages over the classes the data actually has
    total = cm.sum()
    return {
        "acc": tp.sum() / total.clamp(min=1),
        "macro_f1": f1[present].mean() if present.any() else torch.tensor(0.0),
        "mean_recall": recall[present].mean() if present.any() else torch.tensor(0.0),
        "recall": recall,
        "confusion": cm,
    }


def _per_class_recall(summary: dict[str, torch.Tensor], label_names: Sequence[str]) -> dict[str, Optional[float]]:
    return {n: (None if r != r else float(r)) for n, r in zip(label_names, summary["recall"].tolist())}


def report(summary: dict[str, Any], label_names: Sequence[str], *, num_images: Optional[int] = None,
           extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The metrics.json format shared by evaluate, linear, knn, finetune and the pipeline.

    `summary` may carry "per_domain": {"real"|"synthetic": summary} (the classifier modules' test summary);
    the report then holds accuracy, macro-F1, per-class recall and the image count of each domain present.
    """
    out: dict[str, Any] = {
        "accuracy": float(summary["acc"]),
        "macro_f1": float(summary["macro_f1"]),
        "mean_class_recall": float(summary["mean_recall"]),
        "per_class_recall": _per_class_recall(summary, label_names),
        "confusion_matrix": [[int(v) for v in row] for row in summary["confusion"].tolist()],
        "label_names": list(label_names),
        "num_images": int(num_images if num_images is not None else summary["confusion"].sum()),
    }
    if summary.get("per_domain"):
        out["per_domain"] = {
            name: {"accuracy": float(s["acc"]), "macro_f1": float(s["macro_f1"]),
                   "per_class_recall": _per_class_recall(s, label_names), "num_images": int(s["confusion"].sum())}
            for name, s in summary["per_domain"].items()}
    if extra:
        out.update(extra)
    return out


def format_table(metrics: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|",
             f"| accuracy | {100 * metrics['accuracy']:.2f} |",
             f"| macro-F1 | {100 * metrics['macro_f1']:.2f} |",
             f"| mean class recall | {100 * metrics['mean_class_recall']:.2f} |"]
    for name, r in metrics["per_class_recall"].items():
        lines.append(f"| recall {name} | {'n/a' if r is None else f'{100 * r:.2f}'} |")
    lines.append(f"| images | {metrics['num_images']} |")
    if "num_skipped" in metrics:
        lines.append(f"| skipped | {metrics['num_skipped']} |")
    return "\n".join(lines)


def confusion_figure(cm: Any, label_names: Sequence[str], title: str = ""):
    """A matplotlib figure of a row-normalised confusion matrix (for TensorBoard and PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(label_names), 1 + 0.6 * len(label_names)), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(norm.shape[0]):
        for j in range(norm.shape[1]):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
