"""Config sections of sampling, semantic guidance, synthesis (with its layout start) and generation evaluation.

    python run.py synthesize synthesis.generator=PATH synthesis.num_images=N synthesis.out=DIR \
        [guidance.enabled=true guidance.classifier=CKPT]
    python run.py evaluate-generation generation_eval.dataset=DIR generation_eval.judge=CKPT \
        [generation_eval.real.root=DIR]
    python run.py au-sweep synthesis.generator=PATH [au_sweep.aus=[AU12,AU4]] [au_sweep.values=[0,0.5,1]]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from datamodules.adapters import FORMATS
from lightning_synfer.config.choices import Choice
from lightning_synfer.config.errors import check


class AUSource(Choice):
    auto = "auto"  # data.train's AUs when it has them, else EMFACS prototypes
    data = "data"
    emfacs = "emfacs"


class AUSampling(Choice):
    empirical = "empirical"  # a real face's AUs of the class
    gaussian = "gaussian"  # a draw from the class mean/cov


class CaptionSource(Choice):
    auto = "auto"  # synthesis.captions_file when given, else templates
    templates = "templates"  # the procedural caption templates (label + AUs)
    file = "file"  # lines of synthesis.captions_file
    training_set = "training_set"  # captions of the target class from the generator's training manifest
    llm = "llm"  # a local text-generation model rewrites the coarse caption (sampling/prompts.py)


class ImageFormat(Choice):
    png = "png"  # lossless


class FIDFeatures(Choice):
    backbone = "backbone"  # the judge's (or feature_ckpt's) backbone
    inception = "inception"  # torch-fidelity Inception, local weights only


@dataclass
class SamplingConfig:
    """DDIM with compositional classifier-free guidance over text and AUs (lightning_synfer/sampling/ddim.py)."""

    steps: int = 50
    eta: float = 0.0  # 0 = deterministic DDIM; 1 = DDPM-like ancestral noise
    text_scale: float = 5.0  # s_text: eps_u + s_text (eps_text - eps_u) + ...
    au_scale_cfg: float = 2.0  # s_au:   ... + s_au (eps_text+au - eps_text); 1 = AUs used without extra push
    clip_sample: bool = True  # clip predicted x0 to [-1, 1] (pixel-space models collapse without it)
    use_ema: bool = True  # sample with the EMA weights when the generator has them
    # Fraction of the first (noisiest) steps without CFG, the conditional pass alone: guidance in a limited interval
    # (Kynkaanniemi et al. 2024) keeps the diversity that CFG at high noise removes. 0 = CFG at every step.
    cfg_start: float = 0.0


@dataclass
class GuidanceConfig:
    """Semantic guidance: a classifier's gradient on the text embedding during the last `window` of the DDIM steps."""

    enabled: bool = False
    scale: float = 0.05  # lambda_g: step length of each normalised update of the text embedding
    window: float = 0.3  # fraction of the LAST steps that are guided, in (0, 1]
    classifier: Optional[str] = None  # input: FER classifier checkpoint (any `evaluate`-able one)


@dataclass
class LayoutConfig:
    """Start sampling from the DDIM inversion of a real face instead of pure noise."""

    enabled: bool = False
    root: Optional[str] = None  # input: a folder of face images
    format: str = "images"  # images (any image files below root) | folder | rafdb | affectnet | sfew | synthetic
    split: str = "train"  # for the dataset formats
    strength: float = 1.0  # in (0, 1]: fraction of the DDIM steps inverted and re-sampled (1 = from x_T)


@dataclass
class RealSetConfig:
    """The real training split whose size sets the synthetic set's (synthesis.real_multiple)."""

    format: str = "affectnet"  # any registered dataset format
    root: Optional[str] = None  # input: the real dataset folder
    split: str = "train"
    num_classes: int = 7  # the label space the split is counted in (AffectNet 7-class train: ~280K faces)


