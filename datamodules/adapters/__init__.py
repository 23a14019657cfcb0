"""Dataset adapters: turn a dataset folder into a sorted list of `Record`s.

Every adapter has the signature `(root: str, split: str, label_space: LabelSpace) -> RecordList`
and only lists files (no decoding), so listing tens of thousands of images is fast. Each module of this
package registers its adapter with `@register_format` (base.py); `FORMATS` finds them, and the modules named
in SYNFER_ADAPTERS, on first use. Use `load_records`, which also checks the root and reports what was skipped.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from datamodules.adapters.base import (
    FORMATS, Adapter, DatasetFormat, DatasetLayoutError, DatasetRoot, RecordList, dataset_roots, register_format,
)
from datamodules.labels import LabelSpace
from datamodules.registry import UnknownNameError

log = logging.getLogger(__name__)


class DatasetRootNotFoundError(FileNotFoundError):
    """The configured dataset root does not exist; the message names the config key and the path."""


class EmptyDatasetError(ValueError):
    """An adapter found no usable images for the requested split."""


# How many skip messages to show in the log before summarising.
_SHOWN_SKIPS = 5


def load_records(format: str, root: str, split: str, label_space: LabelSpace, *,
                 key: str = "data.?.root", version: Optional[int] = None) -> RecordList:
    """List the records of one dataset split.

    format: one of FORMATS; root: dataset folder; split: train / val / test;
    key: the config key `root` came from, so errors can say which setting to fix.
    Returns a RecordList; `.skipped` has one message per skipped file/row (non-images, dropped
    AffectNet codes, classes outside the label space, ...).
    """
    fmt = str(format).strip().lower()
    section = key[:-len(".root")] if key.endswith(".root") else ""  # data.train.root -> data.train
    adapter = FORMATS.get(fmt, key=f"{section}.format" if section else "format")
    if root is None or not str(root).strip():
        raise ValueError(f"{key} is not set: give the {fmt} dataset folder, e.g. {key}=/path/to/dataset")
    path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(path):
        raise DatasetRootNotFoundError(f"{key}={root}: dataset folder {path} does not exist")
    if not os.path.isdir(path):
        raise DatasetRootNotFoundError(f"{key}={root}: {path} is a file, expected the dataset folder")

    if version is not None and not adapter.versioned:
        versioned = [name for name, f in FORMATS.items() if f.versioned]
        raise ValueError(f"{section or key}.version={version}: only formats {versioned} have manifest "
                         f"versions (format is {fmt})")
    records = adapter.load(path, split, label_space, version) if version is not None \
        else adapter.load(path, split, label_space)
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
    "Adapter", "DatasetFormat", "DatasetLayoutError", "DatasetRoot", "DatasetRootNotFoundError", "EmptyDatasetError",
    "FORMATS", "RecordList", "UnknownNameError", "dataset_roots", "load_records", "register_format",
]
