"""The embedded default dataset: rendered train/val/test splits with disjoint identities.

Every image is a function of (seed, split, index) only, so the same arguments give byte-identical
arrays on any machine, and `render_split_cached` can store a split as one .npz file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from datamodules.atomic import atomic_open
from datamodules.labels import LabelSpace
from datamodules.procedural.aus import AU_NAMES, NUM_AUS, sample_aus
from datamodules.procedural.captions import make_caption
from datamodules.procedural.renderer import render_face, sample_identity
from datamodules.records import REAL, Record

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Identity ids of a split live in [offset, offset + MAX_IDENTITIES): splits never share a person.
MAX_IDENTITIES = 1_000_000
SPLIT_ID_OFFSETS = {split: k * MAX_IDENTITIES for k, split in enumerate(SPLITS)}
# SeedSequence stream tags, so identity, layout and per-image randomness never reuse a stream.
_IDENTITY_STREAM, _LAYOUT_STREAM, _IMAGE_STREAM = 0, 1, 2


@dataclass
class EmbeddedSplit:
    """A rendered split. Row i of every array describes image i."""

    split: str
    images: np.ndarray        # uint8 N x H x W x C
    labels: np.ndarray        # int64 N, indices into class_names
    aus: np.ndarray           # float32 N x len(au_names)
    captions: list[str]
    identity_ids: np.ndarray  # int64 N, globally unique per person (disjoint across splits)
    class_names: tuple[str, ...] = field(default_factory=lambda: LabelSpace.from_num_classes(8).names)
    au_names: tuple[str, ...] = AU_NAMES

    def __post_init__(self) -> None:
        n = len(self.images)
        lengths = {"labels": len(self.labels), "aus": len(self.aus), "captions": len(self.captions),
                   "identity_ids": len(self.identity_ids)}
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"EmbeddedSplit '{self.split}': {n} images but lengths {bad}")

    def __len__(self) -> int:
        return len(self.images)

    def to_records(self, domain: int = REAL) -> list[Record]:
        """One in-memory Record per image (image=None, pixels in `array`)."""
        return [
            Record(
                image=None,
                label=int(self.labels[i]),
                id=f"embedded-{self.split}-{i}",
                aus=self.aus[i].tolist(),
                caption=self.captions[i],
                domain=domain,
                array=self.images[i],
            )
            for i in range(len(self))
        ]


def _check_args(split: str, num_images: int, size: int, channels: int, num_classes: int,
                identities_per_split: Optional[int]) -> LabelSpace:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if identities_per_split is not None and not 1 <= identities_per_split <= MAX_IDENTITIES:
        raise ValueError(f"identities_per_split must be in [1, {MAX_IDENTITIES}], got {identities_per_split}")
    return LabelSpace.from_num_classes(num_classes)


def default_identities(num_images: int) -> int:
    """About 8 images per person, at least 16 people (fewer only if there are fewer images)."""
    return max(1, min(num_images, max(16, num_images // 8)))


def render_split(
    split: str,
    num_images: int,
    size: int = 64,
    channels: int = 3,
    seed: int = 0,
    num_classes: int = 8,
    identities_per_split: Optional[int] = None,
) -> EmbeddedSplit:
    """Render a class-balanced split of `num_images` faces.

    num_classes: 8 (CANONICAL_8) or 7 (no contempt); labels index that order.
    identities_per_split: people in this split (default: about one per 8 images). Train, val and
    test draw identity ids from disjoint ranges, so no person appears in two splits.
    """
    space = _check_args(split, num_images, size, channels, num_classes, identities_per_split)
    split_index = SPLITS.index(split)
    num_ids = identities_per_split or default_identities(num_images)
    offset = SPLIT_ID_OFFSETS[split]

    layout = np.random.default_rng([seed, split_index, _LAYOUT_STREAM])
    # Exactly balanced classes (counts differ by at most one) and people, in random order.
    labels = layout.permutation(np.arange(num_images) % len(space)).astype(np.int64)
    identity_index = layout.permutation(np.arange(num_images) % num_ids)
    identity_ids = (offset + identity_index).astype(np.int64)

    identities = {}
    images = np.empty((num_images, size, size, channels), dtype=np.uint8)
    aus = np.empty((num_images, NUM_AUS), dtype=np.float32)
    captions: list[str] = []
    for i in range(num_images):
        pid = int(identity_ids[i])
        if pid not in identities:
            identities[pid] = sample_identity(np.random.default_rng([seed, pid, _IDENTITY_STREAM]), seed=pid)
        rng = np.random.default_rng([seed, split_index, i, _IMAGE_STREAM])
        name = space.names[labels[i]]
        aus[i] = sample_aus(name, rng)
        images[i] = render_face(identities[pid], aus[i], size=size, channels=channels, rng=rng)
        captions.append(make_caption(name, aus[i], identities[pid], rng))
    return EmbeddedSplit(split=split, images=images, labels=labels, aus=aus, captions=captions,
                         identity_ids=identity_ids, class_names=space.names)


def _code_fingerprint() -> str:
    """Hash of the renderer sources, so a cache never serves images from older drawing code."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for name in ("aus.py", "renderer.py", "captions.py", "dataset.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_key(split: str, num_images: int, size: int, channels: int, seed: int, num_classes: int,
              identities_per_split: Optional[int]) -> str:
    args = dict(split=split, num_images=num_images, size=size, channels=channels, seed=seed,
                num_classes=num_classes, identities_per_split=identities_per_split, code=_code_fingerprint())
    return hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def cache_file(cache_dir: str | os.PathLike, split: str, num_images: int, size: int, channels: int, seed: int,
               num_classes: int, identities_per_split: Optional[int] = None) -> Path:
    """Where render_split_cached keeps a split: `<cache_dir>/embedded-<split>-<hash>.npz`."""
    key = cache_key(split, num_images, size, channels, seed, num_classes, identities_per_split)
    return Path(os.path.expanduser(str(cache_dir))) / f"embedded-{split}-{key}.npz"


def render_split_cached(
    split: str,
    num_images: int,
    size: int = 64,
    channels: int = 3,
    seed: int = 0,
    num_classes: int = 8,
    identities_per_split: Optional[int] = None,
    cache_dir: str | os.PathLike = "~/.cache/lightning-synfer/embedded",
) -> EmbeddedSplit:
    """render_split, stored as `<cache_dir>/embedded-<split>-<hash>.npz` and reused when present.

    The file is written to a temporary name and renamed, so concurrent processes (DDP ranks) never
    read a half-written cache; a corrupt cache file is re-rendered.
    """
    space = _check_args(split, num_images, size, channels, num_classes, identities_per_split)
    path = cache_file(cache_dir, split, num_images, size, channels, seed, num_classes, identities_per_split)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                return EmbeddedSplit(split=split, images=data["images"], labels=data["labels"],
                                     aus=data["aus"], captions=[str(c) for c in data["captions"]],
                                     identity_ids=data["identity_ids"], class_names=space.names)
        except Exception as exc:  # truncated/corrupt file: fall through and re-render
            log.warning("ignoring unreadable embedded-dataset cache %s (%s: %s)", path, type(exc).__name__, exc)

    result = render_split(split, num_images, size=size, channels=channels, seed=seed,
                          num_classes=num_classes, identities_per_split=identities_per_split)
    with atomic_open(path, "wb") as handle:
        np.savez(handle, images=result.images, labels=result.labels, aus=result.aus,
                 captions=np.array(result.captions, dtype=str), identity_ids=result.identity_ids)
    return result
