"""`ssl` config section: self-supervised pre-training (MoCo v3, SimCLR, BYOL, DINO) and its evaluation.

Online evaluation runs during pre-training (a stop-gradient linear probe and a weighted kNN on real val
data); offline evaluation is `python run.py linear|finetune|knn ckpt=...` on a probe experiment.
Method defaults below are MoCo v3's; every experiment in experiments/ssl/ sets its method's values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

METHOD_NAMES = ("mocov3", "simclr", "byol", "dino")


@dataclass
class SSLAugConfig:
    """Multi-view augmentation: two global crops (asymmetric blur/solarize as in BYOL/MoCo v3) plus
    `local_crops` small crops (DINO multi-crop)."""

    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # global crops (MoCo v3 crop-min .2)
    hflip: float = 0.5
    color_jitter: float = 0.4  # brightness/contrast (and saturation for RGB) strength
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2  # RGB only
    blur_prob: List[float] = field(default_factory=lambda: [1.0, 0.1])  # per global view
    solarize_prob: List[float] = field(default_factory=lambda: [0.0, 0.2])  # per global view
    local_crops: int = 0  # DINO multi-crop: number of small crops (student only)
    local_size: int = 0  # 0: round(data.image_size * 96 / 224)
    local_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.2])
    # Face nuisances that crops and colour jitter do not cover (0 = off, the methods' published recipes):
    # in-plane head roll, light from one side and sensor noise. Views that differ in them teach invariance
    # to them, so that what is left to tell images apart is the face itself.
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    light_gradient: float = 0.0  # max strength of a directional brightness ramp (datamodules RandomLightGradient)
    noise_std: float = 0.0  # Gaussian noise on [0, 1] pixels, before normalisation


@dataclass
class SSLOnlineConfig:
    """Online evaluation during pre-training, logged as val/linear_acc and val/knn_acc."""

    linear_probe: bool = True  # a linear head on detached features, trained by its own CE in the same optimizer
    probe_lr: Optional[float] = None  # None: the (batch-scaled) main lr; the probe group has no weight decay
    probe_domains: str = "all"  # all | real: which training samples' labels the online probe learns from
    knn: bool = True
    knn_bank_size: int = 20000  # real train images (eval transform) in the online kNN bank; 0 = all


@dataclass
class SSLKNNConfig:
    """Weighted kNN (solo-learn / InstDisc): cosine similarity, votes weighted by exp(sim / temperature)."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class SSLProbeConfig:
    """Offline probes (`linear`, `finetune`): the backbone comes from ckpt=..., the data from this experiment."""

    backbone_lr_ratio: float = 0.1  # finetune: backbone lr = optim.lr x this (the head uses optim.lr)
    # The control every SSL number needs: probe a randomly initialised backbone (seeded by `seed`) of the
    # checkpoint's architecture and input format; the checkpoint's weights are not used.
    random_init: bool = False
    # Standardise the frozen features before the linear head (BatchNorm without affine, as MAE's linear probe):
    # SGD at one learning rate then suits any backbone, whatever the scale of its features (a random backbone's
    # can be far off unit scale, which would make the control look worse than it is).
    feature_norm: bool = True


@dataclass
class SSLConfig:
    method: str = "mocov3"  # mocov3 | simclr | byol | dino
    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096  # mocov3, byol
    temperature: float = 0.2  # mocov3 (ctr loss), simclr (NT-Xent)
    momentum_start: float = 0.99  # EMA teacher tau, cosine-increased to momentum_end (mocov3, byol, dino)
    momentum_end: float = 1.0
    # dino
    dino_bottleneck_dim: int = 256
    dino_output_dim: int = 65536
    dino_batch_norm: bool = False  # BN in the DINO head (ResNet backbones in the DINO paper use it)
    dino_norm_last_layer: bool = True
    dino_freeze_last_layer_epochs: int = 1
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.04
    dino_warmup_teacher_temp: float = 0.04
    dino_warmup_teacher_temp_epochs: int = 0
    dino_center_momentum: float = 0.9
    aug: SSLAugConfig = field(default_factory=SSLAugConfig)
    online: SSLOnlineConfig = field(default_factory=SSLOnlineConfig)
    knn: SSLKNNConfig = field(default_factory=SSLKNNConfig)
    probe: SSLProbeConfig = field(default_factory=SSLProbeConfig)


def validate_ssl(cfg) -> None:
    """Range checks for the `ssl` section (appended to compose.VALIDATORS)."""
    from lightning_synfer.config.compose import _check

    s = cfg.get("ssl")
    if s is None:
        return
    _check(s.method in METHOD_NAMES, "ssl.method", s.method, f"one of {', '.join(METHOD_NAMES)}")
    _check(s.temperature > 0, "ssl.temperature", s.temperature, "a value > 0")
    _check(0.0 <= s.momentum_start <= s.momentum_end <= 1.0, "ssl.momentum_start/momentum_end",
           (s.momentum_start, s.momentum_end), "0 <= momentum_start <= momentum_end <= 1")
    _check(s.knn.k >= 1, "ssl.knn.k", s.knn.k, "at least 1 neighbour")
    _check(s.knn.temperature > 0, "ssl.knn.temperature", s.knn.temperature, "a value > 0")
    _check(s.online.probe_domains in ("all", "real"), "ssl.online.probe_domains", s.online.probe_domains,
           "all or real")
    _check(s.online.knn_bank_size >= 0, "ssl.online.knn_bank_size", s.online.knn_bank_size, ">= 0 (0 = all)")
    a = s.aug
    _check(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "ssl.aug.crop_scale",
           list(a.crop_scale), "[min, max] with 0 < min <= max <= 1")
    _check(len(a.local_crop_scale) == 2 and 0 < a.local_crop_scale[0] <= a.local_crop_scale[1] <= 1,
           "ssl.aug.local_crop_scale", list(a.local_crop_scale), "[min, max] with 0 < min <= max <= 1")
    for key in ("blur_prob", "solarize_prob"):
        val = list(a[key])
        _check(len(val) == 2 and all(0 <= p <= 1 for p in val), f"ssl.aug.{key}", val,
               "two probabilities in [0, 1], one per global view")
    _check(a.local_crops >= 0, "ssl.aug.local_crops", a.local_crops, ">= 0")
    _check(0 <= a.rotation <= 180, "ssl.aug.rotation", a.rotation, "degrees in [0, 180]")
    _check(a.noise_std >= 0, "ssl.aug.noise_std", a.noise_std, ">= 0 (a standard deviation on [0, 1] pixels)")
    _check(0 <= a.light_gradient <= 1, "ssl.aug.light_gradient", a.light_gradient, "a strength in [0, 1]")
    if a.local_crops:
        _check(s.method == "dino", "ssl.aug.local_crops", a.local_crops, "0 unless ssl.method=dino (multi-crop)")
    _check(s.probe.backbone_lr_ratio >= 0, "ssl.probe.backbone_lr_ratio", s.probe.backbone_lr_ratio, ">= 0")
