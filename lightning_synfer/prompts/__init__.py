"""Zero-shot classification by prompt ensembles: class prompts from templates x class words, one text embedding per
class (the mean of its prompts' normalised embeddings, normalised again), logits = scale · image · classᵀ.

    PromptSet.load(path_or_None)      templates + class words (default: fer.yaml beside this file)
    PromptSet.prompts(label_names)    {class: [prompt, ...]}
    class_embeddings(encode, prompts) (C, D) normalised class embeddings from an `encode(list[str]) -> (N, D)`
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from datamodules.labels import canonical_name

DEFAULT_FILE = Path(__file__).with_name("fer.yaml")


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class PromptSet:
    templates: tuple[str, ...]
    class_words: Mapping[str, tuple[str, ...]]
    source: str = str(DEFAULT_FILE)

    @classmethod
    def load(cls, path: Optional[str] = None) -> "PromptSet":
        """A YAML file with `templates` (and optionally `class_words`), or a text file of templates, one per line.
        Class words a file leaves out come from the default set."""
        import yaml

        default = yaml.safe_load(DEFAULT_FILE.read_text(encoding="utf-8"))
        words = {canonical_name(k): tuple(v) for k, v in default["class_words"].items()}
        if path is None:
            return cls(tuple(default["templates"]), words, str(DEFAULT_FILE))
        file = Path(path)
        if not file.is_file():
            raise PromptError(f"clip.prompts.file={path}: no such file (a YAML with templates/class_words, or a text "
                              f"file with one template per line)")
        text = file.read_text(encoding="utf-8")
        if file.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict) or not isinstance(data.get("templates"), list):
                raise PromptError(f"clip.prompts.file={path}: expected a mapping with a list `templates`")
            templates = [str(t) for t in data["templates"]]
            for name, ws in (data.get("class_words") or {}).items():
                ws = [ws] if isinstance(ws, str) else list(ws)
                if not ws:
                    raise PromptError(f"clip.prompts.file={path}: class_words.{name} is empty")
                words[canonical_name(name, source=str(path))] = tuple(str(w) for w in ws)
        else:
            templates = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise PromptError(f"clip.prompts.file={path}: " + (f"templates {bad[:3]} need exactly one {{}} (the class "
                                                               f"word)" if bad else "no templates"))
        return cls(tuple(templates), words, str(file))

    def prompts(self, label_names: Sequence[str], ensemble: bool = True) -> dict[str, list[str]]:
        """Every template with every word of each class, or (ensemble=False) the first template with the first word."""
        out = {}
        for name in label_names:
            words = self.class_words.get(canonical_name(name), (name,))
            if ensemble:
                out[name] = [t.format(w) for t in self.templates for w in words]
            else:
                out[name] = [self.templates[0].format(words[0])]
        return out


def class_embeddings(encode: Callable[[list[str]], torch.Tensor], prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(C, D): per class, the mean of its prompts' normalised embeddings, normalised (in `prompts`' class order)."""
    flat = [p for ps in prompts.values() for p in ps]
    emb = F.normalize(encode(flat).float(), dim=-1)
    rows, start = [], 0
    for ps in prompts.values():
        rows.append(emb[start:start + len(ps)].mean(0))
        start += len(ps)
    return F.normalize(torch.stack(rows), dim=-1)