@dataclass
class PromptLLMConfig:
    """synthesis.captions=llm: the local model that turns 'coarse description + label + AUs' into a detailed prompt
    with the instruction `lightning_synfer.sampling.prompts.LLM_INSTRUCTION` (or `instruction`)."""

    model: Optional[str] = None  # input: a transformers text-generation folder (save_pretrained), never downloaded
    coarse: CaptionSource = CaptionSource.templates  # where the coarse description comes from
    max_new_tokens: int = 48
    instruction: Optional[str] = None  # null: LLM_INSTRUCTION; placeholders {caption}, {expression}, {aus}


@dataclass
class SynthesisConfig:
    """`synthesize`: which generator, what to generate and where to write it."""

    generator: Optional[str] = None  # input: generator export folder or .ckpt (from `fit experiment=generator/...`)
    out: Optional[str] = None  # output folder (a synthetic dataset); reruns resume into it
    num_images: int = 0  # total, when per_class is not given
    # Set size as a multiple of the real training set instead (the paper's 1x ... 5x): num_images =
    # round(real_multiple x |real_set|), counted when the task runs; null: num_images as given.
    real_multiple: Optional[float] = None
    real_set: RealSetConfig = field(default_factory=RealSetConfig)
    per_class: Any = None  # optional counts: a list in label order or {class name: count}
    class_balanced: bool = True  # equal counts per class; false: the training set's class frequencies
    captions_file: Optional[str] = None  # one caption per line; 'label<TAB>caption' pins a class; {expression}
    captions: CaptionSource = CaptionSource.auto  # where each image's prompt comes from (stored per record)
    llm: PromptLLMConfig = field(default_factory=PromptLLMConfig)
    au_source: AUSource = AUSource.auto
    au_sampling: AUSampling = AUSampling.empirical
    seed: int = 0
    batch_size: int = 8  # per device
    shard_size: int = 1000  # images per sub-folder of images/
    image_format: ImageFormat = ImageFormat.png
    layout: LayoutConfig = field(default_factory=LayoutConfig)


@dataclass
class RealImagesConfig:
    """The real faces that generated ones are compared with (FID/KID)."""

    root: Optional[str] = None  # input: real faces for FID/KID (null: no FID/KID)
    format: str = "images"  # images | folder | rafdb | affectnet | sfew | synthetic
    split: str = "train"
    max_images: int = 0  # 0 = all


@dataclass
class GenerationEvalConfig:
    """`evaluate-generation`: a judge classifier scores a synthetic set; FID/KID against real faces."""

    dataset: Optional[str] = None  # input: the synthetic dataset to judge (dataset.json + manifest)
    judge: Optional[str] = None  # input: FER classifier checkpoint that judges the generated faces
    features: FIDFeatures = FIDFeatures.backbone  # FID/KID features
    feature_ckpt: Optional[str] = None  # input: classifier whose backbone gives FID/KID features (default: judge)
    inception_weights: Optional[str] = None  # input: local torch-fidelity Inception weights file (features=inception)
    batch_size: int = 64
    au_threshold: float = 0.5  # AU "active" threshold for AU accuracy
    kid_subset_size: int = 50
    real: RealImagesConfig = field(default_factory=RealImagesConfig)


@dataclass
class AUSweepConfig:
    """`au-sweep`: one identity (a fixed seed and caption) with one AU raised across a row, one row per AU; every
    other AU stays 0. The generator is synthesis.generator, the sampler sampling.* (as `synthesize`)."""

    aus: List[str] = field(default_factory=lambda: ["AU12", "AU4"])  # lip corner puller, brow lowerer; any spelling
    values: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # AU intensities, in [0, 1]
    caption: str = "a close-up photo of a face looking neutral"
    seed: int = 0  # the x_T of every image: the same face throughout
    batch_size: int = 32  # images per sampler call
    cell_size: int = 96  # pixels per face in au_sweep.png (faces are upscaled, nearest neighbour)


IMAGE_SOURCE_FORMATS = ("images", *FORMATS.names())  # a folder of any images, or a registered dataset format


