"""Dataset adapters: turn a dataset folder into a sorted list of `Record`s.

Every adapter has the signature `(root: str, split: str, label_space: LabelSpace) -> RecordList`
and only lists files (no decoding), so listing tens of thousands of images is fast. Use
`load_records`, which also checks the root and reports what was skipped.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from datamodules import synthetic as synthetic_format
from datamodules.adapters.affectnet import AffectNetLabelError, load_affectnet
from datamodules.adapters.folder import DatasetLayoutError, RecordList, load_folder
from datamodules.adapters.rafdb import RafdbLabelError, load_rafdb
from datamodules.adapters.sfew import load_sfew
from datamodules.labels import LabelSpace

log = logging.getLogger(__name__)

Adapter = Callable[[str, str, LabelSpace], RecordList]


class DatasetRootNotFoundError(FileNotFoundError):
    """The configured dataset root does not exist; the message names the config key and the path."""


class EmptyDatasetError(ValueError):
    """An adapter found no usable images for the requested split."""


def load_synthetic(root: str, split: str, label_space: LabelSpace, version: Optional[int] = None) -> RecordList:
    """Adapter: a synthetic set (see datamodules.synthetic). Uses `root/<split>/` if that is a
    synthetic set of its own, else `root` (synthetic sets usually have no splits). `version` picks a
    manifest version (1 = labels as generated); None takes the newest (e.g. rectified labels)."""
    split_root = os.path.join(root, split)
    if os.path.isfile(os.path.join(split_root, synthetic_format.HEADER_FILE)):
        root = split_root
    return synthetic_format.records_from_manifest(root, label_space, version)


ADAPTERS: dict[str, Adapter] = {
    "folder": load_folder,
    "rafdb": load_rafdb,
    "affectnet": load_affectnet,
    "sfew": load_sfew,
    "synthetic": load_synthetic,
}

# How many skip messages to show in the log before summarising.
_SHOWN_SKIPS = 5


def load_records(format: str, root: str, split: str, label_space: LabelSpace, *,
                 key: str = "data.?.root", version: Optional[int] = None) -> RecordList:
    """List the records of one dataset split.

    format: one of ADAPTERS; root: dataset folder; split: train / val / test;
    key: the config key `root` came from, so errors can say which setting to fix.
    Returns a RecordList; `.skipped` has one message per skipped file/row (non-images, dropped
    AffectNet codes, classes outside the label space, ...).
    """
    fmt = str(format).strip().lower()
    if fmt not in ADAPTERS:
        raise ValueError(f"Unknown dataset format '{format}'. Valid formats: {', '.join(sorted(ADAPTERS))}")
    if root is None or not str(root).strip():
        raise ValueError(f"{key} is not set: give the {fmt} dataset folder, e.g. {key}=/path/to/dataset")
    path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(path):
        raise DatasetRootNotFoundError(f"{key}={root}: dataset folder {path} does not exist")
    if not os.path.isdir(path):
        raise DatasetRootNotFoundError(f"{key}={root}: {path} is a file, expected the dataset folder")

    if version is not None and fmt != "synthetic":
        raise ValueError(f"{key.rsplit('.', 1)[0]}.version={version}: only synthetic sets have manifest versions "
                         f"(format is {fmt})")
    records = ADAPTERS[fmt](path, split, label_space, version) if version is not None \
        else ADAPTERS[fmt](path, split, label_space)
    if records.skipped:
        shown = "; ".join(records.skipped[:_SHOWN_SKIPS])
        more = f" (and {len(records.skipped) - _SHOWN_SKIPS} more)" if len(records.skipped) > _SHOWN_SKIPS else ""
        log.warning("%s (%s, split %s): skipped %d item(s): %s%s",
                    key, fmt, split, len(records.skipped), shown, more)
    if not records:
        first = f" First skipped: {records.skipped[0]}" if records.skipped else ""
        raise EmptyDatasetError(
            f"{key}={root}: no usable images for split '{split}' in the {fmt} dataset at {path} "
            f"({len(records.skipped)} item(s) skipped).{first}"
        )
    log.info("%s (%s, split %s): %d records", key, fmt, split, len(records))
    return records


__all__ = [
    "ADAPTERS", "Adapter", "RecordList", "load_records", "load_folder", "load_rafdb", "load_affectnet",
    "load_sfew", "load_synthetic", "DatasetRootNotFoundError", "DatasetLayoutError", "EmptyDatasetError",
    "RafdbLabelError", "AffectNetLabelError",
]
