"""Prompt enrichment at synthesis (`synthesis.captions`): richer text conditions than the label templates.

- `training_set`: captions of the target class drawn from the generator's own training manifest (its stored
  `data.train`, or `data.synthetic` when it trained on that alone), with every expression word swapped to the
  target's, so a caption of a smiling face asked for as `sad` reads "sad" (`swap_expression_words`). Classes
  without captions draw from every class's captions, swapped.
- `llm`: a local text-generation model (a transformers folder, `synthesis.llm.model`) turns the coarse
  description + label + active AUs into a detailed prompt with `LLM_INSTRUCTION`; greedy decoding, so a rerun
  writes the same prompt. It runs inside each rank's predict step, over that rank's shard only.
Templates (datamodules/procedural/captions.py) remain the fallback: a class with no caption anywhere, an LLM
answer that is empty. Every record stores the prompt the generator saw (`caption`), how it was made
(`caption_source`) and, when an LLM rewrote it, the coarse description (`coarse_caption`).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence

import numpy as np

from datamodules.au_vocabulary import FACS_AU_PHRASES, canonical_au
from datamodules.labels import canonical_name
from datamodules.procedural import captions as cap

log = logging.getLogger(__name__)

# The instruction given to synthesis.llm.model; {caption}, {expression} and {aus} are filled per image.
LLM_INSTRUCTION = (
    "Rewrite the coarse description of a face photo as one detailed text-to-image prompt. "
    "Keep the facial expression {expression} and show these facial movements: {aus}.\n"
    "Coarse description: {caption}\n"
    "Detailed prompt:"
)
AU_ACTIVE = 0.3  # AUs at least this strong are named to the LLM (the caption templates' threshold)

# Noun forms of the classes ("a face showing anger"); adjectives come from captions.EXPRESSION_WORDS.
EXPRESSION_NOUNS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutrality",), "happy": ("happiness", "joy"), "sad": ("sadness",), "surprise": ("surprise",),
    "fear": ("fear",), "disgust": ("disgust",), "anger": ("anger", "rage"), "contempt": ("contempt",),
}


def _word_pattern(words: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b", re.IGNORECASE)


_ADJECTIVES = _word_pattern([w for words in cap.EXPRESSION_WORDS.values() for w in words] + ["smiling"])
_NOUNS = _word_pattern([w for words in EXPRESSION_NOUNS.values() for w in words])


def swap_expression_words(caption: str, target: str) -> str:
    """Every expression word of any class in `caption` becomes the target class's plain word (adjective or noun)."""
    name = canonical_name(target)
    adjective, noun = cap.EXPRESSION_WORDS[name][0], EXPRESSION_NOUNS[name][0]
    return _NOUNS.sub(noun, _ADJECTIVES.sub(adjective, caption))


def training_set_captions(gen_cfg: Any) -> tuple[dict[str, list[str]], list[str]]:
    """({canonical class: captions}, every caption) of the generator's own training set (its stored config)."""
    from datamodules.datamodule import FERDataModule

    data = gen_cfg.data
    key = "data.synthetic" if data.mix.synthetic_ratio >= 1.0 and data.synthetic is not None else "data.train"
    ds_cfg = data.synthetic if key == "data.synthetic" else data.train
    if ds_cfg is None:
        raise ValueError("synthesis.captions=training_set: the generator's config has no data.train to draw "
                         "captions from; use synthesis.captions=templates")
    dm = FERDataModule(gen_cfg)
    records = dm.load_records(ds_cfg, key)
    per_class: dict[str, list[str]] = {}
    every: list[str] = []
    for rec in records:
        if not rec.caption:
            continue
        every.append(rec.caption)
        if rec.label >= 0:
            per_class.setdefault(dm.label_space.names[rec.label], []).append(rec.caption)
    if not every:
        log.warning("synthesis.captions=training_set: the generator's %s (%s) has no captions; using templates",
                    key, ds_cfg.root or ds_cfg.format)
    return per_class, every


def pick_training_caption(pools: tuple[dict[str, list[str]], list[str]], label_name: str,
                          rng: np.random.Generator) -> Optional[str]:
    per_class, every = pools
    pool = per_class.get(canonical_name(label_name)) or every
    if not pool:
        return None
    return swap_expression_words(pool[int(rng.integers(len(pool)))], label_name)


def describe_active_aus(aus: Optional[Sequence[float]], au_names: Sequence[str], threshold: float = AU_ACTIVE) -> str:
    """'raised cheeks (AU6), pulled-up lip corners (AU12)' for the AUs at least `threshold` strong, strongest first."""
    if aus is None:
        return "none given"
    active = sorted(((float(v), canonical_au(n)) for v, n in zip(aus, au_names) if float(v) >= threshold),
                    key=lambda x: -x[0])
    if not active:
        return "a relaxed face"
    return ", ".join(f"{FACS_AU_PHRASES.get(n, n)} ({n})" for _, n in active)


class PromptEnricher:
    """synthesis.captions=llm: coarse caption + label + AUs -> a detailed prompt from a local text-generation model."""

    def __init__(self, model_dir: str, *, max_new_tokens: int = 48, instruction: str = LLM_INSTRUCTION,
                 device: Optional[str] = None) -> None:
        from lightning_synfer.models.local_pipelines import local_pipeline

        self.pipe = local_pipeline("text-generation", model_dir, key="synthesis.llm.model", device=device)
        self.model_dir = str(model_dir)
        self.max_new_tokens = int(max_new_tokens)
        self.instruction = instruction

    def instruction_for(self, caption: str, label_name: str, aus: Optional[Sequence[float]],
                        au_names: Sequence[str]) -> str:
        return self.instruction.format(caption=caption, expression=cap.EXPRESSION_WORDS[canonical_name(label_name)][0],
                                       aus=describe_active_aus(aus, au_names))

    def __call__(self, captions: Sequence[str], label_names: Sequence[str], aus: Optional[Sequence[Sequence[float]]],
                 au_names: Sequence[str]) -> list[tuple[str, str]]:
        """[(prompt, caption_source)] per image: the model's first non-empty line, or the coarse caption."""
        texts = [self.instruction_for(c, n, aus[i] if aus is not None else None, au_names)
                 for i, (c, n) in enumerate(zip(captions, label_names))]
        outputs = self.pipe(texts, max_new_tokens=self.max_new_tokens, do_sample=False, return_full_text=False)
        out = []
        for coarse, result in zip(captions, outputs):
            generated = (result[0] if isinstance(result, list) else result)["generated_text"]
            line = next((ln.strip() for ln in str(generated).splitlines() if ln.strip()), "")
            out.append((line, "llm") if line else (coarse, "llm_fallback_coarse"))
        return out
