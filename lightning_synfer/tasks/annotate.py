"""`python run.py annotate annotate.root=DIR annotate.out=DIR [annotate.format=rafdb] annotate.aus.source=...
annotate.captions.source=...`: real faces -> a FEText-style set in our dataset format.

The faces (a folder, or a labelled adapter: folder/FER2013, rafdb, affectnet, sfew) are listed in sorted order;
their AUs come from a tool's CSV (OpenFace, py-feat, LibreFace; annotation/tool_csv.py) or a user's AU model,
their captions from a file, a local image-to-text model or the templates (annotation/models.py). Faces the
detector failed on are counted, left out and listed in the run dir (`failed_faces.txt`). The rest go through
trainer.predict like synthesis: the distributed sampler shards them over ranks, each rank copies its images
atomically and appends its manifest lines to a part file, rank 0 merges (synthesis/merge.py). A rerun of the
same command resumes: faces whose image and line exist are skipped. With annotate.out=annotate.root the manifest
goes INTO the dataset root and points at the images in place (the FEText layout of docs/REPRODUCE.md). The output's header says `domain: real`,
so a DataModule reads the faces as real ones (`data.train.format=synthetic data.train.root=OUT`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic import atomic_write_bytes, atomic_write_lines
from datamodules.labels import LabelSpace
from lightning_synfer.config.compose import to_container
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.synthesis.merge import check_info, collect_records, done_ids, merge
from lightning_synfer.synthesis.writer import SynthesisWriter
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run
from lightning_synfer.trainer import build_trainer

FAILED_FILE = "failed_faces.txt"
INFO_FILE = "annotation.json"  # what produced the records; a rerun with other settings is refused


def face_id(rel: str) -> str:
    """A record id from the image's path below the root: readable, unique, stable across reruns."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace(os.sep, "/").replace("/", "__"))


def list_faces(a: DictConfig, label_space: LabelSpace) -> list[dict[str, Any]]:
    """[{id, path, rel, label}] in sorted path order; label None for a plain folder of images."""
    from lightning_synfer.sampling.inversion import list_layout_images

    root = str(a.root)
    if a.format == "images":
        paths, labels = list_layout_images(root, "images", key="annotate.root"), None
    else:
        from datamodules.adapters import load_records

        records = sorted((r for r in load_records(a.format, root, a.split, label_space, key="annotate.root")
                          if isinstance(r.image, str)), key=lambda r: r.image)
        paths, labels = [r.image for r in records], [int(r.label) for r in records]
    faces = []
    for i, path in enumerate(paths):
        rel = os.path.relpath(path, root)
        faces.append({"id": face_id(rel), "path": path, "rel": rel, "ordinal": i,
                      "label": labels[i] if labels is not None else None})
    return faces


class FaceDataset(Dataset):
    def __init__(self, faces: Sequence[dict]) -> None:
        self.faces = list(faces)

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, i: int) -> dict:
        return self.faces[i]


def collate_faces(items: list[dict]) -> dict[str, list]:
    return {key: [it.get(key) for it in items] for key in items[0]}