def validate_synthesis(cfg: Any) -> None:
    """Range checks for the sections above (one of compose.VALIDATORS)."""
    s = cfg.sampling
    check(s.steps >= 1, "sampling.steps", s.steps, "at least 1 DDIM step")
    check(0.0 <= s.eta <= 1.0, "sampling.eta", s.eta, "a value in [0, 1]")
    check(s.text_scale >= 0, "sampling.text_scale", s.text_scale, "a guidance scale >= 0 (1 = no CFG)")
    check(s.au_scale_cfg >= 0, "sampling.au_scale_cfg", s.au_scale_cfg, "a guidance scale >= 0 (1 = no AU CFG)")
    check(0.0 <= s.cfg_start < 1.0, "sampling.cfg_start", s.cfg_start, "a fraction of the steps in [0, 1)")
    g = cfg.guidance
    check(0.0 < g.window <= 1.0, "guidance.window", g.window, "a fraction of the last DDIM steps in (0, 1]")
    check(g.scale >= 0, "guidance.scale", g.scale, "a step length lambda_g >= 0")
    y = cfg.synthesis
    check(y.num_images >= 0, "synthesis.num_images", y.num_images, "a number of images >= 0")
    check(y.real_multiple is None or y.real_multiple > 0, "synthesis.real_multiple", y.real_multiple,
          "null (synthesis.num_images as given) or a multiple > 0 of the real training set's size")
    check(y.real_multiple is None or y.real_set.format in FORMATS.names(), "synthesis.real_set.format",
          y.real_set.format, f"one of {FORMATS.names()}")
    check(y.batch_size >= 1, "synthesis.batch_size", y.batch_size, "a per-device batch size >= 1")
    check(y.shard_size >= 1, "synthesis.shard_size", y.shard_size, "images per folder >= 1")
    check(y.captions != "file" or bool(y.captions_file), "synthesis.captions_file", y.captions_file,
          "a caption file when synthesis.captions=file")
    check(y.captions != "llm" or bool(y.llm.model), "synthesis.llm.model", y.llm.model,
          "a local text-generation model folder when synthesis.captions=llm")
    check(y.llm.coarse not in ("llm", "auto"), "synthesis.llm.coarse", y.llm.coarse,
          "templates, file or training_set (the description the LLM enriches)")
    check(y.llm.max_new_tokens >= 1, "synthesis.llm.max_new_tokens", y.llm.max_new_tokens, "at least 1 token")
    lay = y.layout
    check(0.0 < lay.strength <= 1.0, "synthesis.layout.strength", lay.strength,
          "a fraction of the DDIM steps in (0, 1]")
    check(lay.format in IMAGE_SOURCE_FORMATS, "synthesis.layout.format", lay.format, f"one of {IMAGE_SOURCE_FORMATS}")
    j = cfg.generation_eval
    check(j.batch_size >= 1, "generation_eval.batch_size", j.batch_size, "a batch size >= 1")
    check(0.0 < j.au_threshold < 1.0, "generation_eval.au_threshold", j.au_threshold, "a value in (0, 1)")
    check(j.kid_subset_size >= 2, "generation_eval.kid_subset_size", j.kid_subset_size, "at least 2")
    w = cfg.get("au_sweep")
    if w is not None:
        check(len(w.aus) >= 1, "au_sweep.aus", list(w.aus), "at least one AU name, e.g. [AU12, AU4]")
        check(len(w["values"]) >= 1 and all(0.0 <= float(v) <= 1.0 for v in w["values"]), "au_sweep.values",
              list(w["values"]), "a non-empty list of AU intensities in [0, 1]")
        check(w.batch_size >= 1, "au_sweep.batch_size", w.batch_size, "a batch size >= 1")
        check(w.cell_size >= 8, "au_sweep.cell_size", w.cell_size, "at least 8 pixels per face")
    r = j.real
    check(r.format in IMAGE_SOURCE_FORMATS, "generation_eval.real.format", r.format, f"one of {IMAGE_SOURCE_FORMATS}")
    check(r.max_images >= 0, "generation_eval.real.max_images", r.max_images, "0 (all) or a positive count")
