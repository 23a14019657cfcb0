"""The one Trainer factory. Every task (fit, evaluate, synthesize, label, probes) builds its Trainer here,
so every point of an ablation grid runs under the same loggers, callbacks and strategy presets.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from datamodules.atomic import atomic_path
from lightning_synfer import hardware
from lightning_synfer.config.schema import TrainerConfig
from lightning_synfer.runs import RunDir, is_global_zero

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN/inf training loss with a clear message. last.ckpt keeps the last good step,
    because checkpoints are only written after a step whose loss was finite."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and torch.is_tensor(loss) and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch}, batch {batch_idx}. The last good checkpoint is kept in "
                f"{trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else 'the run dir'}. "
                f"Lower optim.lr, enable trainer.gradient_clip_val, or check the data.")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # A finite loss can still be followed by an update that makes the weights NaN/inf: never let such
        # weights replace the previous good checkpoint (raising here aborts the write).
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteLossError(
                f"non-finite weights ({bad[:3]}) at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch}; not saved, the last good checkpoint is kept in "
                f"{trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else 'the run dir'}. "
                f"Lower optim.lr, enable trainer.gradient_clip_val, or check the data.")


class RestoreLoaderState(Callback):
    """Restore the train loader's mid-epoch position after a resume.

    Lightning loads dataloader state in FitLoop.setup_data, but configure_optimizers already called
    setup_data (through trainer.estimated_stepping_batches) before the checkpoint was read, so the
    saved position would be ignored and the epoch replayed from its first batch.

    `FitLoop._load_combined_loader_states` is private Lightning API: setup.cfg pins the tested Lightning range
    (>=2.6,<2.7), and tests/lightning_synfer/test_trainer.py fails when the pin or the hook goes away.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.fit_loop._load_combined_loader_states()


class SeedEachBatch(Callback):
    """Reseed the global RNGs (torch on every device, numpy, random) before every training batch from
    (seed, epoch, batch index), so the model's own randomness (dropout, diffusion noise and timesteps, caption
    dropout) at a batch does not depend on what ran before it: validation, loader start-up, or a restart.
    With the per-sample augmentation seeds of the mixing sampler, a run resumed from any checkpoint continues
    exactly as the uninterrupted run (bitwise on CPU with trainer.deterministic=true). Lightning does not store
    RNG states in checkpoints, and restoring them would not help: a resumed run creates its loader iterators
    (one global draw each) at other points than the uninterrupted one. Every rank uses the same seeds, as
    seed_everything already does."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import random

        import numpy as np

        from datamodules.mixing import augment_seed

        seed = augment_seed(self.seed ^ 0x5EED_BA7C, trainer.current_epoch * (1 << 32) + batch_idx)
        torch.manual_seed(seed)  # CPU and every CUDA device
        np.random.seed(seed % (1 << 32))
        random.seed(seed)


class PlainProgress(Callback):
    """One line every N steps and one per validation, for logs of batch jobs (no progress bar)."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self._start = None
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self._start is None:  # rate counts from the end of the first step (start-up excluded)
            self._start, self._seen = now, 0
            return
        images = batch.get("image") if isinstance(batch, dict) else None
        if isinstance(images, (list, tuple)):
            images = images[0]
        self._seen += int(images.shape[0]) * trainer.world_size if torch.is_tensor(images) else 0
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            loss = trainer.callback_metrics.get("train/loss")
            rate = self._seen / max(now - self._start, 1e-9)
            print(f"[synfer] epoch {trainer.current_epoch} step {trainer.global_step}"
                  f"/{trainer.estimated_stepping_batches} loss {float(loss) if loss is not None else float('nan'):.4f} "
                  f"{rate:.1f} img/s", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged its metrics
        if trainer.is_global_zero and not trainer.sanity_checking:
            shown = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()
                     if k.startswith("val") and "/" in k and torch.is_tensor(v) and v.numel() == 1}
            print(f"[synfer] epoch {trainer.current_epoch} step {trainer.global_step} {shown}", flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file beside the target and renamed (datamodules/atomic.py), so a kill
    mid-write never leaves a truncated last.ckpt behind, and the file gets the user's umask. torch.save writes the
    temporary itself: Lightning's own save would stage it in the system temp folder and copy it across."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"Trainer.save_checkpoint(..., storage_options={storage_options!r}): storage options are "
                            f"not supported by {type(self).__name__} (local files only)")
        with atomic_path(os.fspath(path)) as tmp:
            torch.save(checkpoint, tmp)


