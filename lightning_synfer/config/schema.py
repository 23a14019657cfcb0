"""Structured config schemas. Every key a YAML file or the command line may set is declared here.

OmegaConf validates merges against these dataclasses, so a misspelt key or a wrong type fails at
composition time (see `compose.py` for the error messages). Task families (generator, labeler, SSL,
pipeline, sweeps) keep their own section dataclasses next to their code and are collected here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional

from datamodules.adapters import dataset_roots
from lightning_synfer.config.annotate import AnnotateConfig
from lightning_synfer.config.choices import Choice
from lightning_synfer.config.clip import ClipConfig
from lightning_synfer.config.generator import GeneratorConfig
from lightning_synfer.config.labeler import LabelerConfig, LabelingConfig
from lightning_synfer.config.ssl import SSLConfig
from lightning_synfer.config.synthesis import (AUSweepConfig, GenerationEvalConfig, GuidanceConfig, SamplingConfig,
                                               SynthesisConfig)
from lightning_synfer.config.pipeline import PipelineConfig
from lightning_synfer.config.sweep import SweepConfig


@dataclass
class _RunAndModelPaths:
    """Run, cache and model roots; experiments/paths/default.yaml lets environment variables override them."""

    runs_dir: str = "runs"
    cache_dir: str = ".cache"
    stable_diffusion: str = "/models/stable-diffusion-v1-5"
    clip: str = "/models/clip-vit-base-patch16"  # a transformers CLIPModel folder (task clip, clip.encoder=hf)


# Plus one dataset root per `paths.<name>` that a registered dataset format declares (datamodules/adapters:
# `register_format(..., roots={"rafdb": DatasetRoot("SYNFER_RAFDB", "/data/RAF-DB/basic")})`), defaulting to
# ${oc.env:<ENV>,<folder>}: a new dataset declares its root in its adapter file, not here.
PathsConfig = make_dataclass("PathsConfig", [
    (name, str, field(default=f"${{oc.env:{root.env},{root.default}}}")) for name, root in dataset_roots().items()
], bases=(_RunAndModelPaths,))
PathsConfig.__module__ = __name__  # pickle finds the class by name (Lightning keeps `config` in hparams only then)
PathsConfig.__doc__ = "Dataset, run and model roots (`paths.*`); environment variables override each of them."


@dataclass
class TrainerConfig:
    """Arguments of the one Trainer factory (`lightning_synfer.trainer.build_trainer`)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    # auto: bf16-mixed on GPUs and CPUs with native bf16 (AMX / AVX512-BF16), else 32-true (lightning_synfer/hardware.py)
    precision: str = "auto"
    max_epochs: int = 10
    max_steps: int = -1
    max_time: Optional[str] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    check_val_every_n_epoch: Optional[int] = 1  # null with an integer val_check_interval: validate every N steps across epochs
    val_check_interval: Any = None
    log_every_n_steps: int = 10
    fast_dev_run: Any = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    num_sanity_val_steps: int = 0
    deterministic: Any = False
    # null (auto): SyncBatchNorm when the module family needs global BatchNorm statistics (the SSL methods) and
    # more than one GPU process trains; true/false force it (lightning_synfer.trainer.resolve_sync_batchnorm).
    sync_batchnorm: Optional[bool] = None
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    checkpoint_every_n_steps: Optional[int] = None  # also save last.ckpt every N steps (preemption)
    detect_anomaly: bool = False


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    csv: bool = False
    log_confusion_matrix: bool = True


@dataclass
class DatasetConfig:
    """One dataset source. `format` picks the adapter; `embedded` renders procedural faces."""

    format: str = "embedded"  # embedded | folder | rafdb | affectnet | sfew | synthetic
    root: Optional[str] = None
    split: str = "train"
    num_images: int = 0  # embedded: how many faces to render; others: 0 = all, N = first N after shuffle
    seed: int = 0  # embedded: rendering seed; others: subset selection seed
    version: Optional[int] = None  # synthetic: manifest version (None = newest)
    identities: Optional[int] = None  # embedded: how many people the split draws (None: about one per 8 images)
    # few-shot: exactly `shots` images of every class (datamodules/fewshot.py), drawn after num_images with
    # shots_seed (null: the run's seed, so that seeds are episodes); an error when a class has fewer
    shots: int = 0
    shots_seed: Optional[int] = None
    repeat: int = 1  # the set's records this many times over (a K-shot set fills batches larger than it is)


@dataclass
class MixConfig:
    """How real and synthetic samples share each global batch (see datamodules/mixing.py)."""

    synthetic_ratio: float = 0.0  # share of synthetic samples in every batch, in [0, 1]
    synthetic_scale: float = 1.0  # synthetic-only epochs draw scale x |real train| samples


class AugmentPreset(Choice):
    fer = "fer"
    light = "light"  # flips only (generator training)
    none = "none"


@dataclass
class AugmentConfig:
    preset: AugmentPreset = AugmentPreset.fer
    crop_scale: List[float] = field(default_factory=lambda: [0.8, 1.0])
    hflip: float = 0.5
    rotation: float = 10.0
    color_jitter: float = 0.3
    random_erasing: float = 0.25


