"""Class-per-folder datasets: FER2013 image release, FERPlus exports, user data.

Layouts accepted:
    root/<split>/<class>/*.jpg   when a folder for the split exists (train, val/valid, test, ...)
    root/<class>/*.jpg           otherwise (the split is ignored)

Adapters only list files (no decoding) so that listing 30k images stays fast; broken images are
caught later by `records.load_image`.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

from datamodules.adapters.base import DatasetLayoutError, DatasetRoot, RecordList, register_format
from datamodules.labels import LabelSpace, canonical_name
from datamodules.records import IMAGE_EXTENSIONS, Record

# Folder names that mean "this is a split folder, not a class folder". Lower-case.
SPLIT_FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training", "fer2013train"),
    "val": ("val", "valid", "validation", "publictest", "fer2013valid"),
    "test": ("test", "testing", "privatetest", "fer2013test"),
}
_ALL_SPLIT_NAMES = {name for names in SPLIT_FOLDER_ALIASES.values() for name in names}


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_child_dir(parent: str, candidates: Sequence[str]) -> Optional[str]:
    """First sub-folder of `parent` named like one of `candidates` (exact match first, then case-insensitive)."""
    try:
        children = [e.name for e in os.scandir(parent) if e.is_dir()]
    except FileNotFoundError:
        return None
    for cand in candidates:
        if cand in children:
            return os.path.join(parent, cand)
    folded = {c.casefold(): c for c in sorted(children)}
    for cand in candidates:
        if cand.casefold() in folded:
            return os.path.join(parent, folded[cand.casefold()])
    return None


def split_folder_names(split: str) -> tuple[str, ...]:
    key = split.strip().lower()
    return SPLIT_FOLDER_ALIASES.get(key, (split,))


def class_root_for_split(root: str, split: str) -> str:
    """`root/<split>` if it exists, else `root` itself when it holds class folders directly.

    If root has split folders but none for the requested split, that is an error: silently
    reading 'train' as a class name would be far more confusing.
    """
    names = split_folder_names(split)
    found = find_child_dir(root, names)
    if found is not None:
        return found
    split_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name.lower() in _ALL_SPLIT_NAMES)
    if split_dirs:
        raise DatasetLayoutError(
            f"{root}: has split folders {split_dirs} but none for split '{split}' "
            f"(looked for {', '.join(names)}). Point the root at a dataset that has this split, "
            f"or use a split that exists."
        )
    return root


def records_from_class_folders(class_root: str, label_space: LabelSpace, *, id_prefix: str = "") -> RecordList:
    """List `class_root/<class>/<image>` in sorted order.

    - class folder names go through `canonical_name` (angry -> anger); an unknown name raises
      UnknownLabelError listing the known names;
    - a canonical class missing from `label_space` (contempt in 7-class) is skipped with a warning;
    - an empty class folder warns; non-image files and stray sub-folders are skipped and counted.
    """
    out = RecordList()
    entries = sorted(os.scandir(class_root), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    class_dir_names = {e.name for e in class_dirs}
    for entry in entries:
        if entry.name not in class_dir_names:
            out.skipped.append(f"{entry.path}: not a class folder (expected {class_root}/<class>/<image>)")
    if not class_dirs:
        raise DatasetLayoutError(
            f"{class_root}: no class folders found. Expected <root>/<class>/*.jpg or "
            f"<root>/<split>/<class>/*.jpg with class names such as {', '.join(label_space.names)}."
        )

    seen_canonical: dict[str, str] = {}
    for class_dir in class_dirs:
        canon = canonical_name(class_dir.name, source=f"class folder {class_dir.path}")
        if canon in seen_canonical:
            warnings.warn(
                f"{class_dir.path}: folders '{seen_canonical[canon]}' and '{class_dir.name}' both map to "
                f"class '{canon}'; their images are merged.", stacklevel=2,
            )
        seen_canonical.setdefault(canon, class_dir.name)

        files = sorted(os.scandir(class_dir.path), key=lambda e: e.name)
        images = [f for f in files if f.is_file() and is_image_file(f.name)]
        for f in files:
            if not (f.is_file() and is_image_file(f.name)):
                what = "sub-folder" if f.is_dir() else "not an image file"
                out.skipped.append(f"{f.path}: {what} (image extensions: {', '.join(IMAGE_EXTENSIONS)})")

        if not images:
            warnings.warn(f"{class_dir.path}: class folder '{class_dir.name}' has no images", stacklevel=2)
            continue
        if canon not in label_space.names:
            warnings.warn(
                f"{class_dir.path}: class '{canon}' is not in the {len(label_space)}-class label space "
                f"{list(label_space.names)}; skipping its {len(images)} images "
                f"(use data.num_classes=8 to keep contempt).", stacklevel=2,
            )
            out.skipped.extend(f"{f.path}: class '{canon}' not in the label space" for f in images)
            continue
        label = label_space.names.index(canon)
        for f in images:
            out.append(Record(
                image=os.path.abspath(f.path),
                label=label,
                id=f"{id_prefix}{class_dir.name}/{f.name}",
            ))
    return out


# The FER2013 image release is a class-folder dataset (the CSV release's numeric codes are not read here).
@register_format("folder", roots={"fer2013": DatasetRoot("SYNFER_FER2013", "../shared/data/fer2013")})
def load_folder(root: str, split: str, label_space: LabelSpace) -> RecordList:
    """Adapter: class-per-folder dataset (see module docstring for the layouts)."""
    class_root = class_root_for_split(root, split)
    prefix = "" if class_root == root else os.path.basename(class_root) + "/"
    return records_from_class_folders(class_root, label_space, id_prefix=prefix)
