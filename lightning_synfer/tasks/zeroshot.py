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
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run
from lightning_synfer.tasks.evaluate import resolve_test_source, evaluate_on_test_split


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
    test = evaluate_on_test_split(cfg, module)
    prompts = module.prompts
    metrics = report(module.last_test_summary, module.label_names, extra={
        "task": "zeroshot", "ckpt": str(cfg.ckpt) if cfg.ckpt else None,
        "encoder": cfg.clip.encoder if not cfg.ckpt else module.cfg.clip.encoder,
        "pretrained_path": None if cfg.ckpt else cfg.clip.pretrained_path,
        "test_root": cfg.data.test.root, "test_format": cfg.data.test.format, "excluded_classes": test["excluded"],
        "prompts_file": module.prompt_set.source, "prompt_ensemble": module.prompt_ensemble,
        "prompts_per_class": {name: len(p) for name, p in prompts.items()},
        "num_skipped": test["num_skipped"], "wall_time_s": test["wall_time_s"], **peak_memory_mb()})
    print(format_table(metrics), flush=True)
    return finish(run_dir, metrics)
