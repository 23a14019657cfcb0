"""Semantic guidance (SynFER): steer the text embedding with a FER classifier during the last DDIM steps.

At a guided step: x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) from the fully conditional pass, decoded to
[0, 1] images, scored by the classifier; the cross-entropy to the target class is differentiated w.r.t. the
text embedding, and every token moves by lambda_g along its normalised negative gradient. The updated
embedding is used for this step's eps and carries over to the following steps.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.labels import canonical_name


class SemanticGuidance(nn.Module):
    def __init__(self, classifier: nn.Module, scale: float, window: float,
                 label_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if not 0.0 < window <= 1.0:
            raise ValueError(f"guidance.window={window}: expected a fraction of the last DDIM steps in (0, 1]")
        self.classifier = classifier.eval().requires_grad_(False)
        self.scale = float(scale)
        self.window = float(window)
        self._index_map: Optional[torch.Tensor] = None
        if label_names is not None:
            self.set_label_names(label_names)
        self.last_target_prob: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, guidance: Any, label_names: Sequence[str]) -> Optional["SemanticGuidance"]:
        """The `guidance` config section -> a SemanticGuidance, or None when it is off."""
        if not guidance.enabled:
            return None
        if not guidance.classifier:
            raise ValueError("guidance.enabled=true needs guidance.classifier=PATH (a FER classifier checkpoint)")
        from lightning_synfer.checkpoints import ImageClassifier

        return cls(ImageClassifier.from_checkpoint(guidance.classifier), guidance.scale, guidance.window, label_names)

    def set_label_names(self, generator_labels: Sequence[str]) -> None:
        """Map the generator's label indices onto the classifier's (by canonical name; -1 = not guided)."""
        theirs = [canonical_name(n) for n in getattr(self.classifier, "label_names", generator_labels)]
        self._index_map = torch.tensor([theirs.index(canonical_name(n)) if canonical_name(n) in theirs else -1
                                        for n in generator_labels], dtype=torch.long)

    def active(self, step_index: int, num_steps: int) -> bool:
        guided = max(1, math.ceil(self.window * num_steps - 1e-9))
        return step_index >= num_steps - guided

    def update(self, text_emb: torch.Tensor, labels: torch.Tensor,
               predict_images: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        targets = labels.to(text_emb.device).long()
        if self._index_map is not None:
            targets = self._index_map.to(targets.device)[targets]
        if torch.is_inference_mode_enabled():
            raise RuntimeError("semantic guidance needs autograd, but it runs under torch.inference_mode(); "
                               "build the Trainer with inference_mode=False (synthesize does when guidance.enabled)")
        keep = targets >= 0
        if not keep.any() or self.scale == 0:
            return text_emb
        with torch.enable_grad():
            emb = text_emb.detach().float().requires_grad_(True)
            images = predict_images(emb.to(text_emb.dtype))
            logits = self.classifier(images.float())
            # Sum: each sample's gradient is its own, whatever the batch.
            loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
            (grad,) = torch.autograd.grad(loss, emb)
        with torch.no_grad():
            self.last_target_prob = logits.detach().softmax(-1)[keep].gather(1, targets[keep, None]).squeeze(1)
            norm = grad.norm(dim=-1, keepdim=True)
            step = torch.where(norm > 0, grad / norm.clamp_min(1e-12), torch.zeros_like(grad))
            return (emb - self.scale * step).to(text_emb.dtype).detach()
