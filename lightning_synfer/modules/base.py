"""What every FER classifier LightningModule shares: metrics, logging, checkpoint metadata, prediction.

Subclasses (supervised, labeler, SSL probes) implement `forward(images) -> logits` and `training_step`.
Validation, test, confusion matrices and `predict_step` (class probabilities, used by guidance,
labelling and evaluate) live here once.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from datamodules.records import DOMAIN_NAMES as DOMAINS  # batch `domain` code -> name used in metric keys
from lightning_synfer.metrics.fer import FERMetrics, confusion_figure

CHECKPOINT_FORMAT = 1


def default_normalization(cfg: DictConfig, backbone: nn.Module) -> dict:
    """What the classifier expects as input: from data.mean/std, else the backbone's pretrained_cfg."""
    from lightning_synfer.models.backbones import normalization_for

    channels = cfg.data.channels
    mean, std = normalization_for(backbone, channels, pretrained=bool(cfg.model.get("pretrained_path")))
    return {"mean": list(cfg.data.mean or mean), "std": list(cfg.data.std or std),
            "image_size": int(cfg.data.image_size), "channels": int(channels)}


def five_crops(images: torch.Tensor, fraction: float) -> list[torch.Tensor]:
    """The four corner crops and the centre crop of `fraction` of the side, each resized back to the input size
    (the scale that training's random resized crop shows the network)."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    tops_lefts = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    crops = [images[..., t:t + ch, l:l + cw] for t, l in tops_lefts]
    if (ch, cw) == (h, w):
        return crops
    return [F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False) for c in crops]


class FERClassifierModule(L.LightningModule):
    task_name = "classifier"

    def __init__(self, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None) -> None:
        super().__init__()
        self.cfg: DictConfig = OmegaConf.create(config)
        self.label_names = list(label_names)
        self.num_classes = len(self.label_names)
        # mean/std/size/channels the classifier expects: lets guidance and labelling feed raw [0,1] images.
        self.normalization = dict(normalization or {})
        self.val_metrics = FERMetrics(self.num_classes)
        self.val_domain_metrics = nn.ModuleDict({name: FERMetrics(self.num_classes) for name in DOMAINS.values()})
        self.test_metrics = FERMetrics(self.num_classes)
        self.test_domain_metrics = nn.ModuleDict({name: FERMetrics(self.num_classes) for name in DOMAINS.values()})
        # The overall summary (tensors) plus "per_domain": {domain name: summary} for the domains the test set has.
        self.last_test_summary: Optional[dict[str, Any]] = None

    def build_backbone_and_head(self) -> None:
        """timm backbone (local weights only) + linear head; input normalisation from the backbone."""
        from lightning_synfer.models.backbones import create_backbone

        m = self.cfg.model
        self.backbone = create_backbone(
            m.backbone, in_chans=self.cfg.data.channels, pretrained_path=m.pretrained_path,
            drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate, small_input=m.small_input,
            **dict(m.extra))
        self.head = nn.Linear(self.backbone.num_features, self.num_classes)
        if not self.normalization:
            self.normalization = default_normalization(self.cfg, self.backbone)

    # -- shared evaluation -------------------------------------------------------------------------
    @property
    def tta_hflip(self) -> bool:
        """eval.tta_hflip: `evaluate` may switch it on for a checkpoint trained without it."""
        return bool(getattr(self, "_tta_hflip", self.cfg.get("eval", {}).get("tta_hflip", False)))

    @tta_hflip.setter
    def tta_hflip(self, value: bool) -> None:
        self._tta_hflip = bool(value)

    @property
    def tta_crops(self) -> Optional[float]:
        """The crop fraction of five-crop TTA (eval.tta_crops), or None when it is off."""
        if hasattr(self, "_tta_crops"):
            return self._tta_crops
        ev = self.cfg.get("eval", {})
        return float(ev.get("tta_crop_fraction", 0.9)) if ev.get("tta_crops", False) else None

    @tta_crops.setter
    def tta_crops(self, fraction: Optional[float]) -> None:
        if fraction is not None and not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"eval.tta_crop_fraction={fraction}: expected a fraction of the side in (0, 1]")
        self._tta_crops = None if fraction is None else float(fraction)

    def _soft_label_loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of a plain classifier on the batch's soft labels; updates and logs train/loss and train/acc
        (the subclass builds `criterion` and `train_acc`)."""
        loss = self.criterion(logits, batch["label_soft"])
        self.train_acc(logits.detach().argmax(-1), batch["label"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def _eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, or with TTA the log of the mean softmax over the views, so that argmax and softmax stay valid."""
        if not self.tta_hflip and self.tta_crops is None:
            return self(images)
        views = [images] if self.tta_crops is None else five_crops(images, self.tta_crops)
        if self.tta_hflip:
            views = views + [v.flip(-1) for v in views]
        probs = torch.stack([self(v).float().softmax(-1) for v in views]).mean(0)
        return probs.clamp_min(1e-12).log()

    def _eval_step(self, batch: dict[str, Any], metrics: FERMetrics,
                   domain_metrics: Optional[nn.ModuleDict] = None) -> torch.Tensor:
        logits = self._eval_logits(batch["image"])
        target = batch["label"]
        metrics.update(logits.detach(), target)
        if domain_metrics is not None and "domain" in batch:
            for dom_id, name in DOMAINS.items():
                # Update even with an empty mask: every rank then computes (and syncs) every domain metric.
                mask = batch["domain"] == dom_id
                domain_metrics[name].update(logits.detach()[mask], target[mask])
        return logits

    def _domain_summaries(self, prefix: str, domain_metrics: nn.ModuleDict) -> dict[str, dict[str, torch.Tensor]]:
        """Log `{prefix}_{domain}/acc|macro_f1` and `{prefix}_{domain}_recall/<class>` for the domains seen."""
        out = {}
        for name, metric in domain_metrics.items():
            if metric.update_count:  # same on every rank: batches either carry `domain` or do not
                summary = metric.compute()  # synced across ranks, so the test below agrees on every rank
                if summary["confusion"].sum() > 0:
                    self._log_summary(f"{prefix}_{name}", summary, prog_bar=False)
                    out[name] = {k: v.detach().cpu() for k, v in summary.items()}
            metric.reset()
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_domain_metrics)

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()
        self._log_summary("val", summary)
        self._domain_summaries("val", self.val_domain_metrics)
        self.val_metrics.reset()
        if self.cfg.logger.log_confusion_matrix and not self.trainer.sanity_checking:
            self._log_confusion(summary["confusion"], "val/confusion")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_domain_metrics)

    def on_test_epoch_end(self) -> None:
        summary = self.test_metrics.compute()
        self.last_test_summary = {k: v.detach().cpu() for k, v in summary.items()}
        self._log_summary("test", summary)
        self.last_test_summary["per_domain"] = self._domain_summaries("test", self.test_domain_metrics)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        probs = torch.softmax(self(batch["image"]).float(), dim=-1)
        return {"probs": probs.cpu(), "index": batch["index"].cpu()}

    def _log_summary(self, prefix: str, summary: dict[str, torch.Tensor], prog_bar: bool = True) -> None:
        # Metric states are already synced across ranks by torchmetrics; log plain floats.
        self.log(f"{prefix}/acc", summary["acc"].float(), prog_bar=prog_bar, sync_dist=False)
        self.log(f"{prefix}/macro_f1", summary["macro_f1"].float(), sync_dist=False)
        for name, r in zip(self.label_names, summary["recall"].tolist()):
            if r == r:  # skip NaN: class absent from this split
                self.log(f"{prefix}_recall/{name}", float(r), sync_dist=False)

    def _log_confusion(self, cm: torch.Tensor, tag: str) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                import matplotlib.pyplot as plt

                fig = confusion_figure(cm.cpu().numpy(), self.label_names, title=f"epoch {self.current_epoch}")
                logger.experiment.add_figure(tag, fig, global_step=self.global_step)
                plt.close(fig)

    # -- checkpoint metadata -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["synfer"] = {"task": self.task_name, "format": CHECKPOINT_FORMAT,
                                "label_names": self.label_names, "normalization": self.normalization}
