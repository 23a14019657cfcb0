"""Plain-dict registry of LightningModule families: the `task` config key picks one.

Each family registers itself here; checkpoints store the task name so `evaluate` and the
labeller can rebuild the right class.
"""
from __future__ import annotations

import importlib

# task name -> "module:Class"; imported lazily so the CLI starts fast and optional deps stay optional.
MODULES: dict[str, str] = {
    "supervised": "lightning_synfer.modules.supervised:SupervisedFER",
    "generator": "lightning_synfer.modules.generator:GeneratorModule",
    "ssl": "lightning_synfer.modules.ssl:SSLModule",  # ssl.method picks MoCo v3 / SimCLR / BYOL / DINO
    "ssl_linear": "lightning_synfer.modules.probe:LinearProbe",
    "ssl_finetune": "lightning_synfer.modules.probe:FinetuneProbe",
    "labeler": "lightning_synfer.modules.labeler:PseudoLabelerModule",  # diffusion-feature pseudo-labeler
    "clip": "lightning_synfer.modules.clip:CLIPModule",  # image-caption dual encoder, zero-shot by prompt ensembles
}


def module_class(task: str):
    if task not in MODULES:
        raise ValueError(f"task={task!r}: unknown module family; expected one of {sorted(MODULES)}")
    mod, cls = MODULES[task].split(":")
    return getattr(importlib.import_module(mod), cls)
