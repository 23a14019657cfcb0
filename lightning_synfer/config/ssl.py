"""`ssl` config section: self-supervised pre-training (MoCo v3, SimCLR, BYOL, DINO) and its evaluation.

Online evaluation runs during pre-training (a stop-gradient linear probe and a weighted kNN on real val
data); offline evaluation is `python run.py linear|finetune|knn ckpt=...` on a probe experiment.
Each method's own settings are a dataclass beside its class (lightning_synfer/modules/ssl/<method>.py), set
under `ssl.methods.<method>` and checked here against the method registry (`ssl.methods.dino.teacher_temp`).
Every experiment in experiments/ssl/ sets its method's values.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.registry import UnknownNameError
from lightning_synfer.config.errors import ConfigError, check
from lightning_synfer.modules.ssl import METHODS


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
    method: str = "mocov3"  # a registered method (lightning_synfer.modules.ssl.METHODS): mocov3, simclr, byol, dino
    # Each method's own settings, by method name: ssl.methods.dino.teacher_temp. Checked against the method's
    # settings dataclass (a misspelt key fails with the closest one); sections of other methods may stay, so
    # ssl.method can be switched on the command line.
    methods: Dict[str, Any] = field(default_factory=dict)
    proj_hidden_dim: int = 4096  # the projection head (every method)
    proj_output_dim: int = 256  # mocov3, simclr, byol
    pred_hidden_dim: int = 4096  # the predictor (mocov3, byol)
    momentum_start: float = 0.99  # EMA teacher tau, cosine-increased to momentum_end (momentum methods)
    momentum_end: float = 1.0
    aug: SSLAugConfig = field(default_factory=SSLAugConfig)
    online: SSLOnlineConfig = field(default_factory=SSLOnlineConfig)
    knn: SSLKNNConfig = field(default_factory=SSLKNNConfig)
    probe: SSLProbeConfig = field(default_factory=SSLProbeConfig)


def method_settings(name: str, values: Optional[Mapping[str, Any]] = None, *, name_key: str = "ssl.method") -> Any:
    """The settings dataclass of SSL method `name` filled from `values` (ssl.methods.<name>), type- and
    range-checked. A misspelt key fails naming the closest valid one; `name_key` is where `name` came from."""
    key = f"ssl.methods.{name}"
    try:
        entry = METHODS.get(name, key=name_key)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from None
    check(values is None or isinstance(values, Mapping), key, values, "a mapping of the method's settings")
    values = dict(values or {})
    valid = [f.name for f in dataclasses.fields(entry.settings)]
    for item in values:
        if item not in valid:
            close = difflib.get_close_matches(str(item), valid, n=1, cutoff=0.5)
            hint = f" Did you mean {key}.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key '{key}.{item}': not a setting of the {name} method "
                              f"({entry.settings.__name__}).{hint} Its settings: {', '.join(valid) or 'none'}.")
    try:
        settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.settings), values))
    except OmegaConfBaseException as exc:
        item = getattr(exc, "full_key", "") or getattr(exc, "key", "")
        raise ConfigError(f"config key '{key}.{item}' = {getattr(exc, 'value', None)!r}: "
                          f"{str(exc).splitlines()[0]}") from None
    if hasattr(settings, "validate"):
        settings.validate(key)
    return settings


def validate_ssl(cfg) -> None:
    """Range checks for the `ssl` section (appended to compose.VALIDATORS)."""
    s = cfg.get("ssl")
    if s is None:
        return
    check(0.0 <= s.momentum_start <= s.momentum_end <= 1.0, "ssl.momentum_start/momentum_end",
          (s.momentum_start, s.momentum_end), "0 <= momentum_start <= momentum_end <= 1")
    check(s.knn.k >= 1, "ssl.knn.k", s.knn.k, "at least 1 neighbour")
    check(s.knn.temperature > 0, "ssl.knn.temperature", s.knn.temperature, "a value > 0")
    check(s.online.probe_domains in ("all", "real"), "ssl.online.probe_domains", s.online.probe_domains,
          "all or real")
    check(s.online.knn_bank_size >= 0, "ssl.online.knn_bank_size", s.online.knn_bank_size, ">= 0 (0 = all)")
    a = s.aug
    check(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "ssl.aug.crop_scale",
          list(a.crop_scale), "[min, max] with 0 < min <= max <= 1")
    check(len(a.local_crop_scale) == 2 and 0 < a.local_crop_scale[0] <= a.local_crop_scale[1] <= 1,
          "ssl.aug.local_crop_scale", list(a.local_crop_scale), "[min, max] with 0 < min <= max <= 1")
    for key in ("blur_prob", "solarize_prob"):
        val = list(a[key])
        check(len(val) == 2 and all(0 <= p <= 1 for p in val), f"ssl.aug.{key}", val,
              "two probabilities in [0, 1], one per global view")
    check(a.local_crops >= 0, "ssl.aug.local_crops", a.local_crops, ">= 0")
    check(0 <= a.rotation <= 180, "ssl.aug.rotation", a.rotation, "degrees in [0, 180]")
    check(a.noise_std >= 0, "ssl.aug.noise_std", a.noise_std, ">= 0 (a standard deviation on [0, 1] pixels)")
    check(0 <= a.light_gradient <= 1, "ssl.aug.light_gradient", a.light_gradient, "a strength in [0, 1]")
    check(s.probe.backbone_lr_ratio >= 0, "ssl.probe.backbone_lr_ratio", s.probe.backbone_lr_ratio, ">= 0")
    if cfg.get("task") == "ssl":  # only here: reading the methods imports them (torch, lightly)
        _validate_methods(s)


def _validate_methods(s) -> None:
    """The method, the settings of every ssl.methods section, and the method's use of local crops."""
    check(s.method in METHODS, "ssl.method", s.method, f"a registered SSL method ({', '.join(METHODS.names())})")
    method_settings(s.method, s.methods.get(s.method))
    for name, values in s.methods.items():
        method_settings(name, values, name_key="ssl.methods")
    if s.aug.local_crops:
        multi_crop = [name for name, m in METHODS.items() if m.cls.uses_local_crops]
        check(METHODS.get(s.method).cls.uses_local_crops, "ssl.aug.local_crops", s.aug.local_crops,
              f"0 unless ssl.method uses local crops ({', '.join(multi_crop)})")
