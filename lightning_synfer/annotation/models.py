"""The models `annotate` may run on the faces: a user's AU model and an image captioner; plus captions from a file
and from templates.

AU model: a TorchScript file (`torch.jit.save`), or an ONNX file when onnxruntime is installed, mapping
(B, C, H, W) normalised images to (B, K) scores on a declared scale, K = len(annotate.aus.names).
Captioner: a local transformers image-to-text folder (BLIP, BLIP-2, LLaVA-style) through `pipeline`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datamodules.au_vocabulary import FACS_AU_PHRASES, canonical_aus, to_unit
from datamodules.labels import canonical_name
from lightning_synfer.config.errors import ConfigError

TEMPLATE_AU_THRESHOLD = 0.3  # AUs at least this strong are named in a template caption
TEMPLATE_AU_MAX = 3


class AUModel:
    """images (B, C, H, W), already resized and normalised -> AU values (B, K) in [0, 1]."""

    def __init__(self, path: str, names: Sequence[str], scale: str) -> None:
        self.path = str(path)
        self.names = canonical_aus(list(names), source="annotate.aus.names")
        self.scale = str(scale)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"annotate.aus.model={path}: no such file (a TorchScript or ONNX AU model)")
        self.session = None
        if self.path.lower().endswith(".onnx"):
            try:
                import onnxruntime
            except ImportError:
                raise ConfigError(f"annotate.aus.model={path}: an ONNX model needs onnxruntime, which is not installed "
                                  f"here; export the model to TorchScript (torch.jit.trace + torch.jit.save, "
                                  f"a .pt file) or install onnxruntime") from None
            self.session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self.module = None
        else:
            try:
                self.module = torch.jit.load(self.path, map_location="cpu").eval()
            except RuntimeError as exc:
                raise ConfigError(f"annotate.aus.model={path}: not a TorchScript file ({str(exc).splitlines()[0]}); "
                                  f"expected torch.jit.save output, or an .onnx file") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[float]]:
        if self.session is not None:
            feed = {self.session.get_inputs()[0].name: images.float().cpu().numpy()}
            scores = torch.from_numpy(np.asarray(self.session.run(None, feed)[0]))
        else:
            scores = self.module(images.float())
        scores = torch.as_tensor(scores).float().cpu()
        if scores.ndim != 2 or scores.shape[1] != len(self.names):
            raise ValueError(f"annotate.aus.model={self.path}: output of shape {tuple(scores.shape)}; expected "
                             f"(batch, {len(self.names)}), one value per AU of annotate.aus.names {self.names}")
        return [[to_unit(v, self.scale) for v in row] for row in scores.tolist()]


def model_input(path: str, size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return (t - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class ImageCaptioner:
    """A local image-to-text model: one caption per image, greedy (a rerun writes the same caption)."""

    def __init__(self, model_dir: str, *, prompt: str, keep_prompt: bool, max_new_tokens: int) -> None:
        from lightning_synfer.models.local_pipelines import image_captioning_task, local_pipeline

        self.task = image_captioning_task()
        self.pipe = local_pipeline(self.task, model_dir, key="annotate.captions.model")
        self.prompt, self.keep_prompt, self.max_new_tokens = str(prompt), bool(keep_prompt), int(max_new_tokens)

    def __call__(self, paths: Sequence[str]) -> list[str]:
        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "generate_kwargs": {"do_sample": False}}
        if self.task == "image-text-to-text":
            out = self.pipe(images=images, text=[self.prompt] * len(images), return_full_text=self.keep_prompt,
                            **kwargs)
        else:  # transformers 4: image-to-text takes the prompt as a keyword
            out = self.pipe(images, prompt=self.prompt or None, **kwargs)
        captions = []
        for result in out:
            text = (result[0] if isinstance(result, list) else result)["generated_text"]
            captions.append(" ".join(str(text).split()))
        return captions


def read_caption_file(path: str) -> dict[str, str]:
    """{image reference: caption} from 'image<TAB>caption' lines or JSONL/JSON {"image": .., "caption": ..}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotate.captions.file={path}: no such file")
    out: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        items = json.loads(text)
    elif stripped.startswith("{"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            if "\t" not in line:
                raise ValueError(f"annotate.captions.file={path}:{lineno}: expected 'image<TAB>caption', got {line!r}")
            image, caption = line.split("\t", 1)
            items.append({"image": image, "caption": caption})
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("caption"), str):
            raise ValueError(f"annotate.captions.file={path}: entry {i} must have string keys 'image' and 'caption', "
                             f"got {item!r}")
        out[os.path.normpath(item["image"].strip())] = item["caption"].strip()
    return out


def lookup_caption(captions: dict[str, str], path: str, rel: str) -> Optional[str]:
    for key in (os.path.normpath(path), os.path.normpath(rel), Path(path).name, Path(path).stem):
        if key in captions:
            return captions[key]
    return None


def template_caption(label_name: Optional[str], aus: Optional[Sequence[float]], au_names: Sequence[str]) -> str:
    """'a close-up photo of a face with raised cheeks and pulled-up lip corners, looking happy' (no label: no
    'looking ...'); the strongest AUs first, deterministic."""
    from datamodules.procedural.captions import EXPRESSION_WORDS

    phrases = []
    if aus is not None:
        ranked = sorted(((float(v), n) for v, n in zip(aus, au_names) if float(v) >= TEMPLATE_AU_THRESHOLD),
                        key=lambda x: -x[0])
        phrases = [FACS_AU_PHRASES.get(n, n) for _, n in ranked[:TEMPLATE_AU_MAX]]
    text = "a close-up photo of a face"
    if phrases:
        text += " with " + (", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0])
    if label_name is not None:
        text += f", looking {EXPRESSION_WORDS[canonical_name(label_name)][0]}"
    return text
