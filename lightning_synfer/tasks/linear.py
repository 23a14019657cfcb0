"""`python run.py linear ckpt=SSL.ckpt [experiment=ssl/probe_rafdb]`: linear probe on a frozen SSL backbone.

The probe experiment gives the labelled data (data.train/val/test), optimizer and trainer; the backbone,
its input size, channels and normalisation come from the checkpoint. The head is selected on data.val,
then tested on data.test; metrics.json has `evaluate`'s format (`metrics.fer.report`) plus probe keys.
`finetune` (tasks/finetune.py) is the same with a trainable backbone.
"""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.labels import LabelSpace
from lightning_synfer.checkpoints import load_module
from lightning_synfer.config.compose import ConfigError, to_container
from lightning_synfer.metrics.fer import format_table, report
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run, timed
from lightning_synfer.trainer import build_trainer

# Checkpoints whose backbone the probes and kNN accept (all expose `.backbone` and `.normalization`).
BACKBONE_TASKS = ("ssl", "ssl_linear", "ssl_finetune", "supervised")


def load_backbone_module(cfg: DictConfig, task: str, tasks=("ssl",)) -> Any:
    if not cfg.ckpt:
        raise ConfigError(f"{task} needs ckpt=PATH (the checkpoint of `python run.py fit experiment=ssl/...`)")
    return load_module(cfg.ckpt, tasks=tasks)


def probe_config(cfg: DictConfig, source: Any, task: str) -> DictConfig:
    """This experiment's config with the source checkpoint's backbone and input format (size, channels,
    mean/std), so the probe sees exactly what the backbone was trained on. `task` (ssl_linear, ssl_finetune,
    ssl_knn) keeps the run hashes of different probes on one experiment and checkpoint apart."""
    norm = source.normalization
    model = {**to_container(source.cfg.model), "pretrained_path": None}
    out = OmegaConf.merge(cfg, {"task": task, "model": model, "data": {
        "image_size": int(norm["image_size"]), "channels": int(norm["channels"]),
        "mean": list(norm["mean"]), "std": list(norm["std"])}})
    if out.data.test is None:
        raise ConfigError(f"experiment={cfg.experiment}: the probe needs a test set (data.test.root and "
                          f"data.test.format); see experiments/ssl/probe_*.yaml")
    return out


def run(cfg: DictConfig, argv: Optional[list[str]] = None, kind: str = "linear") -> dict[str, Any]:
    from datamodules.datamodule import FERDataModule
    from lightning_synfer.modules.probe import FinetuneProbe, LinearProbe

    source = load_backbone_module(cfg, kind, BACKBONE_TASKS)
    pcfg = probe_config(cfg, source, f"ssl_{kind}")
    run_dir = start_run(pcfg, argv)
    label_names = list(LabelSpace.from_num_classes(pcfg.data.num_classes).names)
    cls = LinearProbe if kind == "linear" else FinetuneProbe
    module = cls(config=to_container(pcfg), label_names=label_names, normalization=source.normalization)
    random_init = bool(pcfg.ssl.probe.random_init)
    if not random_init:
        module.load_backbone(source.backbone)
    del source
    dm = FERDataModule(pcfg, normalization=module.normalization, run_dir=str(run_dir.path))
    trainer = build_trainer(pcfg, run_dir)
    with timed() as clock:
        trainer.fit(module, datamodule=dm, weights_only=True)
    cb = trainer.checkpoint_callback
    best = cb.best_model_path if cb is not None and cb.best_model_path else None
    trainer.test(module, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
    metrics = report(module.last_test_summary, module.label_names, extra={
        "task": kind, "ckpt": str(cfg.ckpt), "random_init": random_init, "experiment": pcfg.experiment, "backbone": pcfg.model.backbone,
        "test_root": pcfg.data.test.root, "test_format": pcfg.data.test.format,
        "best_val_acc": float(cb.best_model_score) if cb is not None and cb.best_model_score is not None else None,
        "best_checkpoint": best, "global_step": trainer.global_step, "train_wall_time_s": clock["wall_time_s"],
        "num_skipped": dm.num_skipped, **peak_memory_mb()})
    if trainer.is_global_zero:
        print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
