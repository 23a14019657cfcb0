"""`python run.py render [experiment=...] [data.train.num_images=N ...]`: render the embedded splits into the cache.

The embedded faces are rendered once per (split, num_images, image size, channels, seed, classes, renderer code)
and kept as `<paths.cache_dir>/embedded/embedded-<split>-<hash>.npz` (datamodules/procedural/dataset.py); every
task whose data.* names the same split then loads that file instead of drawing the faces again. This task renders
data.train/val/test/synthetic where their format is `embedded`, through the DataModule's own loading code (so the
cache files are exactly the ones later runs look up), and writes to its run dir:

    metrics.json   images per class and split, the cache file of each split and whether it was already there
    samples.png    one row per class of train faces (what the classifiers and the generator learn from)

It is the main job's first stage (experiments/pipeline/embedded.yaml); the stages after it reuse its cache.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from lightning_synfer.config.compose import ConfigError
from lightning_synfer.tasks.common import finish, start_run

SPLITS = ("train", "val", "test", "synthetic")
SAMPLES_PER_CLASS = 8


def cache_path(cfg: DictConfig, ds_cfg: DictConfig) -> Path:
    """The cache file FERDataModule reads or writes for an embedded dataset config (same arguments as its loader)."""
    from datamodules.datamodule import embedded_split_args
    from datamodules.procedural.dataset import cache_file

    return cache_file(**embedded_split_args(cfg, ds_cfg))


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    from datamodules.datamodule import FERDataModule

    wanted = {name: cfg.data.get(name) for name in SPLITS if cfg.data.get(name) is not None}
    if not any(ds.format == "embedded" for ds in wanted.values()):
        found = ", ".join(f"data.{n}.format={ds.format}" for n, ds in wanted.items()) or "no data sets"
        raise ConfigError(f"render: nothing to render ({found}); expected at least one data.<split> with "
                          f"format=embedded, e.g. experiment=supervised/embedded")
    run_dir = start_run(cfg, argv)
    dm = FERDataModule(cfg)
    names = list(dm.label_space.names)
    splits: dict[str, Any] = {}
    rendered_now = 0
    first_records = None
    t0 = time.perf_counter()
    for name, ds in wanted.items():
        if ds.format != "embedded":
            splits[name] = {"format": ds.format, "root": ds.root, "rendered": False}  # files: read where they are
            continue
        path = cache_path(cfg, ds)
        reused = path.is_file()
        records = dm.load_records(ds, f"data.{name}")
        if not path.is_file():
            raise RuntimeError(f"render: data.{name} loaded, but its cache file {path} is missing; the DataModule "
                               f"names embedded caches differently from lightning_synfer/tasks/render.py:cache_path")
        counts = Counter(r.label for r in records)
        splits[name] = {"format": "embedded", "split": ds.split, "seed": int(ds.seed), "num_images": len(records),
                        "per_class": {n: int(counts.get(i, 0)) for i, n in enumerate(names)},
                        "cache": str(path), "reused": reused}
        rendered_now += 0 if reused else len(records)
        if first_records is None:
            first_records = records
    wall = time.perf_counter() - t0
    embedded = {k: v for k, v in splits.items() if v["format"] == "embedded"}
    metrics: dict[str, Any] = {
        "task": "render", "experiment": cfg.experiment, "config_hash": run_dir.config_hash,
        "image_size": int(cfg.data.image_size), "channels": int(cfg.data.channels), "label_names": names,
        "splits": splits, "num_images": sum(v["num_images"] for v in embedded.values()),
        "num_rendered_now": rendered_now, "num_reused": sum(v["num_images"] for v in embedded.values() if v["reused"]),
        "wall_time_s": wall, "images_per_s": rendered_now / wall if rendered_now and wall > 0 else None,
    }
    if first_records:
        metrics["samples"] = str(sample_grid(first_records, names, run_dir.path / "samples.png"))
    for name, info in embedded.items():
        print(f"[synfer] render: data.{name} {info['num_images']} faces "
              f"({'cached' if info['reused'] else 'rendered'}) {info['cache']}", flush=True)
    return finish(run_dir, metrics)


def sample_grid(records: list, names: list[str], path: Path, per_class: int = SAMPLES_PER_CLASS) -> Path:
    """One row per class (name on the left), up to `per_class` faces each, written atomically as PNG."""
    from PIL import Image, ImageDraw

    from datamodules.atomic import atomic_path

    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(names))}
    for rec in records:
        if rec.array is not None and len(rows.setdefault(rec.label, [])) < per_class:
            rows[rec.label].append(rec.array)
    size = next(a.shape[0] for faces in rows.values() for a in faces)
    pad, margin = 2, 64
    grid = Image.new("RGB", (margin + per_class * (size + pad), len(names) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, name in enumerate(names):
        y = i * (size + pad)
        draw.text((2, y + size // 2 - 5), name, fill="black")
        for j, face in enumerate(rows.get(i, [])):
            grid.paste(Image.fromarray(face[..., 0] if face.shape[-1] == 1 else face).convert("RGB"),
                       (margin + j * (size + pad), y))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
