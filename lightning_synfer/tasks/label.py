"""`python run.py label labeling.dataset=DIR labeling.ensemble=[CKPT,...] [labeling.min_confidence=P]
[labeling.mode=none]`.

Pseudo-label rectification of a synthetic set: every ensemble member (any checkpoint `evaluate` accepts: the
diffusion labeler, supervised classifiers, SSL probes) predicts every record of manifest version
`labeling.source_version`, through trainer.predict under any strategy (DDP included) and the LabelWriter
(per-rank part files). Rank 0 then applies the rule of labeling/rectify.py and writes the NEXT manifest version
beside the old ones (manifest.v<N>.jsonl, atomic, never in place), plus label_summary.json and a confusion PNG
(intended vs rectified) in the run dir and as label_summary.v<N>.json / label_confusion.v<N>.png in DIR.

Predictions live in DIR/labeling/<key>/parts, key = hash(source manifest bytes, member files, mode): an
interrupted run resumes where it stopped, and a rerun with another labeling.min_confidence reuses the predictions.
The same command after a finished run writes nothing new and reports the version it wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lightning_synfer.config.errors import ConfigError
from lightning_synfer.labeling.rectify import format_summary, rectify
from lightning_synfer.labeling.writer import LabelWriter, read_predictions
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run

WORK_DIR = "labeling"
WRITTEN_FILE = "written.json"


class ManifestImages(Dataset):
    """Records of a synthetic set -> images in [0, 1] at one size; undecodable ones flagged (or raised)."""

    def __init__(self, root: str, records: Sequence[dict], size: int, channels: int, on_bad_image: str) -> None:
        from datamodules.synthetic import InsideResolver

        resolver = InsideResolver(root)
        self.paths = [resolver.resolve(r["image"], source=f"{root}: record {r['id']!r}") for r in records]
        self.ids = [r["id"] for r in records]
        self.index = [int(r.get("index", i)) for i, r in enumerate(records)]
        self.size, self.channels, self.on_bad_image = int(size), int(channels), on_bad_image

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        from lightning_synfer.tasks.evaluate_generation import load01

        bad = ""
        try:
            image = load01(self.paths[i], self.size, self.channels)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if self.on_bad_image == "error":
                raise ValueError(f"{self.paths[i]}: cannot decode the image of record {self.ids[i]!r} ({exc}); "
                                 f"set data.on_bad_image=skip to leave it out of the new version") from exc
            image, bad = torch.zeros(self.channels, self.size, self.size), f"{type(exc).__name__}: {exc}"
        return {"image": image, "id": self.ids[i], "index": self.index[i], "bad": bad}


def label_index_map(model_labels: Sequence[str], set_labels: Sequence[str], source: str) -> list[int]:
    """For each class of the model, its index in the set's label space (-1: the set lacks it)."""
    from datamodules.labels import canonical_name

    names = [canonical_name(n) for n in set_labels]
    out = [names.index(canonical_name(n)) if canonical_name(n) in names else -1 for n in model_labels]
    if all(i < 0 for i in out):
        raise ValueError(f"{source}: the model's classes {list(model_labels)} share none with the set's "
                         f"{list(set_labels)}")
    return out


class EnsembleModule(L.LightningModule):
    """predict_step: images in [0, 1] -> every member's probabilities, mapped into the set's label space."""

    def __init__(self, members: Sequence[torch.nn.Module], index_maps: Sequence[Sequence[int]], num_classes: int):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.num_classes = int(num_classes)
        for i, m in enumerate(index_maps):
            self.register_buffer(f"map{i}", torch.tensor(list(m), dtype=torch.long), persistent=False)

    def set_probs(self, i: int, probs: torch.Tensor) -> torch.Tensor:
        # Classes the set lacks lose their mass and the rest is renormalised (datamodules.synthetic.remap_soft).
        idx = getattr(self, f"map{i}")
        keep = idx >= 0
        out = torch.zeros(probs.shape[0], self.num_classes, dtype=probs.dtype, device=probs.device)
        out.index_add_(1, idx[keep], probs[:, keep])
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        images = batch["image"]
        probs = [self.set_probs(i, torch.softmax(m(images).float(), dim=-1)) for i, m in enumerate(self.members)]
        return {"id": list(batch["id"]), "index": batch["index"].tolist(), "bad": list(batch["bad"]),
                "probs": torch.stack(probs, dim=1).double().cpu().numpy()}


def _sha256(path: str) -> str:
    from lightning_synfer.pretrained import sha256

    return sha256(Path(path))


