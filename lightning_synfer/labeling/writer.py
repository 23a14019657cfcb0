"""Prediction writer of labelling: one line of ensemble probabilities per record in a per-rank part file.

Same pattern as synthesis (and the same part-file code: this subclasses SynthesisWriter): each rank appends
flushed, fsynced lines to `WORK/parts/rank{r}-{uuid}.jsonl`; a crash leaves at most a partial last line, which
`synthesis.merge.iter_part_records` skips. After a barrier rank 0 reads every part (dedupe by id: Lightning's
DistributedSampler pads the last batch with repeats) and rectifies. A rerun skips the ids already in the parts.

    {"id": "...", "index": 12, "probs": [[p_1 .. p_K] per ensemble member]}    (the set's label space)
    {"id": "...", "index": 13, "bad": "<decode error>"}                          (undecodable image)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lightning_synfer.synthesis.merge import iter_part_records
from lightning_synfer.synthesis.writer import SynthesisWriter


class LabelWriter(SynthesisWriter):
    def __init__(self, work: str | os.PathLike, *, label_names: Sequence[str]) -> None:
        super().__init__(str(work), label_names=label_names, au_names=[])
        self.work = Path(work)

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Optional[Sequence[int]],
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        lines = []
        probs = prediction["probs"]
        for i, rid in enumerate(prediction["id"]):
            rec: dict[str, Any] = {"id": rid, "index": int(prediction["index"][i])}
            if prediction["bad"][i]:
                rec["bad"] = prediction["bad"][i]
            else:
                rec["probs"] = probs[i].tolist()
            lines.append(json.dumps(rec, allow_nan=False))
        self._append(trainer, lines)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.close()
        trainer.strategy.barrier("labelling-parts")  # every rank's lines are on disk before rank 0 reads them


def read_predictions(work: str | os.PathLike, num_members: int, num_classes: int,
                     expected_ids: Optional[set[str]] = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(id -> (members, classes) probabilities, id -> decode error) from every part; first line per id wins."""
    probs: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    for rec in iter_part_records(work):
        rid = rec["id"]
        if rid in probs or rid in bad or (expected_ids is not None and rid not in expected_ids):
            continue
        if "bad" in rec:
            bad[rid] = str(rec["bad"])
            continue
        arr = np.asarray(rec.get("probs"), dtype=np.float64)
        if arr.shape == (num_members, num_classes) and np.isfinite(arr).all():
            probs[rid] = arr
    return probs, bad


__all__ = ["LabelWriter", "read_predictions"]
