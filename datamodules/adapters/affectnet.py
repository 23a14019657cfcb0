"""AffectNet (manually annotated part).

Layout:
    root/training.csv, root/validation.csv
    root/Manually_Annotated_Images/<subDirectory_filePath>   (or images directly under root)

CSV columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks,
expression, valence, arousal. Expression 0-7 = neutral, happy, sad, surprise, fear, disgust, anger,
contempt; 8-10 (none, uncertain, no-face) are dropped. AffectNet's validation set is the usual test
set, so "val" and "test" both read validation.csv.
"""
from __future__ import annotations

import csv
import os

from datamodules.adapters.base import DatasetLayoutError, DatasetRoot, RecordList, register_format
from datamodules.labels import CANONICAL_8, LabelSpace
from datamodules.records import Record

# AffectNet's expression codes 0-7 are the canonical order; 8-10 (DROPPED_CODES) carry no expression.
AFFECTNET_CODES: dict[int, str] = dict(enumerate(CANONICAL_8))

SPLIT_FILES = {"train": "training.csv", "val": "validation.csv", "test": "validation.csv"}
DROPPED_CODES = {8: "none", 9: "uncertain", 10: "no-face"}
IMAGE_FOLDER = "Manually_Annotated_Images"
REQUIRED_COLUMNS = ("subDirectory_filePath", "expression")
# How many listed images to probe to tell "wrong image folder" from "a few files missing".
_PROBE = 8


class AffectNetLabelError(ValueError):
    """A malformed AffectNet CSV row; the message names the file, line and value."""


@register_format("affectnet", codes=AFFECTNET_CODES,
                 roots={"affectnet": DatasetRoot("SYNFER_AFFECTNET", "/data/AffectNet")})
def load_affectnet(root: str, split: str, label_space: LabelSpace) -> RecordList:
    """Adapter: AffectNet. Rows with expression 8-10 are dropped and counted, not errors."""
    key = split.strip().lower()
    if key not in SPLIT_FILES:
        raise ValueError(f"AffectNet split must be one of {sorted(SPLIT_FILES)}, got '{split}'")
    csv_path = os.path.join(root, SPLIT_FILES[key])
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"{root}: AffectNet annotation file not found; expected {csv_path}")
    image_dir = os.path.join(root, IMAGE_FOLDER)
    if not os.path.isdir(image_dir):
        image_dir = root

    out = RecordList()
    # utf-8-sig: some re-exports of the CSV carry a byte-order mark before the first column name.
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise AffectNetLabelError(
                f"{csv_path}: missing column(s) {missing}; expected a header with "
                f"{', '.join(REQUIRED_COLUMNS)} (found {columns})"
            )
        for row_number, row in enumerate(reader, start=1):
            where = f"{csv_path} row {row_number} (line {reader.line_num})"
            raw = (row.get("expression") or "").strip()
            try:
                code = int(raw)
            except ValueError:
                raise AffectNetLabelError(f"{where}: 'expression' must be an integer 0-10, got {raw!r}") from None
            if code in DROPPED_CODES:
                out.skipped.append(f"{where}: expression {code} ({DROPPED_CODES[code]}) dropped")
                continue
            if code not in AFFECTNET_CODES:
                raise AffectNetLabelError(
                    f"{where}: 'expression' {code} out of range; expected 0-7 "
                    f"({', '.join(AFFECTNET_CODES.values())}) or 8-10 (dropped)"
                )
            canon = AFFECTNET_CODES[code]
            if canon not in label_space.names:
                out.skipped.append(f"{where}: class '{canon}' not in the {len(label_space)}-class label space")
                continue
            rel = (row.get("subDirectory_filePath") or "").strip()
            if not rel:
                raise AffectNetLabelError(f"{where}: empty 'subDirectory_filePath'")
            out.append(Record(
                image=os.path.abspath(os.path.join(image_dir, rel)),
                label=label_space.names.index(canon),
                id=rel,
            ))

    # Images are not stat-ed one by one (300k files); probing a few catches a wrong image folder.
    probe = out[:_PROBE]
    if probe and not any(os.path.isfile(r.image) for r in probe):
        raise DatasetLayoutError(
            f"{root}: none of the first {len(probe)} images listed in {csv_path} exist "
            f"(e.g. {probe[0].image}); expected them under {os.path.join(root, IMAGE_FOLDER)} or {root}"
        )
    return out
