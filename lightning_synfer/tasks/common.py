"""Pieces every task uses: seeding, run dir, datamodule for a module, timing and peak memory."""
from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import lightning as L
import torch
from omegaconf import DictConfig

from lightning_synfer.config.compose import to_container
from lightning_synfer.runs import RunDir, prepare_run_dir

log = logging.getLogger("lightning_synfer")


def start_run(cfg: DictConfig, argv: Optional[list[str]] = None) -> RunDir:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = prepare_run_dir(cfg, argv=argv)
    if run.path and _rank_zero():
        print(f"[synfer] run dir: {run.path}", flush=True)
    return run


def _rank_zero() -> bool:
    from lightning_synfer.runs import is_global_zero

    return is_global_zero()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and of its finished children, e.g. workers), plus CUDA."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = {"peak_rss_mb": self_kb / 1024, "peak_rss_children_mb": child_kb / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["wall_time_s"] = time.perf_counter() - start


def module_kwargs(cfg: DictConfig, label_names: list[str], family: Any = None) -> dict[str, Any]:
    """Constructor arguments of a module family; families that take `au_names` (the generator's FAU adapter, a
    classifier's AU head) get the run's AU vocabulary, the one the DataModule orders `batch["aus"]` by."""
    import inspect

    kwargs: dict[str, Any] = {"config": to_container(cfg), "label_names": list(label_names)}
    if family is not None and "au_names" in inspect.signature(family.__init__).parameters:
        from datamodules.datamodule import resolve_au_names

        kwargs["au_names"] = resolve_au_names(cfg)
    return kwargs


def finish(run: RunDir, metrics: dict[str, Any]) -> dict[str, Any]:
    if _rank_zero():
        run.write_metrics(metrics)
        print(f"[synfer] metrics: {run.metrics_path}", flush=True)
        print(f"[synfer] run dir: {run.path}", flush=True)
    sys.stdout.flush()
    return metrics
