"""What every dataset adapter produces: a list of `Record`s, plus safe image loading.

A Record is one labelled face. Adapters (folder, RAF-DB, AffectNet, SFEW), the synthetic manifest
reader and the procedural renderer all produce Records, and `FERDataset` turns them into samples.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

REAL, SYNTHETIC = 0, 1
DOMAIN_NAMES = {REAL: "real", SYNTHETIC: "synthetic"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Refuse images above this many pixels (decompression bombs). 8k x 8k is far above any face crop.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class Record:
    """One labelled face.

    image:      absolute path of the image file, or None when `array` holds the pixels.
    label:      index in the dataset's LabelSpace (intended label for synthetic data).
    label_soft: optional distribution over the label space (rectified synthetic labels).
    aus:        optional AU intensities in [0, 1], ordered as the dataset's AU name list.
    """

    image: Optional[str]
    label: int
    id: str = ""
    label_soft: Optional[Sequence[float]] = None
    aus: Optional[Sequence[float]] = None
    caption: Optional[str] = None
    domain: int = REAL
    array: Optional[np.ndarray] = field(default=None, repr=False)  # HxWxC uint8, in-memory sources


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """Open, fully decode and convert an image. Raises BadImageError naming the file.

    Handles 16-bit PNG, CMYK JPEG, palette and alpha images by converting to `mode` ("L" or "RGB").
    """
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: file does not exist")
    if os.path.getsize(path) == 0:
        raise BadImageError(f"{path}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise BadImageError(f"{path}: {w}x{h} exceeds {MAX_IMAGE_PIXELS} pixels (decompression bomb?)")
                img.load()
                return _convert(img, mode)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"{path}: refused as a decompression bomb ({exc})") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        # Composite alpha onto black, like most FER preprocessing pipelines.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def to_pil(record: Record, mode: str) -> Image.Image:
    if record.array is not None:
        arr = record.array
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        return img.convert(mode)
    return load_image(record.image, mode)


class BadImageLog:
    """Counts skipped images and remembers their names for the run directory."""

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self._seen: set[str] = set()

    def add(self, message: str) -> None:
        self.skipped.append(message)
        self._seen.add(message)
        log.warning("skipped bad image: %s", message)

    def add_new(self, message: str, *, announce: bool = True) -> bool:
        """Record a decode failure once: the same file fails again every epoch and in every loader worker.

        `announce=False` records without a log line (the process that met the failure already logged it)."""
        if message in self._seen:
            return False
        if announce:
            self.add(message)
        else:
            self.skipped.append(message)
            self._seen.add(message)
        return True

    def extend(self, messages: list[str]) -> None:
        """Record many skips at once with one log line (adapters may drop thousands of rows)."""
        if messages:
            self.skipped.extend(messages)
            self._seen.update(messages)
            log.warning("skipped %d items, e.g. %s", len(messages), messages[0])

    def __len__(self) -> int:
        return len(self.skipped)
