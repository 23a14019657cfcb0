"""`python run.py evaluate ckpt=PATH data.test.root=DIR [data.test.format=folder|rafdb|affectnet|sfew]`.

Without data.test.format, DIR is read as `folder` (logged); data.test.format=embedded with a root is an error.

`eval.ensemble=[PATH,...]` averages the class probabilities of more checkpoints with ckpt's; `eval.tta_hflip`
and `eval.tta_crops` (five crops, ten with the flip) average over views of each image.

Classes the test set has and the model lacks (contempt for a 7-class model) are reported and left
out, with a warning; classes the model has and the test set lacks are fine.
"""
from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


def _command_line_keys(argv: Optional[list[str]]) -> set[str]:
    return {arg.split("=", 1)[0].lstrip("+~") for arg in (argv or []) if "=" in arg}


def resolve_test_source(cfg: DictConfig, argv: Optional[list[str]]) -> DictConfig:
    """data.test as the user meant it. The default experiment's test set is the embedded faces, which read no folder:

    - data.test.root on the command line without data.test.format: DIR is read as `folder` (the log says so);
    - data.test.format=embedded with a root otherwise (typed, or from a config): an error naming both keys;
    - a root given on the command line is evaluated whole: the experiment's data.test.num_images (a count of
      faces to render, or a subset of the experiment's own test set) applies only when typed beside it.
    """
    test, typed = cfg.data.test, _command_line_keys(argv)
    if test is None or not test.root:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        if test.format == "embedded":
            if "data.test.format" in typed or "data.test.root" not in typed:
                raise ConfigError(
                    f"data.test.root={test.root} is set, but data.test.format=embedded renders the built-in faces and "
                    f"reads no folder: set data.test.format to the layout of that folder (folder: <root>/<class>/<image>; "
                    f"rafdb, affectnet, ...) or drop data.test.root")
            cfg.data.test.format = "folder"
            log.warning("data.test.root=%s is set and data.test.format is not: reading it as data.test.format=folder "
                        "(<root>/<class>/<image> or <root>/%s/<class>/<image>); set data.test.format for another "
                        "layout (rafdb, affectnet, ...)", test.root, test.split)
        if "data.test.root" in typed and "data.test.num_images" not in typed and test.num_images:
            log.warning("data.test.num_images=%s comes from the experiment, not from data.test.root=%s: evaluating "
                        "all of it (type data.test.num_images=N for a subset)", test.num_images, test.root)
            cfg.data.test.num_images = 0
    return cfg


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


def evaluate_on_test_split(cfg: DictConfig, module: Any) -> dict[str, Any]:
    """One pass of `module` over data.test in its own preprocessing (evaluate, zeroshot): the module keeps the
    summary (last_test_summary); returned: the classes left out, the skipped images and the wall time."""
    from torch.utils.data import DataLoader

    from datamodules.datamodule import FERDataset
    from datamodules.transforms import eval_transform

    dm, records, excluded = test_records(cfg, module.label_names, module.normalization)
    norm = module.normalization
    ds = FERDataset(records, eval_transform(norm["image_size"], norm["mean"], norm["std"]),
                    mode="L" if norm["channels"] == 1 else "RGB", label_names=module.label_names,
                    au_names=dm.au_names, on_bad_image=cfg.data.on_bad_image, source="data.test")
    loader = DataLoader(ds, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
    trainer = build_trainer(cfg, None, enable_checkpointing=False, devices=1, num_nodes=1, strategy="auto")
    with timed() as clock:
        trainer.test(module, dataloaders=loader, verbose=False)
    return {"excluded": excluded, "num_skipped": dm.num_skipped + len(ds.bad), "wall_time_s": clock["wall_time_s"]}


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    if not cfg.ckpt:
        raise ConfigError("evaluate needs ckpt=PATH (a checkpoint written by fit, label or the probes)")
    cfg = resolve_test_source(cfg, argv)
    module = load_module(cfg.ckpt, tasks=CLASSIFIER_TASKS)
    if cfg.eval.ensemble:
        from lightning_synfer.modules.ensemble import EnsembleClassifier

        paths = [str(cfg.ckpt), *map(str, cfg.eval.ensemble)]
        module = EnsembleClassifier([module, *(load_module(p, tasks=CLASSIFIER_TASKS) for p in paths[1:])], paths)
    module.tta_hflip = cfg.eval.tta_hflip
    module.tta_crops = cfg.eval.tta_crop_fraction if cfg.eval.tta_crops else None
    run_dir = start_run(cfg, argv)
    test = evaluate_on_test_split(cfg, module)
    metrics = report(module.last_test_summary, module.label_names, extra={
        "task": "evaluate", "ckpt": str(cfg.ckpt), "test_root": cfg.data.test.root,
        "test_format": cfg.data.test.format, "excluded_classes": test["excluded"], "tta_hflip": module.tta_hflip,
        "tta_crops": module.tta_crops, "ensemble": list(map(str, cfg.eval.ensemble)),
        "num_skipped": test["num_skipped"], "wall_time_s": test["wall_time_s"], **peak_memory_mb()})
    print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
