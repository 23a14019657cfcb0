"""Config section of `annotate`: real faces -> a FEText-style set (AUs + captions + labels where known).

    python run.py annotate annotate.root=DIR annotate.out=DIR [annotate.format=rafdb annotate.split=train] \
        annotate.aus.source=openface annotate.aus.csv=OPENFACE_OUT.csv \
        [annotate.captions.source=model annotate.captions.model=BLIP_FOLDER]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from datamodules.adapters import FORMATS
from lightning_synfer.config.choices import Choice
from lightning_synfer.config.errors import check


class AUAnnotationSource(Choice):
    none = "none"  # no AUs (captions and labels only)
    openface = "openface"  # OpenFace 2.x CSV: AU01_r ... AU45_r (0-5), success, confidence
    pyfeat = "pyfeat"  # py-feat Fex CSV: AU01 ... AU43 (probabilities), FaceScore, input
    libreface = "libreface"  # LibreFace CSV: au_k_intensity (0-5) / au_k (0/1), input_image_path
    model = "model"  # a TorchScript (or, with onnxruntime installed, ONNX) AU model: images -> (B, K)


class AUScaleName(Choice):
    unit = "unit"  # values in [0, 1] (probabilities)
    facs = "facs"  # FACS intensities 0-5
    logits = "logits"  # unbounded scores (a sigmoid maps them)


class LibreFaceValues(Choice):
    intensity = "intensity"  # au_k_intensity, 0-5 (DISFA's 12 AUs)
    presence = "presence"  # au_k, 0/1 (BP4D's 12 AUs)


class CaptionAnnotationSource(Choice):
    templates = "templates"  # from the label (where known) and the AUs
    file = "file"  # annotate.captions.file: 'image<TAB>caption' lines, or JSONL {"image": .., "caption": ..}
    model = "model"  # a local image-to-text model (BLIP, BLIP-2, LLaVA-style) through transformers


@dataclass
class AnnotateAUConfig:
    source: AUAnnotationSource = AUAnnotationSource.none
    csv: Optional[str] = None  # input: the tool's CSV, or a folder of per-image CSVs (OpenFace FaceLandmarkImg)
    min_confidence: float = 0.5  # faces below this detector confidence (OpenFace confidence, py-feat FaceScore) skip
    libreface_values: LibreFaceValues = LibreFaceValues.intensity
    model: Optional[str] = None  # input: a TorchScript file (.pt/.ts) or .onnx (needs onnxruntime)
    names: List[str] = field(default_factory=list)  # the model's AU list, in its output order
    scale: AUScaleName = AUScaleName.unit  # the model's output scale
    image_size: int = 224  # the model's input: resized RGB/L image, normalised with mean/std
    channels: int = 3
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class AnnotateCaptionConfig:
    source: CaptionAnnotationSource = CaptionAnnotationSource.templates
    file: Optional[str] = None  # input: captions per image (relative path, file name or stem)
    model: Optional[str] = None  # input: a transformers image-to-text folder (save_pretrained)
    prompt: str = "a photo of"  # text the captioner continues (BLIP) or answers (LLaVA-style: a question)
    keep_prompt: bool = True  # BLIP-style prompts start the caption; false for a question
    max_new_tokens: int = 30


@dataclass
class AnnotateConfig:
    """`annotate`: faces of a folder or a labelled dataset -> our dataset format with aus, au_names, caption, label."""

    root: Optional[str] = None  # input: a folder of face images, or a dataset root of `format`
    format: str = "images"  # images (any image files below root, unlabelled) | folder (FER2013) | rafdb | affectnet | sfew
    split: str = "train"  # for the dataset formats
    out: Optional[str] = None  # output folder (dataset.json + manifest.jsonl + images/); reruns resume into it
    aus: AnnotateAUConfig = field(default_factory=AnnotateAUConfig)
    captions: AnnotateCaptionConfig = field(default_factory=AnnotateCaptionConfig)
    batch_size: int = 16  # per device (the AU model and the captioner run per batch)
    shard_size: int = 1000  # images per sub-folder of images/


def validate_annotate(cfg) -> None:
    """Range checks of the section (one of compose.VALIDATORS)."""
    a = cfg.annotate
    formats = ("images", *FORMATS.names())
    check(a.format in formats, "annotate.format", a.format, f"one of {formats}")
    check(a.batch_size >= 1, "annotate.batch_size", a.batch_size, "a per-device batch size >= 1")
    check(a.shard_size >= 1, "annotate.shard_size", a.shard_size, "images per folder >= 1")
    u = a.aus
    check(0.0 <= u.min_confidence <= 1.0, "annotate.aus.min_confidence", u.min_confidence, "a value in [0, 1]")
    if u.source in ("openface", "pyfeat", "libreface"):
        check(bool(u.csv), "annotate.aus.csv", u.csv, f"the {u.source} CSV (or folder of CSVs) with the AUs")
    if u.source == "model":
        check(bool(u.model), "annotate.aus.model", u.model, "a TorchScript (.pt/.ts) or ONNX AU model file")
        check(len(u.names) > 0, "annotate.aus.names", list(u.names), "the model's AU list in its output order")
        check(u.channels in (1, 3), "annotate.aus.channels", u.channels, "1 or 3")
        check(len(u.mean) == u.channels and len(u.std) == u.channels, "annotate.aus.mean/std",
              [list(u.mean), list(u.std)], f"{u.channels} values each")
    c = a.captions
    check(c.source != "file" or bool(c.file), "annotate.captions.file", c.file, "a caption file with captions=file")
    check(c.source != "model" or bool(c.model), "annotate.captions.model", c.model,
          "a local image-to-text model folder with captions=model")
    check(c.max_new_tokens >= 1, "annotate.captions.max_new_tokens", c.max_new_tokens, "at least 1 token")
