"""AU vocabularies: which facial action units a data set annotates, under one spelling, on one scale.

A data set's AU list is part of its header (`dataset.json: au_names`); the embedded renderer's list is
`procedural.aus.AU_NAMES` (its 14 AUs, `AU12_unilateral` included). Models (the generator's FAU adapter, a
classifier's AU head) store the list they were built for. This module is the one place that
- spells AU names one way (`canonical_au`: AU01, AU1, AU01_r, au_1, "AU 1" -> "AU1"),
- maps the intensity scales tools write onto [0, 1] (`to_unit`: FACS 0-5 intensities, 0-1 probabilities, logits),
- compares two lists and says which AUs are missing and which are extra (`au_difference`, `AUVocabularyError`),
- moves AU vectors from one order into another (`AUAligner`), never filling a missing AU with a silent zero.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

# "AU01_r", "au_1", "AU 1", "AU12_unilateral", "AU01_intensity": prefix AU, number, optional qualifier.
_AU_NAME = re.compile(r"^\s*au[\s_-]*0*(\d+)(?:[\s_-]*(.*?))?\s*$", re.IGNORECASE)
# Tool suffixes that say how a value was measured, not which AU it is (OpenFace _r/_c, LibreFace _intensity).
_MEASUREMENT_SUFFIXES = {"r", "c", "intensity", "presence", "occurrence", "prob", "probability"}

# The scales AU values arrive on, and how each maps to [0, 1].
AU_SCALES = {
    "unit": "values already in [0, 1] (probabilities, py-feat, binary presence)",
    "facs": "FACS intensities 0-5 (OpenFace AUxx_r, LibreFace au_k_intensity, DISFA/BP4D codes), divided by 5",
    "logits": "unbounded scores, through a sigmoid",
}

# FACS names of the AUs real annotations use (OpenFace's 17 + DISFA/BP4D/OpenGraphAU's main ones): caption phrases.
FACS_AU_PHRASES: dict[str, str] = {
    "AU1": "raised inner brows", "AU2": "raised outer brows", "AU4": "lowered, knitted brows",
    "AU5": "wide-open eyes", "AU6": "raised cheeks", "AU7": "tightened eyelids", "AU9": "a wrinkled nose",
    "AU10": "a raised upper lip", "AU11": "deepened nasolabial folds", "AU12": "pulled-up lip corners",
    "AU13": "puffed cheeks", "AU14": "dimpled cheeks", "AU15": "a downturned mouth", "AU16": "a lowered lower lip",
    "AU17": "a raised chin", "AU18": "puckered lips", "AU20": "stretched lips", "AU22": "funnelled lips",
    "AU23": "tightened lips", "AU24": "pressed lips", "AU25": "parted lips", "AU26": "a dropped jaw",
    "AU27": "a wide-open mouth", "AU28": "sucked-in lips", "AU43": "closed eyes", "AU45": "a blink",
    "AU12_unilateral": "a one-sided smirk",
}


class AUVocabularyError(ValueError):
    """Two AU lists that do not fit; the message names the file, the missing and the extra AUs."""


def canonical_au(name: str) -> str:
    """One spelling per AU: AU01 == AU1 == AU01_r == au_1 == "AU 1" -> "AU1"; AU12_unilateral keeps its
    qualifier (a different control from AU12). Names that are not AUs are returned stripped."""
    text = str(name).strip()
    match = _AU_NAME.match(text)
    if not match:
        return text
    number, qualifier = match.group(1), (match.group(2) or "").strip("_- ").lower()
    if qualifier in _MEASUREMENT_SUFFIXES:
        qualifier = ""
    return f"AU{int(number)}" + (f"_{qualifier}" if qualifier else "")


def canonical_aus(names: Sequence[str], *, source: str = "") -> list[str]:
    """Canonical spellings of a list; two names for one AU (AU01 and AU1_r) are an error naming `source`."""
    out = [canonical_au(n) for n in names]
    seen: dict[str, str] = {}
    for original, canon in zip(names, out):
        if canon in seen:
            raise AUVocabularyError(f"{source or 'AU list'}: '{seen[canon]}' and '{original}' are the same AU "
                                    f"({canon}); expected each AU once")
        seen[canon] = original
    return out


def au_difference(have: Sequence[str], want: Sequence[str]) -> tuple[list[str], list[str]]:
    """(missing, extra): AUs of `want` that `have` lacks, and AUs of `have` that `want` lacks (canonical, in order)."""
    have_c, want_c = [canonical_au(n) for n in have], [canonical_au(n) for n in want]
    return [n for n in want_c if n not in have_c], [n for n in have_c if n not in want_c]


def describe_difference(missing: Sequence[str], extra: Sequence[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {list(missing)}")
    if extra:
        parts.append(f"extra {list(extra)}")
    return ", ".join(parts) or "same AUs"


def check_same_aus(have: Sequence[str], want: Sequence[str], *, source: str, target: str) -> None:
    """Raise AUVocabularyError unless `have` (a set's or checkpoint's list) holds exactly the AUs of `want`."""
    missing, extra = au_difference(have, want)
    if missing or extra:
        raise AUVocabularyError(f"{source}: AU list {list(have)} does not match {target} {list(want)}: "
                                f"{describe_difference(missing, extra)}")


def intersect(order: Sequence[str], other: Sequence[str]) -> list[str]:
    """The canonical AUs of `order` that `other` also has, in `order`'s order."""
    other_c = {canonical_au(n) for n in other}
    return [c for c in (canonical_au(n) for n in order) if c in other_c]


def to_unit(value: float, scale: str) -> float:
    """One AU value on `scale` (AU_SCALES) -> [0, 1]. NaN stays NaN (the caller decides what a failed face is)."""
    v = float(value)
    if math.isnan(v):
        return v
    if scale == "unit":
        return min(1.0, max(0.0, v))
    if scale == "facs":
        return min(1.0, max(0.0, v / 5.0))
    if scale == "logits":
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, v))))
    raise ValueError(f"AU scale {scale!r}: expected one of {sorted(AU_SCALES)} ({AU_SCALES})")


class AUAligner:
    """Moves AU vectors from a source order into a target order. Every target AU must be in the source: a missing
    AU would otherwise become a silent 0 ("not active"), which is a different statement from "not measured"."""

    def __init__(self, source: Sequence[str], target: Sequence[str], *, source_name: str, target_name: str) -> None:
        where = {canonical_au(n): i for i, n in enumerate(source)}
        missing = [canonical_au(n) for n in target if canonical_au(n) not in where]
        if missing:
            _, extra = au_difference(source, target)
            raise AUVocabularyError(f"{source_name}: AU list {list(source)} cannot feed {target_name} "
                                    f"{list(target)}: {describe_difference(missing, extra)}")
        self.index = [where[canonical_au(n)] for n in target]
        self.identity = self.index == list(range(len(source)))

    def __call__(self, vec: Optional[Sequence[float]]) -> Optional[list[float]]:
        if vec is None:
            return None
        if self.identity:
            return list(vec)
        return [vec[i] for i in self.index]


__all__ = ["AU_SCALES", "FACS_AU_PHRASES", "AUVocabularyError", "canonical_au", "canonical_aus", "au_difference",
           "describe_difference", "check_same_aus", "intersect", "to_unit", "AUAligner"]
