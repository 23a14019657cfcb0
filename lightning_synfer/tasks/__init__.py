"""Task bodies, one module each, and the task table: the one place that lists what `run.py` can do.

A config task is `run(cfg, argv) -> metrics`; a plain task (`PLAIN_TASKS`) takes its own argv and
composes no config. `load(name)` returns either function; the CLI, the pipeline runner and the sweep
launchers all go through it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

# task -> ("module:function", default experiment, help)
TASKS: dict[str, tuple[str, Optional[str], str]] = {
    "fit": ("lightning_synfer.tasks.fit:run", "supervised/embedded",
            "train the module family of the experiment (supervised, generator, labeler, ssl)"),
    "evaluate": ("lightning_synfer.tasks.evaluate:run", "supervised/embedded",
                 "evaluate a classifier checkpoint on data.test (writes metrics.json)"),
    "render": ("lightning_synfer.tasks.render:run", "supervised/embedded",
               "render the embedded splits of data.* into the cache later runs reuse; metrics.json: faces per class"),
    "pipeline": ("lightning_synfer.tasks.pipeline:run", "pipeline/embedded",
                 "the SynFER pipeline as cached stages (what `python run.py` runs), with paper-shaped tables"),
    "linear": ("lightning_synfer.tasks.linear:run", "ssl/embedded_linear",
               "linear probe of an SSL checkpoint (ckpt=...) on the experiment's labelled data"),
    "finetune": ("lightning_synfer.tasks.finetune:run", "ssl/embedded_finetune",
                 "fine-tune an SSL checkpoint (ckpt=...) on the experiment's labelled data"),
    "knn": ("lightning_synfer.tasks.knn:run", "ssl/embedded_linear",
            "weighted kNN of an SSL checkpoint's features (ckpt=...): bank data.train, queries data.test"),
    "synthesize": ("lightning_synfer.tasks.synthesize:run", "generator/synthesize_embedded",
                   "generate a labelled synthetic face set (synthesis.generator=... synthesis.num_images=N "
                   "synthesis.out=DIR); resumable"),
    "au-sweep": ("lightning_synfer.tasks.au_sweep:run", "generator/au_sweep",
                 "one face with one AU raised from 0 to 1 per row (synthesis.generator=... au_sweep.aus=[AU12,AU4] "
                 "au_sweep.values=[...]): au_sweep.png and the pixel change per AU value"),
    "annotate": ("lightning_synfer.tasks.annotate:run", "generator/annotate",
                 "real faces -> a FEText-style set with AUs (OpenFace/py-feat/LibreFace CSV or an AU model), "
                 "captions and labels (annotate.root=DIR annotate.out=DIR); resumable"),
    "evaluate-generation": ("lightning_synfer.tasks.evaluate_generation:run", "generator/evaluate_generation",
                            "judge a synthetic set (generation_eval.dataset=DIR generation_eval.judge=... "
                            "[generation_eval.real.root=DIR]): FER acc, AU error, FID/KID"),
    "label": ("lightning_synfer.tasks.label:run", "labeler/rectify",
              "rectify a synthetic set's labels (labeling.dataset=DIR labeling.ensemble=[CKPT,...] "
              "[labeling.min_confidence=P]); "
              "writes manifest.v<N>.jsonl; resumable"),
    "zeroshot": ("lightning_synfer.tasks.zeroshot:run", "zeroshot/embedded_tiny",
                 "zero-shot FER of a clip checkpoint (ckpt=...) or of the experiment's base CLIP (clip.pretrained_path) "
                 "on data.test, by prompt ensembles (clip.prompts.file); writes metrics.json as evaluate does"),
    "sweep": ("lightning_synfer.tasks.sweep:run", "sweeps/embedded_ratio",
              "a grid of fit runs (sweep.grid.KEY=[v1,v2] ...; sweep.launcher=local|slurm); reruns skip finished points"),
}
DEFAULT_TASK = "pipeline"

# Tasks that do not compose a config (they take paths): name -> "module:function".
PLAIN_TASKS: dict[str, tuple[str, str]] = {
    "check-dataset": ("lightning_synfer.tasks.check_dataset:main",
                      "verify a synthetic or real dataset folder; exits 1 on any problem"),
    "table": ("lightning_synfer.tasks.table:main",
              "RUN_DIR... [--out DIR] [--group-by KEY ...]: mean ± std over seeds as Markdown/CSV, plots"),
}


def load(task: str) -> Callable:
    """The function behind a task name of TASKS or PLAIN_TASKS (imported on first use: the CLI starts fast)."""
    if task in TASKS:
        target = TASKS[task][0]
    elif task in PLAIN_TASKS:
        target = PLAIN_TASKS[task][0]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(list(TASKS) + list(PLAIN_TASKS))}")
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)