class AUPolicy(Choice):
    intersect = "intersect"  # sets with different AU lists: train on the AUs all share, warn about the rest
    strict = "strict"  # any difference between the sets' AU lists is an error


class OnBadImage(Choice):
    skip = "skip"  # leave undecodable images out (listed in bad_images.txt)
    error = "error"


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: Optional[DatasetConfig] = None
    test: Optional[DatasetConfig] = None
    synthetic: Optional[DatasetConfig] = None
    mix: MixConfig = field(default_factory=MixConfig)
    num_classes: int = 7
    image_size: int = 48
    channels: int = 1
    batch_size: int = 64  # GLOBAL batch: split over devices x nodes, same samples at any world size
    eval_batch_size: int = 256  # per device
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool = True
    on_bad_image: OnBadImage = OnBadImage.skip
    verify_images: bool = True  # check headers of every file at setup; decode errors at run time
    mean: Optional[List[float]] = None  # None: from the backbone's pretrained_cfg, else 0.5
    std: Optional[List[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The AU vocabulary (order of batch["aus"], the FAU adapter's inputs, the AU head's outputs); null: the training
    # set's own list (dataset.json au_names; the renderer's 14 AUs for embedded faces). Any spelling: AU01, AU1, au_1.
    au_names: Optional[List[str]] = None
    au_policy: AUPolicy = AUPolicy.intersect


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    pretrained_path: Optional[str] = None  # local timm weights (.pth/.safetensors); never downloads
    init_from: Optional[str] = None  # warm start: weights of one of our classifier .ckpt files (fresh optimizer)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    small_input: bool = False  # ResNet family: drop the stem max-pool for 32-64 px inputs
    au_head: bool = False  # optional AU-regression head (AU error of generated faces)
    au_loss_weight: float = 1.0
    channels_last: Any = "auto"  # auto | true | false; auto: on where the precision is bf16/fp16 (hardware.py)
    compile: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


class OptimizerName(Choice):
    adamw = "adamw"
    sgd = "sgd"
    lars = "lars"


class SchedulerName(Choice):
    warmup_cosine = "warmup_cosine"
    constant = "constant"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: SchedulerName = SchedulerName.warmup_cosine
    warmup_fraction: float = 0.05  # of trainer.estimated_stepping_batches
    min_lr_ratio: float = 0.01
    scale_lr_with_batch: bool = False  # lr * global_batch / 256 (SSL convention)


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    class_weights: Optional[List[float]] = None


@dataclass
class EvalConfig:
    """`evaluate` and the offline probes read the test set from data.test."""

    tta_hflip: bool = False  # average the class probabilities of the image and its mirror (val, test, evaluate)
    # Five-crop test-time augmentation (ten-crop with tta_hflip): also average over the four corner crops and
    # the centre crop, each tta_crop_fraction of the side and resized back to the input size.
    tta_crops: bool = False
    tta_crop_fraction: float = 0.9
    # `evaluate` only: more checkpoints whose class probabilities are averaged with ckpt's (a snapshot or
    # seed ensemble); all must share ckpt's label names and input normalisation.
    ensemble: List[str] = field(default_factory=list)


@dataclass
class Config:
    task: str = "supervised"  # which LightningModule family: supervised | generator | labeler | ssl
    experiment: str = "default"
    seed: int = 0
    resume: Optional[str] = None  # None | auto | PATH to a .ckpt
    ckpt: Optional[str] = None  # input checkpoint (evaluate, linear, knn, finetune)
    run_dir: Optional[str] = None  # explicit run directory (default: runs/<experiment>/<time>-<hash>)
    overwrite: bool = False
    notes: str = ""
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # synthesis and its evaluation (lightning_synfer/config/synthesis.py)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the DDIM sampler
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)  # semantic guidance while sampling
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)  # `synthesize` (with its layout start)
    generation_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # `evaluate-generation`
    au_sweep: AUSweepConfig = field(default_factory=AUSweepConfig)  # `au-sweep`: one face, one AU raised per row
    # self-supervised pre-training and probes (lightning_synfer/config/ssl.py)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    # the diffusion generator (lightning_synfer/config/generator.py)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # the main job as stages (lightning_synfer/config/pipeline.py)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # grids of runs and their launchers (lightning_synfer/config/sweep.py)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # the diffusion-feature pseudo-labeler and label rectification (lightning_synfer/config/labeler.py)
    labeler: LabelerConfig = field(default_factory=LabelerConfig)  # the model (task `labeler`)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)  # `label`: the ensemble vote on a synthetic set
    # the vision-language dual encoder (task `clip`) and zero-shot prompts (lightning_synfer/config/clip.py)
    clip: ClipConfig = field(default_factory=ClipConfig)
    # FEText-style annotation of real faces: AUs from tool CSVs or a model, captions (lightning_synfer/config/annotate.py)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    # Task families add their own section here (generator, labeler, ssl, synthesis, sweep, pipeline),
    # each a dataclass in lightning_synfer/config/<family>.py.


# Keys that do not change what a run computes: excluded from the run hash, so resume=auto finds
# the same run whatever these are set to.
VOLATILE_KEYS = ("resume", "run_dir", "overwrite", "notes", "trainer.enable_progress_bar")
