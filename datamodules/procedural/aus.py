"""Facial action units (FACS) used by the procedural renderer, EMFACS prototypes and AU sampling.

Contempt is the only prototype that is not left/right symmetric. Instead of adding a side
parameter to every AU, the AU vector has one extra control, "AU12_unilateral": a lip corner pull
on ONE side of the mouth (the side is picked per image by the renderer). Symmetric "AU12" stays
the bilateral smile. This keeps an AU vector a plain float vector in [0, 1] that models can
regress, while still telling a smirk from a smile.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from datamodules.labels import CANONICAL_8, canonical_name

# Order of the AU vector everywhere (renderer input, Record.aus, EmbeddedSplit.aus columns).
AU_NAMES: tuple[str, ...] = (
    "AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9",
    "AU12", "AU15", "AU20", "AU23", "AU25", "AU26",
    "AU12_unilateral",
)
AU_INDEX: dict[str, int] = {name: i for i, name in enumerate(AU_NAMES)}
NUM_AUS = len(AU_NAMES)

# Short noun phrases that read after "with ..." in a caption.
AU_DESCRIPTIONS: dict[str, str] = {
    "AU1": "raised inner brows",
    "AU2": "raised outer brows",
    "AU4": "lowered, knitted brows",
    "AU5": "wide-open eyes",
    "AU6": "raised cheeks",
    "AU7": "tightened eyelids",
    "AU9": "a wrinkled nose",
    "AU12": "pulled-up lip corners",
    "AU15": "a downturned mouth",
    "AU20": "stretched lips",
    "AU23": "tightened lips",
    "AU25": "parted lips",
    "AU26": "a dropped jaw",
    "AU12_unilateral": "a one-sided smirk",
}

# EMFACS prototypes (Friesen & Ekman, 1983), intensities relative to the sampled overall intensity.
EMFACS_PROTOTYPES: dict[str, dict[str, float]] = {
    "neutral": {},
    "happy": {"AU6": 0.9, "AU12": 1.0},
    "sad": {"AU1": 1.0, "AU4": 0.8, "AU15": 1.0},
    "surprise": {"AU1": 1.0, "AU2": 1.0, "AU5": 0.9, "AU26": 1.0},
    "fear": {"AU1": 1.0, "AU2": 0.8, "AU4": 0.8, "AU5": 1.0, "AU7": 0.7, "AU20": 1.0, "AU26": 0.8},
    "disgust": {"AU9": 1.0, "AU15": 0.8},
    "anger": {"AU4": 1.0, "AU5": 0.8, "AU7": 0.9, "AU23": 1.0},
    "contempt": {"AU12_unilateral": 1.0},
}
assert set(EMFACS_PROTOTYPES) == set(CANONICAL_8)


def au_vector(intensities: Mapping[str, float]) -> np.ndarray:
    """{"AU12": 0.8, ...} -> float32 vector ordered as AU_NAMES (missing AUs are 0)."""
    vec = np.zeros(NUM_AUS, dtype=np.float32)
    for name, value in intensities.items():
        if name not in AU_INDEX:
            raise KeyError(f"Unknown action unit '{name}'; expected one of {list(AU_NAMES)}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"AU intensity for {name} must be in [0, 1], got {value}")
        vec[AU_INDEX[name]] = value
    return vec


def sample_aus(
    label_name: str,
    rng: np.random.Generator,
    intensity_range: tuple[float, float] = (0.5, 1.0),
    noise: float = 0.25,
    noise_prob: float = 0.15,
    drop_prob: float = 0.1,
) -> np.ndarray:
    """A class-conditional AU vector (float32, ordered as AU_NAMES) with realistic variation.

    - one overall intensity per face from `intensity_range`, times the prototype weight, with
      +-20% per-AU jitter;
    - each prototype AU is dropped with `drop_prob` (never the last remaining one), so e.g. some
      fear faces lack AU4 and look more like surprise;
    - every non-prototype AU fires with probability `noise_prob` at an intensity up to `noise`
      (kept below the 0.3 caption threshold by default), so classes overlap mildly.
    """
    name = canonical_name(label_name, source="sample_aus")
    low, high = intensity_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"intensity_range must satisfy 0 <= low <= high <= 1, got {intensity_range}")
    prototype = EMFACS_PROTOTYPES[name]
    vec = np.zeros(NUM_AUS, dtype=np.float32)

    overall = rng.uniform(low, high)
    kept = [au for au in prototype if rng.random() >= drop_prob]
    if prototype and not kept:
        kept = [max(prototype, key=prototype.get)]
    for au in kept:
        vec[AU_INDEX[au]] = np.clip(overall * prototype[au] * rng.uniform(0.8, 1.2), 0.0, 1.0)

    # Spurious activations; the unilateral control is left out so only contempt is asymmetric.
    spurious = rng.random(NUM_AUS) < noise_prob
    for i in np.flatnonzero(spurious):
        if AU_NAMES[i] not in prototype and AU_NAMES[i] != "AU12_unilateral":
            vec[i] = rng.uniform(0.0, noise)
    return vec
