"""Config sections of sampling, semantic guidance, layout start, synthesis and generation evaluation.

    python run.py synthesize gen.ckpt=PATH synth.num_images=N synth.out=DIR [sg.enabled=true sg.ckpt=...]
    python run.py evaluate-generation synth.dir=DIR judge.ckpt=PATH [real.root=DIR]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from datamodules.adapters import FORMATS


@dataclass
class SamplingConfig:
    """DDIM with compositional classifier-free guidance over text and AUs (lightning_synfer/sampling/ddim.py)."""

    steps: int = 50
    eta: float = 0.0  # 0 = deterministic DDIM; 1 = DDPM-like ancestral noise
    text_scale: float = 5.0  # s_text: eps_u + s_text (eps_text - eps_u) + ...
    au_scale_cfg: float = 2.0  # s_au:   ... + s_au (eps_text+au - eps_text); 1 = AUs used without extra push
    clip_sample: bool = True  # clip predicted x0 to [-1, 1] (pixel-space models collapse without it)
    use_ema: bool = True  # sample with the EMA weights when the generator has them


@dataclass
class SemanticGuidanceConfig:
    """Classifier gradient on the text embedding during the last `window` fraction of the DDIM steps."""

    enabled: bool = False
    scale: float = 0.05  # lambda_g: step length of each normalised update of the text embedding
    window: float = 0.3  # fraction of the LAST steps that are guided, in (0, 1]
    ckpt: Optional[str] = None  # FER classifier checkpoint (any `evaluate`-able one)


@dataclass
class LayoutConfig:
    """Start sampling from the DDIM inversion of a real face instead of pure noise."""

    enabled: bool = False
    root: Optional[str] = None  # a folder of face images
    format: str = "images"  # images (any image files below root) | folder | rafdb | affectnet | sfew | synthetic
    split: str = "train"  # for the dataset formats
    strength: float = 1.0  # in (0, 1]: fraction of the DDIM steps inverted and re-sampled (1 = from x_T)


@dataclass
class SynthConfig:
    num_images: int = 0  # total, when per_class is not given
    out: Optional[str] = None  # output folder (a synthetic dataset); reruns resume into it
    dir: Optional[str] = None  # evaluate-generation: the synthetic dataset to judge
    per_class: Any = None  # optional counts: a list in label order or {class name: count}
    class_balanced: bool = True  # equal counts per class; false: the training set's class frequencies
    captions_file: Optional[str] = None  # one caption per line; 'label<TAB>caption' pins a class; {expression}
    au_source: str = "auto"  # auto (data.train AUs when it has them, else EMFACS) | data | emfacs
    au_sampling: str = "empirical"  # empirical (a real face's AUs of the class) | gaussian (class mean/cov)
    seed: int = 0
    batch_size: int = 8  # per device
    shard_size: int = 1000  # images per sub-folder of images/
    image_format: str = "png"


@dataclass
class GenConfig:
    ckpt: Optional[str] = None  # generator export folder or .ckpt


@dataclass
class JudgeConfig:
    ckpt: Optional[str] = None  # FER classifier that judges the generated faces
    features: str = "backbone"  # FID/KID features: backbone (of feature_ckpt) | inception (local weights only)
    feature_ckpt: Optional[str] = None  # classifier whose backbone gives FID/KID features (default: judge.ckpt)
    inception_weights: Optional[str] = None  # local torch-fidelity Inception weights file (features=inception)
    batch_size: int = 64
    au_threshold: float = 0.5  # AU "active" threshold for AU accuracy
    kid_subset_size: int = 50


@dataclass
class RealConfig:
    root: Optional[str] = None  # real faces for FID/KID
    format: str = "images"  # images | folder | rafdb | affectnet | sfew | synthetic
    split: str = "train"
    max_images: int = 0  # 0 = all


SYNTHESIS_SECTIONS = {
    "sampling": SamplingConfig, "sg": SemanticGuidanceConfig, "layout": LayoutConfig, "synth": SynthConfig,
    "gen": GenConfig, "judge": JudgeConfig, "real": RealConfig,
}
IMAGE_SOURCE_FORMATS = ("images", *FORMATS.names())  # a folder of any images, or a registered dataset format


def validate_synthesis(cfg: Any) -> None:
    """Range checks for the sections above (appended to compose.VALIDATORS)."""
    from lightning_synfer.config.compose import _check

    s = cfg.sampling
    _check(s.steps >= 1, "sampling.steps", s.steps, "at least 1 DDIM step")
    _check(0.0 <= s.eta <= 1.0, "sampling.eta", s.eta, "a value in [0, 1]")
    _check(s.text_scale >= 0, "sampling.text_scale", s.text_scale, "a guidance scale >= 0 (1 = no CFG)")
    _check(s.au_scale_cfg >= 0, "sampling.au_scale_cfg", s.au_scale_cfg, "a guidance scale >= 0 (1 = no AU CFG)")
    g = cfg.sg
    _check(0.0 < g.window <= 1.0, "sg.window", g.window, "a fraction of the last DDIM steps in (0, 1]")
    _check(g.scale >= 0, "sg.scale", g.scale, "a step length lambda_g >= 0")
    lay = cfg.layout
    _check(0.0 < lay.strength <= 1.0, "layout.strength", lay.strength, "a fraction of the DDIM steps in (0, 1]")
    _check(lay.format in IMAGE_SOURCE_FORMATS, "layout.format", lay.format, f"one of {IMAGE_SOURCE_FORMATS}")
    y = cfg.synth
    _check(y.num_images >= 0, "synth.num_images", y.num_images, "a number of images >= 0")
    _check(y.batch_size >= 1, "synth.batch_size", y.batch_size, "a per-device batch size >= 1")
    _check(y.shard_size >= 1, "synth.shard_size", y.shard_size, "images per folder >= 1")
    _check(y.au_source in ("auto", "data", "emfacs"), "synth.au_source", y.au_source, "auto, data or emfacs")
    _check(y.au_sampling in ("empirical", "gaussian"), "synth.au_sampling", y.au_sampling, "empirical or gaussian")
    _check(y.image_format in ("png",), "synth.image_format", y.image_format, "png (lossless)")
    j = cfg.judge
    _check(j.features in ("backbone", "inception"), "judge.features", j.features, "backbone or inception")
    _check(j.batch_size >= 1, "judge.batch_size", j.batch_size, "a batch size >= 1")
    _check(0.0 < j.au_threshold < 1.0, "judge.au_threshold", j.au_threshold, "a value in (0, 1)")
    _check(j.kid_subset_size >= 2, "judge.kid_subset_size", j.kid_subset_size, "at least 2")
    r = cfg.real
    _check(r.format in IMAGE_SOURCE_FORMATS, "real.format", r.format, f"one of {IMAGE_SOURCE_FORMATS}")
    _check(r.max_images >= 0, "real.max_images", r.max_images, "0 (all) or a positive count")
