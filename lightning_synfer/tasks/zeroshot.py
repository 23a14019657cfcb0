"""`python run.py zeroshot [ckpt=CLIP.ckpt] [experiment=zeroshot/...] [data.test.root=DIR data.test.format=...]`.

Zero-shot FER by prompt ensembles: each class of data.num_classes gets the mean text embedding of its prompts
(clip.prompts.file, default lightning_synfer/prompts/fer.yaml: every template x every class word); a face goes to
the class whose embedding is closest to its image embedding. The dual encoder is the `clip` checkpoint of ckpt=, or,
without ckpt, the experiment's own (clip.encoder=hf: the base CLIPModel of clip.pretrained_path, e.g.
experiments/zeroshot/base_rafdb.yaml). data.test is read as `evaluate` reads it (tasks/evaluate.py); metrics.json has
evaluate's format plus the prompts used.
"""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from datamodules.labels import LabelSpace
from lightning_synfer.checkpoints import load_module
from lightning_synfer.config.compose import to_container
from lightning_synfer.metrics.fer import format_table, report
from lightning_synfer.prompts import PromptSet
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run, timed
from lightning_synfer.tasks.evaluate import resolve_test_source, test_records
from lightning_synfer.trainer import build_trainer


def build_module(cfg: DictConfig) -> Any:
    """The dual encoder to evaluate, classifying data.num_classes classes with the command's prompts."""
    from lightning_synfer.modules.clip import CLIPModule

    label_names = list(LabelSpace.from_num_classes(cfg.data.num_classes).names)
    if cfg.ckpt:
        module = load_module(cfg.ckpt, tasks=("clip",))
        if module.label_names != label_names:
            module.set_classes(label_names)
    else:
        module = CLIPModule(config=to_container(cfg), label_names=label_names)
    module.set_prompts(PromptSet.load(cfg.clip.prompts.file), cfg.clip.prompts.ensemble)
    return module.eval()


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    cfg = resolve_test_source(cfg, argv)
    module = build_module(cfg)
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
    prompts = module.prompts
    metrics = report(module.last_test_summary, module.label_names, extra={
        "task": "zeroshot", "ckpt": str(cfg.ckpt) if cfg.ckpt else None,
        "encoder": cfg.clip.encoder if not cfg.ckpt else module.cfg.clip.encoder,
        "pretrained_path": None if cfg.ckpt else cfg.clip.pretrained_path,
        "test_root": cfg.data.test.root, "test_format": cfg.data.test.format, "excluded_classes": excluded,
        "prompts_file": module.prompt_set.source, "prompt_ensemble": module.prompt_ensemble,
        "prompts_per_class": {name: len(p) for name, p in prompts.items()},
        "num_skipped": dm.num_skipped + len(ds.bad), "wall_time_s": clock["wall_time_s"], **peak_memory_mb()})
    print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
