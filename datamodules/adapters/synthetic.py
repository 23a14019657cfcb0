"""Synthetic sets (`dataset.json` + `manifest[.vN].jsonl`, see datamodules/synthetic.py) as a dataset format."""
from __future__ import annotations

import os
from typing import Optional

from datamodules import synthetic as synthetic_format
from datamodules.adapters.base import DatasetRoot, RecordList, register_format
from datamodules.labels import LabelSpace


@register_format("synthetic", roots={"synthetic": DatasetRoot("SYNFER_SYNTHETIC", "/data/synfer")}, versioned=True)
def load_synthetic(root: str, split: str, label_space: LabelSpace, version: Optional[int] = None) -> RecordList:
    """Adapter: a synthetic set. Uses `root/<split>/` if that is a synthetic set of its own, else `root`
    (synthetic sets usually have no splits). `version` picks a manifest version (1 = labels as generated);
    None takes the newest (e.g. rectified labels)."""
    split_root = os.path.join(root, split)
    if os.path.isfile(os.path.join(split_root, synthetic_format.HEADER_FILE)):
        root = split_root
    return synthetic_format.records_from_manifest(root, label_space, version)
