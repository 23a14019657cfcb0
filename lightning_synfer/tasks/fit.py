"""`python run.py fit experiment=...`: train the module family named by `task`, then test its best weights."""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from datamodules.labels import LabelSpace
from lightning_synfer.metrics.fer import format_table, report
from lightning_synfer.modules import module_class
from lightning_synfer.runs import resolve_resume_checkpoint
from lightning_synfer.tasks.common import finish, module_kwargs, peak_memory_mb, start_run, timed
from lightning_synfer.trainer import build_trainer


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    run_dir = start_run(cfg, argv)
    family = module_class(cfg.task)
    label_names = list(LabelSpace.from_num_classes(cfg.data.num_classes).names)
    module = family(**module_kwargs(cfg, label_names, family))
    if cfg.model.get("init_from"):
        from lightning_synfer.checkpoints import init_weights_from

        init_weights_from(module, cfg.model.init_from)
    datamodule = family.build_datamodule(cfg, module, str(run_dir.path)) if hasattr(family, "build_datamodule") \
        else _default_datamodule(cfg, module, str(run_dir.path))
    _check_au_vocabulary(module, datamodule)
    trainer = build_trainer(cfg, run_dir, **getattr(family, "trainer_overrides", lambda c: {})(cfg))
    ckpt = resolve_resume_checkpoint(cfg, run_dir)
    if ckpt and trainer.is_global_zero:
        print(f"[synfer] resuming from {ckpt}", flush=True)
    with timed() as clock:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    metrics: dict[str, Any] = {"task": "fit", "family": cfg.task, "experiment": cfg.experiment,
                               "config_hash": run_dir.config_hash, "seed": cfg.seed,
                               "train_wall_time_s": clock["wall_time_s"], "global_step": trainer.global_step,
                               "interrupted": bool(trainer.interrupted)}
    if hasattr(module, "fit_metrics"):
        metrics.update(module.fit_metrics(trainer, datamodule))
    else:
        metrics.update(_classifier_metrics(cfg, trainer, module, datamodule))
    metrics.update(peak_memory_mb())
    metrics["num_skipped"] = getattr(datamodule, "num_skipped", 0)
    return finish(run_dir, metrics)


def _check_au_vocabulary(module: Any, datamodule: Any) -> None:
    """The model's AU inputs/outputs and the batches' AU order are one list (a family's own DataModule may differ)."""
    model_aus, data_aus = getattr(module, "au_names", None), getattr(datamodule, "au_names", None)
    if model_aus and data_aus is not None and (getattr(module, "au_adapter", None) is not None
                                               or getattr(module, "au_head", None) is not None):
        from datamodules.au_vocabulary import check_same_aus

        check_same_aus(data_aus, model_aus, source="the DataModule's AU vocabulary",
                       target=f"the {type(module).__name__}'s AU list")


def _default_datamodule(cfg: DictConfig, module: Any, run_dir: str) -> Any:
    from datamodules.datamodule import FERDataModule

    return FERDataModule(cfg, normalization=getattr(module, "normalization", None), run_dir=run_dir)


def _classifier_metrics(cfg: DictConfig, trainer: Any, module: Any, datamodule: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cb = trainer.checkpoint_callback
    if cb is not None and cb.best_model_score is not None:
        out["best_val_acc"] = float(cb.best_model_score)
        out["best_checkpoint"] = cb.best_model_path
    if cfg.data.test is not None and not trainer.interrupted:
        ckpt = "best" if cb is not None and cb.best_model_path else None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)
        if module.last_test_summary is not None:
            out["test"] = report(module.last_test_summary, module.label_names)
            if trainer.is_global_zero:
                print(format_table(out["test"]), flush=True)
    return out