class AnnotationModule(L.LightningModule):
    """predict_step: a batch of faces -> manifest records (AUs from the table or the model, captions)."""

    def __init__(self, a: DictConfig, label_names: Sequence[str], au_names: Sequence[str], au_model: Any = None,
                 captioner: Any = None, captions: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.a, self.label_names, self.au_names = a, list(label_names), list(au_names)
        self.au_model, self.captioner, self.captions = au_model, captioner, captions

    def predict_step(self, batch: dict[str, list], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        from lightning_synfer.annotation.models import lookup_caption, model_input, template_caption

        aus = list(batch["aus"])
        if self.au_model is not None:
            u = self.a.aus
            images = torch.stack([model_input(p, u.image_size, u.channels, u.mean, u.std) for p in batch["path"]])
            aus = self.au_model(images.to(self.device))
        if self.captioner is not None:
            captions, source = self.captioner(batch["path"]), "model"
            sources = [source] * len(captions)
        else:
            captions, sources = [], []
            for path, rel, label, vec in zip(batch["path"], batch["rel"], batch["label"], aus):
                text = lookup_caption(self.captions, path, rel) if self.captions is not None else None
                name = self.label_names[label] if label is not None else None
                captions.append(text if text is not None else template_caption(name, vec, self.au_names))
                sources.append("file" if text is not None else "templates")
        records = []
        for i, fid in enumerate(batch["id"]):
            rec: dict[str, Any] = {"id": fid, "index": int(batch["ordinal"][i]), "source_image": batch["rel"][i],
                                   "caption": captions[i], "caption_source": sources[i]}
            if batch["label"][i] is not None:
                rec["label"] = int(batch["label"][i])
            if aus[i] is not None:
                rec["aus"] = [round(float(v), 6) for v in aus[i]]
            records.append(rec)
        return {"records": records, "paths": list(batch["path"])}


class AnnotationWriter(SynthesisWriter):
    """SynthesisWriter's parts, resume and merge; the real image's bytes are copied instead of a PNG encoded. With
    `in_place` (annotate.out is annotate.root: the FEText layout the paper configs read, a manifest INTO the
    AffectNet root) the records point at the images where they are and nothing is copied."""

    def __init__(self, *args: Any, in_place: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_place = in_place

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Optional[Sequence[int]],
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        lines = []
        for path, rec in zip(prediction["paths"], prediction["records"]):
            if self.in_place:
                lines.append(json.dumps({**rec, "image": rec["source_image"]}, ensure_ascii=False, allow_nan=False))
                continue
            ext = Path(path).suffix.lower() or ".png"
            rel = f"images/{rec['index'] // self.shard_size:05d}/{rec['id']}{ext}"
            atomic_write_bytes(self.out / rel, Path(path).read_bytes())
            lines.append(json.dumps({**rec, "image": rel}, ensure_ascii=False, allow_nan=False))
        self._append(trainer, lines)


def au_sources(a: DictConfig) -> tuple[list[str], Optional[Any], Optional[Any], str]:
    """(AU list, tool table, AU model, scale) of annotate.aus."""
    u = a.aus
    if u.source == "none":
        return [], None, None, ""
    if u.source == "model":
        from lightning_synfer.annotation.models import AUModel

        model = AUModel(u.model, list(u.names), str(u.scale))
        return model.names, None, model, str(u.scale)
    from lightning_synfer.annotation.tool_csv import read_tool_csv

    table = read_tool_csv(str(u.source), str(u.csv), min_confidence=float(u.min_confidence),
                          libreface_values=str(u.libreface_values))
    return table.au_names, table, None, table.scale


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    a = cfg.annotate
    if not a.root:
        raise ConfigError("annotate needs annotate.root=DIR (a folder of faces, or a dataset root of annotate.format)")
    if not a.out:
        raise ConfigError("annotate needs annotate.out=DIR (the dataset folder to write or resume)")
    run_dir = start_run(cfg, argv)
    label_space = LabelSpace.from_num_classes(cfg.data.num_classes)
    faces = list_faces(a, label_space)
    au_names, table, au_model, scale = au_sources(a)

    kept, failed = [], []
    for face in faces:
        face["aus"] = None
        if table is not None:
            found = table.lookup(face["path"], face["rel"], face["ordinal"])
            if found is None:
                failed.append(f"{face['rel']}: no row in {table.source} ({table.tool})")
                continue
            if found.values is None:
                failed.append(f"{face['rel']}: {found.failure}")
                continue
            face["aus"] = found.values
        kept.append(face)
    from lightning_synfer.runs import is_global_zero

    if failed and run_dir.path and is_global_zero():
        atomic_write_lines(Path(run_dir.path) / FAILED_FILE, failed)
        print(f"[synfer] annotate: {len(failed)} of {len(faces)} faces skipped (the AU tool failed on them); "
              f"list in {Path(run_dir.path) / FAILED_FILE}", flush=True)

    captioner = captions = None
    if a.captions.source == "model":
        from lightning_synfer.annotation.models import ImageCaptioner

        c = a.captions
        captioner = ImageCaptioner(c.model, prompt=c.prompt, keep_prompt=c.keep_prompt,
                                   max_new_tokens=c.max_new_tokens)
    elif a.captions.source == "file":
        from lightning_synfer.annotation.models import read_caption_file

        captions = read_caption_file(str(a.captions.file))

    out = str(a.out)
    os.makedirs(out, exist_ok=True)
    c = to_container(cfg)["annotate"]
    ids = hashlib.sha256("\n".join(f["id"] for f in kept).encode()).hexdigest()
    info = {"faces_sha256": ids, "num_faces": len(kept), "aus": c["aus"], "captions": c["captions"], "format": c["format"],
            "split": c["split"], "root": os.path.abspath(str(a.root)), "num_classes": int(cfg.data.num_classes)}
    check_info(out, info, write=is_global_zero(), info_file=INFO_FILE, key="annotate.out")
    expected = {f["id"] for f in kept}
    done = done_ids(out)
    remaining = [f for f in kept if f["id"] not in done]
    header_meta = {"domain": "real", "label_optional": a.format == "images", "au_source": str(a.aus.source),
                   "au_scale": scale or None, "caption_source": str(a.captions.source),
                   "generator": f"annotate:{a.format}"}
    if remaining:
        writer = AnnotationWriter(out, label_names=label_space.names, au_names=au_names, shard_size=a.shard_size,
                                  expected_ids=expected, header_meta=header_meta,
                                  in_place=os.path.realpath(out) == os.path.realpath(str(a.root)))
        loader = DataLoader(FaceDataset(remaining), batch_size=a.batch_size, shuffle=False, num_workers=0,
                            collate_fn=collate_faces)
        trainer = build_trainer(cfg, run_dir, use_distributed_sampler=True, monitor=None, enable_checkpointing=False,
                                callbacks=[writer, *callbacks], logger=False)
        if trainer.is_global_zero:
            print(f"[synfer] annotate: {len(remaining)} of {len(kept)} faces to annotate "
                  f"({len(kept) - len(remaining)} already in {out})", flush=True)
        module = AnnotationModule(a, label_space.names, au_names, au_model=au_model, captioner=captioner,
                                  captions=captions)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if not trainer.is_global_zero:
            return {}
    elif is_global_zero():
        merge(out, label_space.names, au_names, expected_ids=expected, header_meta=header_meta)
    if not is_global_zero():
        return {}
    records = collect_records(out, expected)
    metrics = {"task": "annotate", "out": out, "num_faces": len(faces), "num_failed": len(failed),
               "num_records": len(records), "num_resumed": len(done & expected), "au_names": au_names,
               "au_source": str(a.aus.source), "caption_source": str(a.captions.source),
               "complete": len(records) == len(kept), **peak_memory_mb()}
    print(f"[synfer] annotate: {len(records)}/{len(kept)} faces in {out}/manifest.jsonl "
          f"({len(failed)} skipped)", flush=True)
    return finish(run_dir, metrics)
