"""`python run.py au-sweep synthesis.generator=PATH [au_sweep.aus=[AU12,AU4]] [au_sweep.values=[0,0.5,1]]`.

The paper's fine-grained control shown: one identity (x_T from `au_sweep.seed`, the caption `au_sweep.caption`)
with one AU raised across a row (`au_sweep.values`), one row per AU of `au_sweep.aus`, every other AU at 0. The
generator and its FAU adapter come from synthesis.generator, the sampler from sampling.* (as in `synthesize`;
the images go through the same SynthesisModule and trainer.predict, so precision and device are the config's).

Writes to the run dir:

    au_sweep.png   rows labelled with the AU (and its FACS name), columns with the AU value
    metrics.json   per AU its index in the generator's AU list and, per value, the mean absolute pixel change
                   against the all-zero AU vector (pixels in [0, 1]); `zero_vs_no_au`: how far the all-zero
                   AU vector's image is from the image sampled with no AU condition at all (they should agree)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.au_vocabulary import FACS_AU_PHRASES, canonical_au
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.sampling.ddim import SamplerSettings
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run
from lightning_synfer.tasks.synthesize import SynthesisModule, collate_specs, generator_id, load_generator

IMAGE = "au_sweep.png"


def resolve_aus(asked: Sequence[str], au_names: Sequence[str],
                generator: str = "the generator") -> list[tuple[str, int]]:
    """(the generator's name, its index) of every asked AU, compared in canonical spelling (AU04 == AU4)."""
    index = {canonical_au(n): i for i, n in enumerate(au_names)}
    out = []
    for name in asked:
        canon = canonical_au(name)
        if canon not in index:
            raise ConfigError(f"au_sweep.aus: {name!r} ({canon}) is not an AU of {generator}; its FAU adapter takes "
                              f"{list(au_names)}")
        out.append((str(au_names[index[canon]]), index[canon]))
    return out


def sweep_items(aus: list[tuple[str, int]], values: Sequence[float], num_aus: int, caption: str,
                seed: int) -> list[dict[str, Any]]:
    """Spec-shaped items (synthesize.collate_specs): item 0 is the all-zero AU vector, then row by row."""
    def item(i: int, rid: str, vec: list[float]) -> dict[str, Any]:
        return {"id": rid, "index": i, "label": 0, "aus": vec, "caption": caption, "caption_source": "au_sweep",
                "seed": int(seed)}

    items = [item(0, "zero", [0.0] * num_aus)]
    for name, k in aus:
        for v in values:
            vec = [0.0] * num_aus
            vec[k] = float(v)
            items.append(item(len(items), f"{name}={float(v):g}", vec))
    return items


def _loader(items: list[dict[str, Any]], batch_size: int) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_specs)


def generate(cfg: DictConfig, gen: Any, items: list[dict[str, Any]], run_dir: Any) -> tuple[np.ndarray, np.ndarray]:
    """(images of `items` as uint8 (N, H, W[, C]), the image sampled with no AU condition (aus=None))."""
    from lightning_synfer.trainer import build_trainer

    module = SynthesisModule(gen, SamplerSettings.from_config(cfg.sampling), generator_id="au-sweep")
    no_au = [{**items[0], "id": "no_au", "aus": None}]
    # One device, one process: a dozen images need no sharding (and every rank would need all of them).
    trainer = build_trainer(cfg, run_dir, monitor=None, enable_checkpointing=False, logger=False,
                            use_distributed_sampler=False, devices=1, num_nodes=1, strategy="auto")
    out = trainer.predict(module, dataloaders=[_loader(items, int(cfg.au_sweep.batch_size)), _loader(no_au, 1)])
    sweep, none = out
    images = np.concatenate([b["images"] for b in sweep])
    return images, none[0]["images"][0]


def mean_abs_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two uint8 images, on the [0, 1] scale."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() / 255.0)


