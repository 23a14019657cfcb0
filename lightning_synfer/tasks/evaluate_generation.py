"""`python run.py evaluate-generation generation_eval.dataset=DIR generation_eval.judge=CLASSIFIER
[generation_eval.real.root=DIR] [generation_eval.features=...]`.

Writes metrics.json: FER accuracy of the judge vs the intended labels (overall, per class), AU MAE and
accuracy (judges with an AU head), FID/KID against generation_eval.real.root, per-class counts. See
metrics/generation.py.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from lightning_synfer.checkpoints import ImageClassifier, load_module
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.metrics.generation import (BackboneFeatures, GenerationJudge, au_index_pairs, build_fid_kid,
                                                 finite_or_none, label_index_map)
from lightning_synfer.sampling.inversion import list_layout_images
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run, timed
from lightning_synfer.tasks.evaluate import CLASSIFIER_TASKS


def load01(path: str, size: int, channels: int) -> torch.Tensor:
    """(C, size, size) float in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def feature_extractor(cfg: DictConfig, judge: ImageClassifier) -> Any:
    j = cfg.generation_eval
    if j.features == "inception":
        if not j.inception_weights or not os.path.isfile(j.inception_weights):
            raise ConfigError(f"generation_eval.features=inception needs generation_eval.inception_weights=FILE "
                              f"(local torch-fidelity Inception weights; nothing is downloaded), got "
                              f"{j.inception_weights!r}")
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ConfigError("generation_eval.features=inception needs the torch-fidelity package; "
                              "use generation_eval.features=backbone instead")
        return 2048
    clf = judge if not j.feature_ckpt else ImageClassifier(load_module(j.feature_ckpt, tasks=CLASSIFIER_TASKS))
    return BackboneFeatures(clf)


def split_by_judge_classes(header: dict, records: list[dict], label_map: Sequence[int]) -> tuple[list[dict], dict]:
    """(records of classes the judge knows, {class name: count} of the others)."""
    kept = [r for r in records if label_map[r["label"]] >= 0]
    excluded: dict[str, int] = {}
    for r in records:
        if label_map[r["label"]] < 0:
            name = header["label_names"][r["label"]]
            excluded[name] = excluded.get(name, 0) + 1
    return kept, excluded


def real_image_paths(real: DictConfig) -> list[str]:
    """The real faces of generation_eval.real (a fixed random subset of max_images), [] without a root."""
    if not real.root:
        return []
    paths = list_layout_images(real.root, real.format, real.split, key="generation_eval.real.root")
    if real.max_images and len(paths) > real.max_images:
        pick = np.sort(np.random.default_rng(0).choice(len(paths), real.max_images, replace=False))
        paths = [paths[i] for i in pick]
    return paths


def fid_kid_metrics(fid: Any, kid: Any, kid_size: int, ev: DictConfig, num_real: int) -> dict[str, Any]:
    torch.manual_seed(0)  # KID draws random subsets
    out: dict[str, Any] = {"fid": finite_or_none(fid.compute()), "kid": None}
    if kid_size >= 2:
        kid_mean, kid_std = kid.compute()
        out["kid"], out["kid_std"] = finite_or_none(kid_mean), finite_or_none(kid_std)
    out["fid_features"] = "inception" if ev.features == "inception" else f"backbone:{ev.feature_ckpt or ev.judge}"
    out["num_real"] = num_real
    out["kid_subset_size"] = kid_size
    return out


def run(cfg: DictConfig, argv: Optional[list[str]] = None) -> dict[str, Any]:
    from datamodules.synthetic import read_manifest, resolve_inside

    ev = cfg.generation_eval
    if not ev.dataset:
        raise ConfigError("evaluate-generation needs generation_eval.dataset=DIR (a synthetic dataset: dataset.json "
                          "+ manifest)")
    if not ev.judge:
        raise ConfigError("evaluate-generation needs generation_eval.judge=PATH (a FER classifier checkpoint)")
    root = str(ev.dataset)
    header, records = read_manifest(root)
    module = load_module(ev.judge, tasks=CLASSIFIER_TASKS)
    judge = ImageClassifier(module).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge.to(device)
    run_dir = start_run(cfg, argv)

    label_map = label_index_map(header["label_names"], judge.label_names)
    au_names = header.get("au_names", [])
    au_pairs = None
    if getattr(module, "au_head", None) is not None and au_names:
        au_pairs = au_index_pairs(au_names, getattr(module, "au_names", []))
    scorer = GenerationJudge(judge, judge.label_names, au_pairs, ev.au_threshold)
    kept, excluded = split_by_judge_classes(header, records, label_map)
    if not kept:
        raise ValueError(f"generation_eval.dataset={root}: none of its {len(records)} images has a class the judge "
                         f"knows ({judge.label_names})")
    size, channels = int(header.get("image_size") or 0), int(header.get("channels") or 3)
    if not size:
        with Image.open(resolve_inside(root, kept[0]["image"])) as im:
            size = im.size[0]

    real_paths = real_image_paths(ev.real)
    fid = kid = None
    kid_size = min(ev.kid_subset_size, len(real_paths), len(kept))
    if real_paths:
        fid, kid = build_fid_kid(feature_extractor(cfg, judge), max(2, kid_size),
                                 inception_weights=ev.inception_weights)
        fid, kid = fid.to(device), kid.to(device)
    with timed() as clock:
        for chunk in _batches(kept, ev.batch_size):
            images = torch.stack([load01(resolve_inside(root, r["image"]), size, channels) for r in chunk]).to(device)
            labels = torch.tensor([label_map[r["label"]] for r in chunk])
            aus = None
            if au_pairs and all(r.get("aus") is not None for r in chunk):
                aus = torch.tensor([r["aus"] for r in chunk], dtype=torch.float32)
            scorer.update(images, labels, aus)
            if fid is not None:
                fid.update(images, real=False)
                kid.update(images, real=False)
        for chunk in _batches(real_paths, ev.batch_size):
            images = torch.stack([load01(p, size, channels) for p in chunk]).to(device)
            fid.update(images, real=True)
            kid.update(images, real=True)
    metrics = scorer.report(au_names)
    metrics.update({"task": "evaluate-generation", "dataset": root, "judge": str(ev.judge),
                    "generator": header.get("generator"), "excluded_classes": excluded,
                    "num_records": len(records), "wall_time_s": clock["wall_time_s"], **peak_memory_mb()})
    if fid is not None:
        metrics.update(fid_kid_metrics(fid, kid, kid_size, ev, len(real_paths)))
    print(f"[synfer] evaluate-generation: {metrics['num_images']} images, FER accuracy "
          f"{metrics['fer_accuracy']:.4f}" + (f", FID {metrics['fid']:.3f}" if metrics.get("fid") is not None else "")
          + (f", AU MAE {metrics['au']['mae']:.4f}" if "au" in metrics else ""), flush=True)
    return finish(run_dir, metrics)
