"""Prediction writer of synthesis: images (PNG) first, then one manifest line per image in a per-rank part.

Each image goes to a temporary file in its folder, is fsynced and renamed into place; only then is its
line appended (and flushed and fsynced) to `parts/rank{r}-{uuid}.jsonl`. A part line therefore always
points at a complete image. At the end, rank 0 merges the parts (see merge.py).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from datamodules.atomic import atomic_open
from lightning_synfer.synthesis.merge import PARTS_DIR, merge


def image_relpath(index: int, record_id: str, shard_size: int, ext: str = "png") -> str:
    return f"images/{index // shard_size:05d}/{record_id}.{ext}"


def write_image_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        Image.fromarray(array).save(fh, format="PNG")


class SynthesisWriter(BasePredictionWriter):
    def __init__(self, out: str, *, label_names: Sequence[str], au_names: Sequence[str], shard_size: int = 1000,
                 expected_ids: Optional[set[str]] = None, header_meta: Optional[dict] = None) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.label_names = list(label_names)
        self.au_names = list(au_names)
        self.shard_size = int(shard_size)
        self.expected_ids = expected_ids
        self.header_meta = dict(header_meta or {})
        self._fh = None
        self.part_path: Optional[Path] = None
        self.written = 0
        self._t0: Optional[float] = None
        self.merge_summary: Optional[dict] = None

    def _part(self, rank: int):
        if self._fh is None:
            (self.out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
            # A fresh part per run and rank: reruns never append to (or race on) an old file.
            self.part_path = self.out / PARTS_DIR / f"rank{rank}-{uuid.uuid4().hex[:12]}.jsonl"
            self._fh = open(self.part_path, "a", encoding="utf-8")
        return self._fh

    def on_predict_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Optional[Sequence[int]],
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        images: np.ndarray = prediction["images"]
        lines = []
        for array, rec in zip(images, prediction["records"]):
            rel = image_relpath(rec["index"], rec["id"], self.shard_size)
            write_image_atomic(self.out / rel, array)
            lines.append(json.dumps({**rec, "image": rel}, ensure_ascii=False, allow_nan=False))
        self._append(trainer, lines)

    def _append(self, trainer, lines: Sequence[str]) -> None:
        """Append this batch's JSON lines to the rank's part file, on disk before the next batch starts (resume)."""
        fh = self._part(trainer.global_rank)
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())
        self.written += len(lines)
        self._show_rate(trainer)

    def _show_rate(self, trainer) -> None:
        rate = self.written / max(1e-9, time.perf_counter() - (self._t0 or time.perf_counter()))
        try:
            bar = trainer.progress_bar_callback.predict_progress_bar  # TypeError/AttributeError when absent
        except (AttributeError, TypeError):
            bar = None
        if bar is not None:
            bar.set_postfix({"img/s": f"{rate * max(1, trainer.world_size):.2f}"}, refresh=False)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()
        trainer.strategy.barrier("synthesis-merge")  # every rank's lines are on disk before the merge
        if trainer.is_global_zero:
            self.merge_summary = merge(self.out, self.label_names, self.au_names, expected_ids=self.expected_ids,
                                       header_meta=self.header_meta)
        trainer.strategy.barrier("synthesis-merged")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.close()
