"""Embedded default dataset: procedurally rendered faces driven by facial action units.

No downloads and no licences: faces are drawn with numpy + PIL from a seeded identity and an AU
vector, so the whole suite can train and test offline.
"""
from datamodules.procedural.aus import (
    AU_DESCRIPTIONS, AU_INDEX, AU_NAMES, EMFACS_PROTOTYPES, NUM_AUS, au_vector, sample_aus,
)
from datamodules.procedural.captions import EXPRESSION_WORDS, label_caption, make_caption
from datamodules.procedural.dataset import (
    SPLITS, EmbeddedSplit, render_split, render_split_cached,
)
from datamodules.procedural.renderer import Identity, render_face, sample_identity

__all__ = [
    "AU_DESCRIPTIONS", "AU_INDEX", "AU_NAMES", "EMFACS_PROTOTYPES", "NUM_AUS", "au_vector", "sample_aus",
    "EXPRESSION_WORDS", "label_caption", "make_caption",
    "SPLITS", "EmbeddedSplit", "render_split", "render_split_cached",
    "Identity", "render_face", "sample_identity",
]