class SaveOnPreemption(Callback):
    """SIGTERM (a preempted job): Lightning stops after the current step; save last.ckpt so that
    `resume=auto` continues from here, then let the process exit cleanly for requeueing."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            path = self.run.checkpoints / "last.ckpt"
            trainer.save_checkpoint(str(path))
            if trainer.is_global_zero:
                print(f"[synfer] SIGTERM: saved {path} at step {trainer.global_step}; resume with resume=auto",
                      flush=True)


def _optional(value: Any) -> Any:
    return None if value in (None, "null") else value


# `trainer.*` keys that are ours, not lightning.Trainer arguments; every other TrainerConfig field is passed on
# under its own name, so a Trainer argument is added to the suite by adding one field to TrainerConfig.
OWN_TRAINER_KEYS = frozenset({"sync_batchnorm", "checkpoint_every_n_steps", "precision"})


def trainer_arguments() -> list[str]:
    """The TrainerConfig fields passed to lightning.Trainer as they are."""
    return [f.name for f in dataclasses.fields(TrainerConfig) if f.name not in OWN_TRAINER_KEYS]


def build_trainer(
    cfg: DictConfig,
    run: Optional[RunDir],
    *,
    monitor: Optional[str] = "val/acc",
    mode: str = "max",
    callbacks: Sequence[Callback] = (),
    use_distributed_sampler: bool = False,
    enable_checkpointing: bool = True,
    needs_sync_batchnorm: bool = False,
    **overrides: Any,
) -> L.Trainer:
    """Build a Trainer from `cfg.trainer`.

    use_distributed_sampler is False for training because the DataModule's MixingBatchSampler
    shards each global batch itself; prediction tasks (synthesis, labelling) turn it on.
    needs_sync_batchnorm: the module family needs BatchNorm statistics over the global batch (a family's
    `trainer_overrides(cfg)` says so, e.g. the SSL methods); with `trainer.sync_batchnorm: null` (auto) this turns
    on SyncBatchNorm when more than one process trains (see `resolve_sync_batchnorm`).
    """
    t = cfg.trainer
    if monitor == "val/acc" and cfg.get("data") is not None and cfg.data.get("val") is None:
        monitor = None  # no validation set (data.val: null, e.g. few-shot runs): no best.ckpt, the last weights
    loggers = _loggers(cfg, run)
    cbs = _callbacks(cfg, run, monitor=monitor, mode=mode, checkpoints=enable_checkpointing, lr_monitor=bool(loggers))
    cbs.extend(callbacks)
    choice = hardware.choose(t, cfg.get("model"))
    if choice.precision_reason != "set in the config" and is_global_zero():
        print(f"[synfer] trainer.precision=auto -> {choice.precision}: {choice.precision_reason}", flush=True)
    kwargs: dict[str, Any] = {key: _optional(t[key]) for key in trainer_arguments()}
    kwargs.update(
        precision=choice.precision,
        enable_checkpointing=enable_checkpointing and run is not None,
        logger=loggers or False,
        callbacks=cbs,
        use_distributed_sampler=use_distributed_sampler,
        default_root_dir=str(run.path) if run is not None else None,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    kwargs.update(overrides)
    return _with_sync_batchnorm(kwargs, _optional(t.sync_batchnorm), needs_sync_batchnorm)


def _loggers(cfg: DictConfig, run: Optional[RunDir]) -> list[Any]:
    if run is None:
        return []
    loggers: list[Any] = []
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False))
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run.path), name="csv", version=""))
    return loggers


def _callbacks(cfg: DictConfig, run: Optional[RunDir], *, monitor: Optional[str], mode: str, checkpoints: bool,
               lr_monitor: bool) -> list[Callback]:
    t = cfg.trainer
    cbs: list[Callback] = [StopOnNonFiniteLoss(), RestoreLoaderState()]
    if cfg.get("seed") is not None:
        cbs.append(SeedEachBatch(cfg.seed))
    if run is not None and checkpoints and not t.fast_dev_run:
        # First callback = trainer.checkpoint_callback: the best weights by `monitor`.
        if monitor:
            cbs.append(ModelCheckpoint(dirpath=str(run.checkpoints), filename="best", monitor=monitor,
                                       mode=mode, save_top_k=1, auto_insert_metric_name=False))
        # last.ckpt for resume: at every epoch end, and also every N steps when preemption is likely
        # (Lightning's triggers are exclusive per callback, hence two). Both overwrite the one last.ckpt:
        # with Lightning's version counter, the second would find the first's file and write last-v1.ckpt,
        # which resume=auto never reads.
        cbs.append(ModelCheckpoint(dirpath=str(run.checkpoints), save_top_k=0, save_last=True,
                                   enable_version_counter=False))
        if t.checkpoint_every_n_steps:
            cbs.append(ModelCheckpoint(dirpath=str(run.checkpoints), save_top_k=0, save_last=True,
                                       every_n_train_steps=t.checkpoint_every_n_steps,
                                       enable_version_counter=False))
        cbs.append(SaveOnPreemption(run))
    if lr_monitor:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    if t.enable_progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, int(t.log_every_n_steps))))
    else:
        cbs.append(PlainProgress(int(t.log_every_n_steps)))
    return cbs


def _with_sync_batchnorm(kwargs: dict[str, Any], setting: Optional[bool], needs: bool) -> L.Trainer:
    """The Trainer, rebuilt with SyncBatchNorm when `setting` is null (auto) and the run needs it.

    The Trainer knows the cluster environment (SLURM, torchrun) and the devices it found, so the automatic
    choice reads its world size; a rebuild happens only for a multi-GPU run of a family that needs it."""
    trainer = _trainer(kwargs, bool(setting))
    accelerator = _accelerator_name(trainer)
    if setting is None and resolve_sync_batchnorm(None, needs, world_size_of(trainer), accelerator):
        trainer = _trainer(kwargs, True)
    if setting and trainer.world_size > 1 and not sync_batchnorm_supported(accelerator):
        raise ValueError(f"trainer.sync_batchnorm=true with {trainer.world_size} processes on "
                         f"{accelerator}: torch's SyncBatchNorm runs on GPUs only; expected "
                         f"trainer.sync_batchnorm=null (auto) or false for CPU runs")
    if setting is None and needs and trainer.world_size > 1 and trainer.is_global_zero:
        on = sync_batchnorm_supported(accelerator)
        why = "" if on else " (torch's SyncBatchNorm runs on GPUs only: each rank normalises its own samples)"
        print(f"[synfer] sync_batchnorm {'on' if on else 'off'}: the module needs global BatchNorm statistics, "
              f"world size {trainer.world_size}{why}; trainer.sync_batchnorm=true/false forces it", flush=True)
    return trainer


def _trainer(kwargs: dict[str, Any], sync_batchnorm: bool) -> L.Trainer:
    # Lightning appends its own callbacks to the list it is given: every build gets a fresh copy.
    return L.Trainer(**{**kwargs, "callbacks": list(kwargs["callbacks"]), "sync_batchnorm": sync_batchnorm})


def sync_batchnorm_supported(accelerator: str) -> bool:
    """torch's nn.SyncBatchNorm raises on CPU tensors once a process group exists (it runs on GPU/XPU/HPU)."""
    return accelerator != "cpu"


def resolve_sync_batchnorm(setting: Optional[bool], needs: bool, world_size: int, accelerator: str) -> bool:
    """`trainer.sync_batchnorm`: true/false force it; null (auto) turns it on when the module needs global
    BatchNorm statistics, more than one process trains, and the accelerator can synchronise BatchNorm."""
    if setting is not None:
        return bool(setting)
    return bool(needs) and world_size > 1 and sync_batchnorm_supported(accelerator)


def _accelerator_name(trainer: L.Trainer) -> str:
    from lightning.pytorch.accelerators import CPUAccelerator

    return "cpu" if isinstance(trainer.accelerator, CPUAccelerator) else "gpu"


def world_size_of(trainer: L.Trainer) -> int:
    return max(1, int(trainer.world_size))


def per_device_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    if global_batch % world_size:
        raise ValueError(f"{key}={global_batch} is the global batch and must be divisible by the world size "
                         f"({world_size} = devices x nodes)")
    return global_batch // world_size


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
