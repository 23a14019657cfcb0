"""`python run.py label synth.dir=DIR labelers=[CKPT,...] [label.min_confidence=P] [label.mode=none]`.

Pseudo-label rectification of a synthetic set: every ensemble member (any checkpoint `evaluate` accepts: the
diffusion labeler, supervised classifiers, SSL probes) predicts every record of manifest version
`label.source_version`, through trainer.predict under any strategy (DDP included) and the LabelWriter
(per-rank part files). Rank 0 then applies the rule of labeling/rectify.py and writes the NEXT manifest version
beside the old ones (manifest.v<N>.jsonl, atomic, never in place), plus label_summary.json and a confusion PNG
(intended vs rectified) in the run dir and as label_summary.v<N>.json / label_confusion.v<N>.png in DIR.

Predictions live in DIR/labeling/<key>/parts, key = hash(source manifest bytes, labeler files, mode): an
interrupted run resumes where it stopped, and a rerun with another label.min_confidence reuses the predictions.
The same command after a finished run writes nothing new and reports the version it wrote.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lightning_synfer.config.compose import ConfigError
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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    from datamodules.atomic import atomic_write_json
    from datamodules.synthetic import manifest_path, newest_version, read_manifest, write_manifest
    from lightning_synfer.checkpoints import ImageClassifier, load_module
    from lightning_synfer.runs import is_global_zero
    from lightning_synfer.tasks.evaluate import CLASSIFIER_TASKS
    from lightning_synfer.tasks.synthesize import generator_id
    from lightning_synfer.trainer import build_trainer

    if not cfg.synth.dir:
        raise ConfigError("label needs synth.dir=DIR (a synthetic dataset: dataset.json + manifest.jsonl)")
    lc = cfg.label
    labelers = [str(p) for p in cfg.labelers]
    if lc.mode == "rectify" and not labelers:
        raise ConfigError("label needs labelers=[CKPT,...] (FER classifier checkpoints: the diffusion labeler and/or "
                          "any `evaluate`-able ones), or label.mode=none to keep the intended labels")
    if lc.mode == "none" and labelers:
        raise ConfigError(f"label.mode=none keeps the intended labels; labelers={labelers} would be ignored "
                          f"(drop them or use label.mode=rectify)")
    for i, p in enumerate(labelers):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"labelers[{i}]={p}: no such checkpoint file")
    root = str(cfg.synth.dir)
    header, records = read_manifest(root, version=int(lc.source_version))
    label_names = list(header["label_names"])
    source = manifest_path(root, int(lc.source_version))
    member_ids = [generator_id(p) for p in labelers]
    key = hashlib.sha256(json.dumps({"source": _sha256(source), "labelers": member_ids, "mode": lc.mode,
                                     "labels": label_names}, sort_keys=True).encode()).hexdigest()[:12]
    work = Path(root) / WORK_DIR / key
    settings = json.dumps({"min_confidence": lc.min_confidence}, sort_keys=True)
    run_dir = start_run(cfg, argv)
    written = _read_json(work / WRITTEN_FILE)
    if settings in written and os.path.isfile(written[settings]["manifest"]):
        if not is_global_zero():
            return {}
        prev = written[settings]
        print(f"[synfer] label: already done: {prev['manifest']} (version {prev['version']}); nothing to do",
              flush=True)
        summary = _read_json(Path(root) / f"label_summary.v{prev['version']}.json")
        return finish(run_dir, _metrics(summary, root, prev["manifest"], prev["version"], labelers, resumed=True))

    probs: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    num_new = 0
    if lc.mode == "rectify":
        expected = {r["id"] for r in records}
        # Snapshot before any rank writes, so every rank shards the same remaining list.
        probs, bad = read_predictions(work, len(labelers), len(label_names), expected)
        remaining = [r for r in records if r["id"] not in probs and r["id"] not in bad]
        if remaining:
            members, maps = [], []
            for i, p in enumerate(labelers):
                clf = ImageClassifier(load_module(p, tasks=CLASSIFIER_TASKS)).eval()
                maps.append(label_index_map(clf.label_names, label_names, f"labelers[{i}]={p}"))
                members.append(clf)
            size, channels = _geometry(root, header, records)
            dataset = ManifestImages(root, remaining, size, channels, cfg.data.on_bad_image)
            loader = DataLoader(dataset, batch_size=int(lc.batch_size), shuffle=False,
                                num_workers=int(cfg.data.num_workers))
            work.mkdir(parents=True, exist_ok=True)
            writer = LabelWriter(work, label_names=label_names)
            trainer = build_trainer(cfg, run_dir, use_distributed_sampler=True, monitor=None,
                                    enable_checkpointing=False, callbacks=[writer, *callbacks], logger=False)
            if trainer.is_global_zero:
                print(f"[synfer] label: {len(remaining)} of {len(records)} records to predict with "
                      f"{len(labelers)} labeler(s) ({len(records) - len(remaining)} already in {work})", flush=True)
            trainer.predict(EnsembleModule(members, maps, len(label_names)), dataloaders=loader,
                            return_predictions=False)
            if not trainer.is_global_zero:
                return {}
            before = len(probs) + len(bad)
            probs, bad = read_predictions(work, len(labelers), len(label_names), expected)
            num_new = len(probs) + len(bad) - before
    if not is_global_zero():
        return {}

    new, summary = rectify(records, probs, label_names, min_confidence=lc.min_confidence, mode=lc.mode,
                           bad_ids=list(bad))
    version = newest_version(root) + 1
    path = write_manifest(root, new, version=version)  # atomic; an existing version is never replaced
    summary.update(source_manifest=source, manifest=path, version=version, labelers=labelers,
                   labeler_ids=member_ids, work_dir=str(work), num_predicted_now=num_new,
                   bad_images=dict(list(bad.items())[:100]))
    atomic_write_json(Path(run_dir.path) / "label_summary.json", summary)
    atomic_write_json(Path(root) / f"label_summary.v{version}.json", summary)
    _save_confusion(summary, [Path(run_dir.path) / "label_confusion.png",
                              Path(root) / f"label_confusion.v{version}.png"],
                    f"{Path(root).name}: intended vs rectified (v{version})")
    written[settings] = {"manifest": path, "version": version}
    atomic_write_json(work / WRITTEN_FILE, written)
    print(format_summary(summary), flush=True)
    print(f"[synfer] label: wrote {path} ({summary['num_kept']} of {summary['num_records']} records)", flush=True)
    return finish(run_dir, _metrics(summary, root, path, version, labelers, resumed=False, num_new=num_new))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _metrics(summary: dict, root: str, manifest: str, version: int, labelers: list[str], *, resumed: bool,
             num_new: int = 0) -> dict[str, Any]:
    keep = ("mode", "num_records", "num_kept", "num_changed", "num_soft", "num_dropped", "num_bad", "num_agreed",
            "agreement_rate", "mean_agreement", "min_confidence")
    per_class = {name: row.get("agreement_rate") for name, row in summary.get("per_class", {}).items()}
    return {"task": "label", "dir": root, "manifest": manifest, "version": version, "labelers": labelers,
            "already_done": resumed, "num_predicted_now": num_new, **{k: summary.get(k) for k in keep},
            "agreement_rate_per_class": per_class, **peak_memory_mb()}
