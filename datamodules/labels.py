"""The canonical expression label space: one place for class names and their aliases.

Every adapter maps its own names or numeric codes (kept in the adapter, e.g. adapters/rafdb.py) onto these
indices, so a model trained on one dataset can be evaluated on another without remapping by hand.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

# Index order is the AffectNet order (0-7), which is also the order most papers use.
CANONICAL_8: tuple[str, ...] = (
    "neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt",
)
CANONICAL_7: tuple[str, ...] = CANONICAL_8[:7]

ALIASES: dict[str, str] = {
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy", "smile": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
    "contempt": "contempt", "contemptuous": "contempt",
}

class UnknownLabelError(ValueError):
    """A class name or code that does not map onto the canonical label space."""


def canonical_name(name: str, *, source: str = "") -> str:
    """Map any alias ('Angry', 'happiness', 'surprised') to its canonical name.

    Raises UnknownLabelError listing the known names and the closest match.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, list(ALIASES), n=1)
    hint = f" Did you mean '{ALIASES[close[0]]}'?" if close else ""
    where = f" in {source}" if source else ""
    raise UnknownLabelError(
        f"Unknown expression class '{name}'{where}. Known classes: {', '.join(CANONICAL_8)} "
        f"(aliases such as angry, happiness, sadness, surprised are accepted).{hint}"
    )


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of canonical class names (7 or 8 classes, or a user subset)."""

    names: tuple[str, ...] = CANONICAL_7

    @classmethod
    def from_num_classes(cls, num_classes: int) -> "LabelSpace":
        if num_classes == 7:
            return cls(CANONICAL_7)
        if num_classes == 8:
            return cls(CANONICAL_8)
        raise ValueError(f"num_classes must be 7 or 8 (canonical label space), got {num_classes}")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "LabelSpace":
        return cls(tuple(canonical_name(n) for n in names))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str, *, source: str = "") -> int:
        """Index of a (possibly aliased) class name; raises if it is not in this space."""
        canon = canonical_name(name, source=source)
        if canon not in self.names:
            raise UnknownLabelError(
                f"Class '{name}' ({canon}){' in ' + source if source else ''} is not in the label space "
                f"{list(self.names)}. Use the 8-class setting (data.num_classes=8) to keep contempt."
            )
        return self.names.index(canon)

    def contains(self, name: str) -> bool:
        try:
            return canonical_name(name) in self.names
        except UnknownLabelError:
            return False

    def remap_from(self, other: "LabelSpace") -> list[int]:
        """For each class of `other`, its index here (-1 where this space lacks it)."""
        return [self.names.index(n) if n in self.names else -1 for n in other.names]
