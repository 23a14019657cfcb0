"""SFEW 2.0: class folders per split.

Layout:
    root/Train/<Class>/*.png    root/Val/<Class>/*.png    (root/Test/ when labelled)
Classes: Angry, Disgust, Fear, Happy, Neutral, Sad, Surprise (mapped through the aliases).
"""
from __future__ import annotations

import os

from datamodules.adapters.base import DatasetLayoutError, DatasetRoot, RecordList, register_format
from datamodules.adapters.folder import find_child_dir, is_image_file, records_from_class_folders
from datamodules.labels import LabelSpace

SPLIT_FOLDERS = {"train": "Train", "val": "Val", "test": "Test"}


@register_format("sfew", roots={"sfew": DatasetRoot("SYNFER_SFEW", "/data/SFEW2")})
def load_sfew(root: str, split: str, label_space: LabelSpace) -> RecordList:
    """Adapter: SFEW 2.0. split train -> Train/, val -> Val/, test -> Test/."""
    key = split.strip().lower()
    if key not in SPLIT_FOLDERS:
        raise ValueError(f"SFEW split must be one of {sorted(SPLIT_FOLDERS)}, got '{split}'")
    folder = SPLIT_FOLDERS[key]
    split_dir = find_child_dir(root, [folder])
    if split_dir is None:
        raise FileNotFoundError(f"{root}: SFEW split folder not found; expected {os.path.join(root, folder)}/<Class>/")
    # The official SFEW test set is a flat folder of unlabelled images: say so instead of
    # "no class folders".
    entries = list(os.scandir(split_dir))
    if not any(e.is_dir() for e in entries) and any(is_image_file(e.name) for e in entries):
        raise DatasetLayoutError(
            f"{split_dir}: images are not in class folders (the official SFEW test set is unlabelled); "
            f"expected {split_dir}/<Class>/*.png"
        )
    return records_from_class_folders(split_dir, label_space, id_prefix=f"{os.path.basename(split_dir)}/")