def sweep_image(rows: list[tuple[str, list[np.ndarray]]], values: Sequence[float], path: Path, cell: int = 96) -> Path:
    """One row per AU (its name and FACS phrase on the left), one column per value (header on top)."""
    from PIL import Image, ImageDraw

    from datamodules.atomic import atomic_path

    pad, margin, header = 4, 150, 18
    n_cols = len(values)
    grid = Image.new("RGB", (margin + n_cols * (cell + pad), header + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, v in enumerate(values):
        draw.text((margin + j * (cell + pad) + cell // 2 - 22, 3), f"{name_value(v)}", fill="black")
    for i, (name, faces) in enumerate(rows):
        y = header + i * (cell + pad)
        draw.text((4, y + cell // 2 - 12), name, fill="black")
        phrase = FACS_AU_PHRASES.get(canonical_au(name), "")
        if phrase:
            draw.text((4, y + cell // 2 + 2), phrase[:24], fill="dimgray")
        for j, face in enumerate(faces):
            img = Image.fromarray(face).convert("RGB").resize((cell, cell), Image.NEAREST)
            grid.paste(img, (margin + j * (cell + pad), y))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def name_value(v: float) -> str:
    return f"AU = {float(v):.2f}"


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, generator: Any = None) -> dict[str, Any]:
    """`generator`: an already built GeneratorModule (tests, notebooks) instead of synthesis.generator."""
    w = cfg.au_sweep
    gen = generator if generator is not None else load_generator(cfg)
    gen.eval()
    where = f"the generator {cfg.synthesis.generator}" if generator is None else "the generator"
    if getattr(gen, "au_adapter", None) is None:
        raise ConfigError(f"au-sweep: {where} has no FAU adapter (generator.au_adapter=false); the sweep needs one, "
                          f"e.g. the export of `fit experiment=generator/embedded_finetune`")
    au_names = list(gen.au_names)
    aus = resolve_aus(list(w.aus), au_names, where)
    values = [float(v) for v in w["values"]]
    gen_id = generator_id(cfg.synthesis.generator) if generator is None else getattr(gen, "generator_id", "in-memory")
    run_dir = start_run(cfg, argv)
    items = sweep_items(aus, values, len(au_names), str(w.caption), int(w.seed))
    t0 = time.perf_counter()
    images, no_au = generate(cfg, gen, items, run_dir)
    wall = time.perf_counter() - t0
    zero = images[0]
    rows, per_au = [], {}
    for r, (name, k) in enumerate(aus):
        faces = list(images[1 + r * len(values): 1 + (r + 1) * len(values)])
        rows.append((name, faces))
        change = [mean_abs_change(f, zero) for f in faces]
        per_au[name] = {"asked": str(w.aus[r]), "index": k, "values": values, "mean_abs_change": change,
                        "max_mean_abs_change": max(change)}
    path = sweep_image(rows, values, Path(run_dir.path) / IMAGE, cell=int(w.cell_size))
    diff = np.abs(zero.astype(np.int16) - no_au.astype(np.int16))
    metrics = {"task": "au-sweep", "generator": gen_id, "au_names": au_names, "caption": str(w.caption),
               "seed": int(w.seed), "values": values, "aus": per_au, "image": str(path),
               "image_size": int(zero.shape[0]), "num_images": int(len(images) + 1),
               "zero_vs_no_au": {"mean_abs_diff": float(diff.mean() / 255.0),
                                 "max_abs_diff": float(diff.max() / 255.0)},
               "sampling": {"steps": int(cfg.sampling.steps), "text_scale": float(cfg.sampling.text_scale),
                            "au_scale_cfg": float(cfg.sampling.au_scale_cfg)},
               "wall_time_s": wall, **peak_memory_mb()}
    shown = ", ".join(f"{n} {v['max_mean_abs_change']:.3f}" for n, v in per_au.items())
    print(f"[synfer] au-sweep: {len(aus)} AUs x {len(values)} values, largest mean |change| vs AU=0: {shown}; "
          f"{path}", flush=True)
    return finish(run_dir, metrics)