def _geometry(root: str, header: dict, records: Sequence[dict]) -> tuple[int, int]:
    size, channels = header.get("image_size"), header.get("channels")
    if not size and records:
        from PIL import Image

        from datamodules.synthetic import resolve_inside

        with Image.open(resolve_inside(root, records[0]["image"])) as im:
            size = im.size[0]
    return int(size or 64), int(channels or 3)


def _save_confusion(summary: dict, paths: Sequence[Path], title: str) -> None:
    import matplotlib.pyplot as plt

    from datamodules.atomic import atomic_path
    from lightning_synfer.metrics.fer import confusion_figure

    fig = confusion_figure(np.asarray(summary["confusion"]), summary["label_names"], title=title)
    fig.axes[0].set_xlabel("rectified")
    fig.axes[0].set_ylabel("intended")
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)


@dataclass
class LabelingJob:
    """One `label` run: the source manifest, the ensemble and where its predictions are kept."""

    root: str  # the synthetic dataset
    source: str  # the manifest whose intended labels are checked
    header: dict
    records: list[dict]
    ensemble: list[str]  # member checkpoints
    member_ids: list[str]  # name@hash of each member file
    mode: str
    work: Path  # DIR/labeling/<key>: prediction parts and the versions written from them

    @property
    def label_names(self) -> list[str]:
        return list(self.header["label_names"])


def ensemble_paths(lc: DictConfig) -> list[str]:
    """The checked member checkpoints of the `labeling` section (empty for mode=none)."""
    if not lc.dataset:
        raise ConfigError("label needs labeling.dataset=DIR (a synthetic dataset: dataset.json + manifest.jsonl)")
    ensemble = [str(p) for p in lc.ensemble]
    if lc.mode == "rectify" and not ensemble:
        raise ConfigError("label needs labeling.ensemble=[CKPT,...] (FER classifier checkpoints: the diffusion labeler "
                          "and/or any `evaluate`-able ones), or labeling.mode=none to keep the intended labels")
    if lc.mode == "none" and ensemble:
        raise ConfigError(f"labeling.mode=none keeps the intended labels; labeling.ensemble={ensemble} would be "
                          f"ignored (drop it or use labeling.mode=rectify)")
    for i, p in enumerate(ensemble):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"labeling.ensemble[{i}]={p}: no such checkpoint file")
    return ensemble


def labeling_job(lc: DictConfig) -> LabelingJob:
    from datamodules.synthetic import manifest_path, read_manifest
    from lightning_synfer.tasks.synthesize import generator_id

    ensemble = ensemble_paths(lc)
    root = str(lc.dataset)
    header, records = read_manifest(root, version=int(lc.source_version))
    source = manifest_path(root, int(lc.source_version))
    member_ids = [generator_id(p) for p in ensemble]
    # "labelers" is the historical name in this hash: renaming it would orphan existing prediction parts.
    key = hashlib.sha256(json.dumps({"source": _sha256(source), "labelers": member_ids, "mode": str(lc.mode),
                                     "labels": list(header["label_names"])}, sort_keys=True).encode()).hexdigest()[:12]
    return LabelingJob(root, source, header, records, ensemble, member_ids, str(lc.mode), Path(root) / WORK_DIR / key)


def load_ensemble(job: LabelingJob) -> EnsembleModule:
    from lightning_synfer.checkpoints import ImageClassifier, load_module
    from lightning_synfer.tasks.evaluate import CLASSIFIER_TASKS

    members, maps = [], []
    for i, p in enumerate(job.ensemble):
        clf = ImageClassifier(load_module(p, tasks=CLASSIFIER_TASKS)).eval()
        maps.append(label_index_map(clf.label_names, job.label_names, f"labeling.ensemble[{i}]={p}"))
        members.append(clf)
    return EnsembleModule(members, maps, len(job.label_names))


def predict_ensemble(cfg: DictConfig, job: LabelingJob, run_dir: Any,
                     callbacks: Sequence[Any]) -> Optional[tuple[dict[str, np.ndarray], dict[str, str], int]]:
    """Every member's probabilities for every record: (probs, bad images, how many were predicted now).

    Resumes from the part files in job.work. None on the ranks other than 0, which have nothing more to do."""
    from lightning_synfer.trainer import build_trainer

    expected = {r["id"] for r in job.records}
    # Snapshot before any rank writes, so every rank shards the same remaining list.
    probs, bad = read_predictions(job.work, len(job.ensemble), len(job.label_names), expected)
    remaining = [r for r in job.records if r["id"] not in probs and r["id"] not in bad]
    if not remaining:
        return probs, bad, 0
    module = load_ensemble(job)
    size, channels = _geometry(job.root, job.header, job.records)
    dataset = ManifestImages(job.root, remaining, size, channels, cfg.data.on_bad_image)
    loader = DataLoader(dataset, batch_size=int(cfg.labeling.batch_size), shuffle=False,
                        num_workers=int(cfg.data.num_workers))
    job.work.mkdir(parents=True, exist_ok=True)
    writer = LabelWriter(job.work, label_names=job.label_names)
    trainer = build_trainer(cfg, run_dir, use_distributed_sampler=True, monitor=None,
                            enable_checkpointing=False, callbacks=[writer, *callbacks], logger=False)
    if trainer.is_global_zero:
        print(f"[synfer] label: {len(remaining)} of {len(job.records)} records to predict with "
              f"{len(job.ensemble)} ensemble member(s) ({len(job.records) - len(remaining)} already in {job.work})",
              flush=True)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    before = len(probs) + len(bad)
    probs, bad = read_predictions(job.work, len(job.ensemble), len(job.label_names), expected)
    return probs, bad, len(probs) + len(bad) - before


