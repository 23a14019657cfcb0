"""Templated captions for faces: from identity + AUs + class, or from the class alone."""
from __future__ import annotations

from typing import Optional

import numpy as np

from datamodules.labels import canonical_name
from datamodules.procedural.aus import AU_DESCRIPTIONS, AU_NAMES, NUM_AUS

# The adjective(s) a caption uses for each class; the first one is the plain form.
EXPRESSION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "calm"),
    "happy": ("happy", "joyful"),
    "sad": ("sad", "unhappy"),
    "surprise": ("surprised", "astonished"),
    "fear": ("scared", "fearful"),
    "disgust": ("disgusted", "repulsed"),
    "anger": ("angry", "furious"),
    "contempt": ("contemptuous", "scornful"),
}

AU_CAPTION_THRESHOLD = 0.3  # AUs weaker than this are not worth a word
AU_CAPTION_MAX = 2

_FACE_TEMPLATES = (
    "a close-up photo of {person} with {features}, looking {expression}",
    "a photo of {person} with {features}, looking {expression}",
    "a portrait of {person} looking {expression}, with {features}",
    "a face of {person} with {features}, looking {expression}",
)
_RELAXED_FEATURES = ("a relaxed face", "a still face", "relaxed features")
_LABEL_TEMPLATES = (
    "a photo of a face looking {expression}",
    "a close-up photo of a {expression} face",
    "a photo of a person looking {expression}",
    "a {expression} facial expression",
)


def _expression_word(label_name: str, rng: Optional[np.random.Generator]) -> str:
    words = EXPRESSION_WORDS[canonical_name(label_name, source="caption")]
    # Mostly the plain word, so text encoders see one consistent name per class.
    if rng is None or rng.random() < 0.75:
        return words[0]
    return words[int(rng.integers(1, len(words)))]


def _person(identity) -> str:
    age = getattr(identity, "age", "young")
    gender = getattr(identity, "gender", "person")
    article = "an" if age[:1] in "aeiou" else "a"
    return f"{article} {age} {gender}"


def active_au_phrases(aus: np.ndarray, threshold: float = AU_CAPTION_THRESHOLD,
                      limit: int = AU_CAPTION_MAX) -> list[str]:
    """Descriptions of the strongest AUs above `threshold`, strongest first."""
    aus = np.asarray(aus, dtype=np.float64)
    if aus.shape != (NUM_AUS,):
        raise ValueError(f"aus must have shape ({NUM_AUS},) ordered as AU_NAMES, got {aus.shape}")
    order = np.argsort(-aus, kind="stable")
    return [AU_DESCRIPTIONS[AU_NAMES[i]] for i in order[:limit] if aus[i] > threshold]


def make_caption(label_name: str, aus: np.ndarray, identity, rng: Optional[np.random.Generator] = None) -> str:
    """e.g. 'a close-up photo of a young man with raised inner brows and a downturned mouth, looking sad'.

    identity: anything with `age` and `gender` attributes (renderer.Identity). rng=None picks the
    first template and the plain expression word, so the caption is fully determined by its inputs.
    """
    expression = _expression_word(label_name, rng)
    phrases = active_au_phrases(aus)
    if phrases:
        features = " and ".join(phrases)
    else:
        features = _RELAXED_FEATURES[0 if rng is None else int(rng.integers(len(_RELAXED_FEATURES)))]
    template = _FACE_TEMPLATES[0 if rng is None else int(rng.integers(len(_FACE_TEMPLATES)))]
    return template.format(person=_person(identity), features=features, expression=expression)


def label_caption(label_name: str, rng: Optional[np.random.Generator] = None) -> str:
    """A caption from the class alone, for datasets without AUs: 'a photo of a face looking happy'."""
    expression = _expression_word(label_name, rng)
    template = _LABEL_TEMPLATES[0 if rng is None else int(rng.integers(len(_LABEL_TEMPLATES)))]
    return template.format(expression=expression)
