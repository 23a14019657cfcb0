"""Vision-language FER (task `clip`): contrastive image-caption training of a dual encoder, zero-shot evaluation.

Training (`run.py fit experiment=zeroshot/...`): CLIP's symmetric loss (losses/clip.py, gathered across ranks) on
the batch's `image` and `caption` from the shared FERDataModule, so a synthetic set (whose records carry captions), a
real captioned set, or a mix at `data.mix.synthetic_ratio` all train it the same way; sets without captions get the
label template of `datamodule.label_caption`. clip.finetune: full | lora | head (models/dual_encoder.py).

As a classifier it is a `FERClassifierModule` whose `forward(images)` gives zero-shot logits: scale · image · classᵀ
with one prompt-ensemble embedding per class (lightning_synfer/prompts). So validation (`val/acc`, best.ckpt),
`fit`'s test report and `run.py zeroshot` (tasks/zeroshot.py) are the zero-shot accuracy, in evaluate's format.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lightning_synfer import optim
from lightning_synfer.losses.clip import CLIPLoss
from lightning_synfer.models.dual_encoder import apply_finetune, build_dual_encoder
from lightning_synfer.modules.base import FERClassifierModule
from lightning_synfer.prompts import PromptSet, class_embeddings


class CLIPModule(FERClassifierModule):
    task_name = "clip"

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None,
                 arch: Optional[dict] = None) -> None:
        super().__init__(config, label_names, normalization)
        self.save_hyperparameters()
        self.encoder = build_dual_encoder(self.cfg, arch=arch)
        if arch is None and getattr(self.encoder, "arch", None) is not None:
            # checkpoints rebuild the CLIPModel from its config, without re-reading the folder's weights
            self.hparams["arch"] = self.encoder.arch
        self.trainable = apply_finetune(self.encoder, self.cfg.clip)
        if not self.normalization:
            self.normalization = self.encoder.input_format(self.cfg.data)
        if int(self.normalization["image_size"]) != int(self.cfg.data.image_size):
            from lightning_synfer.config.errors import ConfigError

            raise ConfigError(f"config key 'data.image_size' = {self.cfg.data.image_size}: expected "
                              f"{self.normalization['image_size']}, the input size of the CLIP image tower")
        self.loss = CLIPLoss()
        self.prompt_set = PromptSet.load(self.cfg.clip.prompts.file)
        self.prompt_ensemble = bool(self.cfg.clip.prompts.ensemble)
        self._class_text: Optional[torch.Tensor] = None  # (C, D), rebuilt at every eval epoch start

    # -- zero-shot classifier -------------------------------------------------------------------------------
    def set_prompts(self, prompt_set: PromptSet, ensemble: bool = True) -> None:
        self.prompt_set, self.prompt_ensemble, self._class_text = prompt_set, bool(ensemble), None

    @property
    def prompts(self) -> dict[str, list[str]]:
        return self.prompt_set.prompts(self.label_names, ensemble=self.prompt_ensemble)

    def scale(self) -> torch.Tensor:
        return self.encoder.logit_scale.exp().clamp(max=float(self.cfg.clip.max_logit_scale))

    @torch.no_grad()
    def class_text_embeddings(self) -> torch.Tensor:
        if self._class_text is None or self._class_text.device != self.device:
            self._class_text = class_embeddings(self.encoder.encode_text, self.prompts)
        return self._class_text

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.encoder.encode_image(images).float(), dim=-1)
        return self.scale().float() * image @ self.class_text_embeddings().T

    def on_validation_epoch_start(self) -> None:
        self._class_text = None  # the text tower trained since

    def on_test_epoch_start(self) -> None:
        self._class_text = None

    def on_predict_epoch_start(self) -> None:
        self._class_text = None

    # -- contrastive training ---------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        image = self.encoder.encode_image(batch["image"])
        text = self.encoder.encode_text(batch["caption"])
        dtype = torch.promote_types(image.dtype, torch.float32)  # the loss in fp32 under bf16 autocast (fp64 stays)
        return self.loss(image.to(dtype), text.to(dtype), self.scale().to(dtype))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", self.scale().detach(), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        global_batch = int(self.cfg.data.batch_size)
        base_lr = optim.scaled_lr(o, optim.effective_batch(global_batch, self.trainer))
        text_ids = {id(p) for m in self.encoder.text_modules() for p in m.parameters()}
        scale_id = id(self.encoder.logit_scale)
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim > 1 and id(p) != scale_id  # no decay on biases, norms and the temperature
            groups.setdefault((id(p) in text_ids, decay), []).append(p)
        ratio = float(self.cfg.clip.text_lr_ratio)
        param_groups = [{"params": ps, "weight_decay": o.weight_decay if decay else 0.0,
                         "lr": base_lr * (ratio if is_text else 1.0)}
                        for (is_text, decay), ps in sorted(groups.items())]
        return optim.configure(self, self.trainer, o, global_batch, groups=param_groups)

    def set_classes(self, label_names: Sequence[str]) -> None:
        """Zero-shot over another class set (the test set's): new prompts, fresh metrics."""
        from torch import nn

        from lightning_synfer.metrics.fer import FERMetrics
        from lightning_synfer.modules.base import DOMAINS

        self.label_names, self.num_classes, self._class_text = list(label_names), len(label_names), None
        self.val_metrics, self.test_metrics = FERMetrics(self.num_classes), FERMetrics(self.num_classes)
        self.val_domain_metrics = nn.ModuleDict({n: FERMetrics(self.num_classes) for n in DOMAINS.values()})
        self.test_domain_metrics = nn.ModuleDict({n: FERMetrics(self.num_classes) for n in DOMAINS.values()})
