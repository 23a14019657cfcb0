"""RAF-DB (basic emotion subset).

Layout:
    root/EmoLabel/list_patition_label.txt     lines like `train_00001.jpg 5` / `test_0001.jpg 1`
    root/Image/aligned/train_00001_aligned.jpg   (preferred when present)
    root/Image/original/train_00001.jpg

Codes 1-7 are surprise, fear, disgust, happiness, sadness, anger, neutral (RAFDB_CODES).
RAF-DB has no validation split: "val" and "test" both read the official test_ lines.
"""
from __future__ import annotations

import os

from datamodules.adapters.base import DatasetLayoutError, DatasetRoot, RecordList, register_format
from datamodules.labels import LabelSpace
from datamodules.records import Record

# RAF-DB's numeric codes -> canonical names.
RAFDB_CODES: dict[int, str] = {
    1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad", 6: "anger", 7: "neutral",
}

# The official file name has the typo "patition"; accept the corrected spelling too.
LABEL_FILE_NAMES = ("list_patition_label.txt", "list_partition_label.txt")
SPLIT_PREFIXES = {"train": "train_", "val": "test_", "test": "test_"}


class RafdbLabelError(ValueError):
    """A malformed line in the RAF-DB label file; the message names file, line and value."""


def _label_file(root: str) -> str:
    for name in LABEL_FILE_NAMES:
        path = os.path.join(root, "EmoLabel", name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{root}: RAF-DB label file not found; expected {os.path.join(root, 'EmoLabel', LABEL_FILE_NAMES[0])}"
    )


def _image_dir(root: str) -> tuple[str, bool]:
    """(folder, aligned?) - the aligned crops are what every FER paper trains on."""
    aligned = os.path.join(root, "Image", "aligned")
    if os.path.isdir(aligned):
        return aligned, True
    original = os.path.join(root, "Image", "original")
    if os.path.isdir(original):
        return original, False
    raise FileNotFoundError(f"{root}: RAF-DB images not found; expected {aligned} or {original}")


def image_file_name(listed_name: str, aligned: bool) -> str:
    if not aligned:
        return listed_name
    stem, ext = os.path.splitext(listed_name)
    return f"{stem}_aligned{ext}"


@register_format("rafdb", codes=RAFDB_CODES, roots={"rafdb": DatasetRoot("SYNFER_RAFDB", "/data/RAF-DB/basic")})
def load_rafdb(root: str, split: str, label_space: LabelSpace) -> RecordList:
    """Adapter: RAF-DB basic. split train -> train_ lines; val/test -> test_ lines."""
    key = split.strip().lower()
    if key not in SPLIT_PREFIXES:
        raise ValueError(f"RAF-DB split must be one of {sorted(SPLIT_PREFIXES)}, got '{split}'")
    prefix = SPLIT_PREFIXES[key]
    label_path = _label_file(root)
    image_dir, aligned = _image_dir(root)
    # One directory listing instead of 15k stat calls: missing images are skipped and counted.
    present = set(os.listdir(image_dir))

    out = RecordList()
    with open(label_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_path}:{lineno}"
            if len(fields) != 2:
                raise RafdbLabelError(f"{where}: expected '<image name> <code 1-7>', got {line.strip()!r}")
            name, code_text = fields
            if not name.startswith(prefix):
                continue
            try:
                code = int(code_text)
            except ValueError:
                raise RafdbLabelError(f"{where}: label code must be an integer 1-7, got {code_text!r}") from None
            if code not in RAFDB_CODES:
                raise RafdbLabelError(
                    f"{where}: label code {code} out of range; expected 1-7 "
                    f"({', '.join(f'{k}={v}' for k, v in RAFDB_CODES.items())})"
                )
            canon = RAFDB_CODES[code]
            file_name = image_file_name(name, aligned)
            if canon not in label_space.names:
                out.skipped.append(f"{where}: class '{canon}' not in the label space")
                continue
            if file_name not in present:
                out.skipped.append(f"{where}: image {os.path.join(image_dir, file_name)} does not exist")
                continue
            out.append(Record(
                image=os.path.abspath(os.path.join(image_dir, file_name)),
                label=label_space.names.index(canon),
                id=os.path.splitext(name)[0],
            ))
    if not out and out.skipped and all("does not exist" in m for m in out.skipped):
        raise DatasetLayoutError(
            f"{root}: none of the {len(out.skipped)} listed {prefix}* images exist in {image_dir} "
            f"(first missing: {out.skipped[0]})"
        )
    return out
