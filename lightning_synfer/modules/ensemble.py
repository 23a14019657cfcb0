"""An ensemble of FER classifiers as one classifier: the mean of the members' class probabilities.

`evaluate ckpt=A eval.ensemble=[B,C]` scores a snapshot ensemble (the best checkpoints of successive
warm-restart cycles) or a seed ensemble exactly as it scores one model: the same metrics, TTA and report.
Labelling keeps its own ensemble (`labeling.ensemble`), which needs each member's vote, not only the mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lightning_synfer.modules.base import FERClassifierModule


class EnsembleClassifier(FERClassifierModule):
    task_name = "ensemble"

    def __init__(self, members: Sequence[FERClassifierModule], paths: Sequence[str]) -> None:
        if not members or len(members) != len(paths):
            raise ValueError("EnsembleClassifier: expected one checkpoint path per member, and at least one member")
        first = members[0]
        for member, path in zip(members[1:], paths[1:]):
            if member.label_names != first.label_names:
                raise ValueError(f"eval.ensemble: {path} predicts {member.label_names}; ckpt={paths[0]} predicts "
                                 f"{first.label_names} (members must share one label space)")
            if member.normalization != first.normalization:
                raise ValueError(f"eval.ensemble: {path} expects input {member.normalization}; ckpt={paths[0]} "
                                 f"expects {first.normalization} (members must share one input normalisation)")
        super().__init__(OmegaConf.to_container(first.cfg, resolve=True), first.label_names, first.normalization)
        self.members = nn.ModuleList(members)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Log of the mean probability: softmax(forward) is the ensemble's distribution, argmax its vote.
        probs = torch.stack([member(images).float().softmax(-1) for member in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()