def write_rectified(job: LabelingJob, run_dir: Any, probs: dict[str, np.ndarray], bad: dict[str, str],
                    min_confidence: Optional[float], num_new: int, intended_weight: float = 0.0) -> tuple[dict, str, int]:
    """Apply the rule and write the next manifest version, its summary and confusion figure: (summary, path, v)."""
    from datamodules.atomic import atomic_write_json
    from datamodules.synthetic import newest_version, write_manifest

    new, summary = rectify(job.records, probs, job.label_names, min_confidence=min_confidence, mode=job.mode,
                           bad_ids=list(bad), intended_weight=intended_weight)
    version = newest_version(job.root) + 1
    path = write_manifest(job.root, new, version=version)  # atomic; an existing version is never replaced
    summary.update(source_manifest=job.source, manifest=path, version=version, ensemble=job.ensemble,
                   ensemble_ids=job.member_ids, work_dir=str(job.work), num_predicted_now=num_new,
                   bad_images=dict(list(bad.items())[:100]))
    root = Path(job.root)
    atomic_write_json(Path(run_dir.path) / "label_summary.json", summary)
    atomic_write_json(root / f"label_summary.v{version}.json", summary)
    _save_confusion(summary, [Path(run_dir.path) / "label_confusion.png", root / f"label_confusion.v{version}.png"],
                    f"{root.name}: intended vs rectified (v{version})")
    return summary, path, version


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    from datamodules.atomic import atomic_write_json
    from lightning_synfer.runs import is_global_zero

    lc = cfg.labeling
    job = labeling_job(lc)
    # One manifest version per min_confidence: the same command after a finished run writes nothing new.
    settings = json.dumps({"min_confidence": lc.min_confidence, "intended_weight": lc.intended_weight}, sort_keys=True)
    run_dir = start_run(cfg, argv)
    written = _read_json(job.work / WRITTEN_FILE)
    if settings in written and os.path.isfile(written[settings]["manifest"]):
        if not is_global_zero():
            return {}
        prev = written[settings]
        print(f"[synfer] label: already done: {prev['manifest']} (version {prev['version']}); nothing to do",
              flush=True)
        summary = _read_json(Path(job.root) / f"label_summary.v{prev['version']}.json")
        return finish(run_dir, _metrics(summary, job, prev["manifest"], prev["version"], resumed=True))

    probs: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    num_new = 0
    if job.mode == "rectify":
        predicted = predict_ensemble(cfg, job, run_dir, callbacks)
        if predicted is None:
            return {}
        probs, bad, num_new = predicted
    if not is_global_zero():
        return {}
    summary, path, version = write_rectified(job, run_dir, probs, bad, lc.min_confidence, num_new,
                                             float(lc.intended_weight))
    written[settings] = {"manifest": path, "version": version}
    atomic_write_json(job.work / WRITTEN_FILE, written)
    print(format_summary(summary), flush=True)
    print(f"[synfer] label: wrote {path} ({summary['num_kept']} of {summary['num_records']} records)", flush=True)
    return finish(run_dir, _metrics(summary, job, path, version, resumed=False, num_new=num_new))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _metrics(summary: dict, job: LabelingJob, manifest: str, version: int, *, resumed: bool,
             num_new: int = 0) -> dict[str, Any]:
    keep = ("mode", "num_records", "num_kept", "num_changed", "num_soft", "num_dropped", "num_bad", "num_agreed",
            "agreement_rate", "mean_agreement", "min_confidence")
    per_class = {name: row.get("agreement_rate") for name, row in summary.get("per_class", {}).items()}
    return {"task": "label", "dataset": job.root, "manifest": manifest, "version": version, "ensemble": job.ensemble,
            "already_done": resumed, "num_predicted_now": num_new, **{k: summary.get(k) for k in keep},
            "agreement_rate_per_class": per_class, **peak_memory_mb()}
