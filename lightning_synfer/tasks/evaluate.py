"""`python run.py evaluate ckpt=PATH data.test.root=DIR [data.test.format=folder|rafdb|affectnet|sfew]`.

`eval.ensemble=[PATH,...]` averages the class probabilities of more checkpoints with ckpt's; `eval.tta_hflip`
and `eval.tta_crops` (five crops, ten with the flip) average over views of each image.

Classes the test set has and the model lacks (contempt for a 7-class model) are reported and left
out, with a warning; classes the model has and the test set lacks are fine.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.labels import LabelSpace
from lightning_synfer.checkpoints import load_module
from lightning_synfer.config.compose import ConfigError
from lightning_synfer.metrics.fer import format_table, report
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run, timed
from lightning_synfer.trainer import build_trainer

CLASSIFIER_TASKS = ("supervised", "labeler", "ssl_linear", "ssl_finetune")


def test_records(cfg: DictConfig, model_labels: list[str], normalization: dict):
    """Load data.test in the full 8-class space, then keep only what the model can predict."""
    from datamodules.datamodule import FERDataModule

    eval_cfg = OmegaConf.merge(cfg, {"data": {"image_size": normalization.get("image_size", cfg.data.image_size),
                                              "channels": normalization.get("channels", cfg.data.channels)}})
    if cfg.data.test is None:
        raise ConfigError("evaluate needs a test set: data.test.root=DIR (and data.test.format=folder|rafdb|...)")
    with open_dict(eval_cfg):
        # Read the test set in the 8-class space so that classes the model lacks are seen and counted.
        eval_cfg.data.num_classes = 8 if cfg.data.test.format != "embedded" else len(model_labels)
    dm = FERDataModule(eval_cfg, normalization=normalization)
    records = dm.load_records(eval_cfg.data.test, "data.test")
    space = dm.label_space
    model_space = LabelSpace(tuple(model_labels))
    remap = model_space.remap_from(space)
    kept, excluded = [], {}
    for rec in records:
        target = remap[rec.label]
        if target < 0:
            name = space.names[rec.label]
            excluded[name] = excluded.get(name, 0) + 1
            continue
        rec.label, rec.label_soft = target, None
        kept.append(rec)
    if excluded:
        warnings.warn(f"data.test has classes the model lacks, left out: {excluded}")
    return dm, kept, excluded


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    if not cfg.ckpt:
        raise ConfigError("evaluate needs ckpt=PATH (a checkpoint written by fit, label or the probes)")
    module = load_module(cfg.ckpt, tasks=CLASSIFIER_TASKS)
    if cfg.eval.ensemble:
        from lightning_synfer.modules.ensemble import EnsembleClassifier

        paths = [str(cfg.ckpt), *map(str, cfg.eval.ensemble)]
        module = EnsembleClassifier([module, *(load_module(p, tasks=CLASSIFIER_TASKS) for p in paths[1:])], paths)
    module.tta_hflip = cfg.eval.tta_hflip
    module.tta_crops = cfg.eval.tta_crop_fraction if cfg.eval.tta_crops else None
    run_dir = start_run(cfg, argv)
    dm, records, excluded = test_records(cfg, module.label_names, module.normalization)
    from torch.utils.data import DataLoader

    from datamodules.datamodule import FERDataset
    from datamodules.transforms import eval_transform

    norm = module.normalization
    ds = FERDataset(records, eval_transform(norm["image_size"], norm["mean"], norm["std"]),
                    mode="L" if norm["channels"] == 1 else "RGB", label_names=module.label_names,
                    au_names=dm.au_names, on_bad_image=cfg.data.on_bad_image, source="data.test")
    loader = DataLoader(ds, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
    trainer = build_trainer(cfg, None, enable_checkpointing=False, devices=1, num_nodes=1, strategy="auto")
    with timed() as clock:
        trainer.test(module, dataloaders=loader, verbose=False)
    metrics = report(module.last_test_summary, module.label_names, extra={
        "task": "evaluate", "ckpt": str(cfg.ckpt), "test_root": cfg.data.test.root,
        "test_format": cfg.data.test.format, "excluded_classes": excluded, "tta_hflip": module.tta_hflip,
        "tta_crops": module.tta_crops, "ensemble": list(map(str, cfg.eval.ensemble)),
        "num_skipped": dm.num_skipped + len(ds.bad), "wall_time_s": clock["wall_time_s"], **peak_memory_mb()})
    print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
