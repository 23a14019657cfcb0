"""The DataModule every task shares: real + synthetic sources -> mixing sampler -> face transforms.

Batch format (dict), the same for every LightningModule:
    image       float (B, C, H, W), normalised; a list of such tensors for multi-view (SSL) transforms
    label       int64 (B,)           intended/hard label in the run's label space; -1 for an unlabelled face
                                     (generator training on `annotate`d folders only; label_soft is then all zero)
    label_soft  float (B, num_classes) distribution (one-hot for hard labels; rectified soft labels)
    aus         float (B, K)         AU intensities in [0, 1] ordered as `au_names`, the run's AU vocabulary
                                     (`resolve_au_names`: data.au_names or the training set's list); zeros if unknown
    has_aus     bool (B,)
    caption     list[str]            dataset caption, or a label template when the dataset has none
    domain      int64 (B,)           0 real, 1 synthetic
    index       int64 (B,)           index into the split's record list (prediction writers use it)
    skipped     list[str]            per sample: the undecodable files it stands in for ("\n"-joined), "" if none;
                                     how decode failures in loader workers reach the main process
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from datamodules.labels import LabelSpace
from datamodules.mixing import MixingBatchSampler, ResumableDataLoader
from datamodules.records import SYNTHETIC, BadImageError, BadImageLog, Record, to_pil
from datamodules.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


def default_au_names() -> list[str]:
    """The embedded renderer's AU list (datamodules/procedural/aus.py): the embedded faces' own vocabulary."""
    from datamodules.procedural.aus import AU_NAMES

    return list(AU_NAMES)


LABEL_FREE_TASKS = ("generator",)  # module families that train without class labels (captions + AUs suffice)
_AU_SOURCES = ("train", "synthetic", "val", "test")  # train first: by default the vocabulary is the training set's
_announced: set[str] = set()  # warnings already given in this process (fit resolves before the DataModule does)


def _warn_once(message: str) -> None:
    if message not in _announced:
        _announced.add(message)
        log.warning(message)


def dataset_au_names(ds_cfg: Any) -> Optional[tuple[list[str], str]]:
    """(AU list, where it is declared) of one configured set: the renderer's list for embedded faces, the header's
    `au_names` for synthetic-format sets (generated or `annotate`d); None for formats without AUs or an unreadable
    header (loading the set reports that one)."""
    if ds_cfg.format == "embedded":
        return default_au_names(), "the embedded renderer (datamodules/procedural/aus.py)"
    if ds_cfg.format != "synthetic" or not ds_cfg.root:
        return None
    from datamodules.synthetic import HEADER_FILE, ManifestError, read_header

    try:
        names = read_header(str(ds_cfg.root)).get("au_names") or []
    except (FileNotFoundError, ManifestError):
        return None
    return (list(names), os.path.join(str(ds_cfg.root), HEADER_FILE)) if names else None


def resolve_au_names(cfg: DictConfig) -> list[str]:
    """The run's AU vocabulary (canonical names, the order of `batch["aus"]`): `data.au_names`, or else the training
    set's own list. Every other set that declares AUs must fit it: with `data.au_policy: intersect` (the default)
    the vocabulary shrinks to the AUs all sets share, with a warning naming what each set loses; with `strict` any
    difference is an error. AUs that `data.au_names` asks for and a set lacks are always an error. When no set
    declares AUs, the renderer's list is kept (every sample then has `has_aus` false)."""
    from datamodules.au_vocabulary import (AUVocabularyError, au_difference, canonical_aus, describe_difference,
                                           intersect)

    data = cfg.data
    declared = []
    for name in _AU_SOURCES:
        ds_cfg = data.get(name)
        if ds_cfg is None:
            continue
        found = dataset_au_names(ds_cfg)
        if found is not None:
            declared.append((f"data.{name}", canonical_aus(found[0], source=found[1]), found[1]))
    explicit = data.get("au_names")
    if explicit:
        target = canonical_aus(list(explicit), source="data.au_names")
    elif declared:
        target = list(declared[0][1])
    else:
        return default_au_names()
    wanted = "data.au_names" if explicit else f"the training set's AU list ({declared[0][0]})"
    strict = data.get("au_policy", "intersect") == "strict"
    for key, names, where in declared:
        missing, extra = au_difference(names, target)
        if not (missing or extra):
            continue
        if strict or (explicit and missing):
            fix = "set data.au_policy=intersect to train on the AUs all sets share" if strict else \
                "drop them from data.au_names"
            raise AUVocabularyError(f"{key} ({where}): its AUs {names} do not match {wanted} {target}: "
                                    f"{describe_difference(missing, extra)}; {fix}")
        target = intersect(target, names)
    if not target:
        raise AUVocabularyError("data.*: the data sets share no AU ("
                                + "; ".join(f"{k} ({w}): {n}" for k, n, w in declared) + "); expected at least one "
                                "common AU, or data.au_names naming the AUs to use")
    for key, names, where in declared:
        _, dropped = au_difference(names, target)
        if dropped:
            _warn_once(f"{key} ({where}): AUs {dropped} are not in the run's AU vocabulary {target} "
                       f"(data.au_policy=intersect keeps the AUs all sets share); they are dropped from its samples")
    return target


def label_caption(name: str) -> str:
    """Caption for datasets without captions (FER2013, RAF-DB...): the expression in a template."""
    return f"a close-up photo of a face looking {name}"


FACE_CAPTION = "a close-up photo of a face"  # an unlabelled face without a caption


class FERDataset(Dataset):
    """Records -> samples. Bad images are skipped (substituted by the next good one) or raise."""

    def __init__(self, records: Sequence[Record], transform: Callable, *, mode: str, label_names: Sequence[str],
                 au_names: Sequence[str], on_bad_image: str = "skip", source: str = "") -> None:
        self.records = list(records)
        self.transform = transform
        self.mode = mode
        self.label_names = list(label_names)
        self.num_classes = len(self.label_names)
        self.au_dim = len(au_names)
        self.on_bad_image = on_bad_image
        self.source = source
        self.bad = BadImageLog()

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int, skipped: Optional[list[str]] = None) -> tuple[Image.Image, Record, int]:
        """Decode record `index`; with on_bad_image=skip, fall through to the next decodable record.

        The next record comes from this same dataset, so a substitute keeps the sample's domain and the mixing
        sampler's batch composition. Each failure is appended to `skipped` when given."""
        for attempt in range(min(len(self.records), 32)):
            i = (index + attempt) % len(self.records)
            rec = self.records[i]
            try:
                return to_pil(rec, self.mode), rec, i
            except BadImageError as exc:
                if self.on_bad_image == "error":
                    raise BadImageError(f"{self.source}: {exc} (set data.on_bad_image=skip to skip it)") from exc
                self.bad.add_new(str(exc))
                if skipped is not None:
                    skipped.append(str(exc))
        raise BadImageError(f"{self.source}: 32 consecutive undecodable images from index {index}; "
                            f"the dataset looks broken")

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        image, rec, _ = self.load(index, skipped)
        if rec.label_soft is not None:
            soft = torch.as_tensor(rec.label_soft, dtype=torch.float32)
        else:
            soft = torch.zeros(self.num_classes)  # stays all-zero for an unlabelled face (label -1)
            if rec.label >= 0:
                soft[rec.label] = 1.0
        has_aus = rec.aus is not None
        aus = torch.as_tensor(rec.aus, dtype=torch.float32) if has_aus else torch.zeros(self.au_dim)
        return {
            "image": self.transform(image),
            "label": torch.tensor(rec.label, dtype=torch.long),
            "label_soft": soft,
            "aus": aus,
            "has_aus": torch.tensor(has_aus),
            "caption": rec.caption or (label_caption(self.label_names[rec.label]) if rec.label >= 0 else FACE_CAPTION),
            "domain": torch.tensor(rec.domain, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            # In a loader worker `self.bad` is the worker's copy: the sample itself carries the failures home.
            "skipped": "\n".join(skipped),
        }


def scan_headers(records: Sequence[Record], bad: BadImageLog, policy: str, source: str) -> list[Record]:
    """Open every file's header (cheap: no decode) and drop files that are not images at all."""
    kept = []
    for rec in records:
        if rec.image is None:
            kept.append(rec)
            continue
        try:
            if os.path.getsize(rec.image) == 0:
                raise BadImageError(f"{rec.image}: zero-byte file")
            with Image.open(rec.image) as img:
                img.size  # noqa: B018 (header parse only)
            kept.append(rec)
        except (OSError, BadImageError, Image.DecompressionBombError) as exc:
            msg = str(exc) if isinstance(exc, BadImageError) else f"{rec.image}: not a readable image ({exc})"
            if policy == "error":
                raise BadImageError(f"{source}: {msg} (set data.on_bad_image=skip to skip it)") from exc
            bad.add(msg)
    return kept


def embedded_split_args(cfg: DictConfig, ds_cfg: DictConfig) -> dict[str, Any]:
    """render_split_cached / cache_file arguments of an embedded data set config: one place, so the `render` task
    finds exactly the cache files this DataModule reads."""
    return dict(split=ds_cfg.split, num_images=ds_cfg.num_images or 1000, size=cfg.data.image_size,
                channels=cfg.data.channels, seed=ds_cfg.seed, num_classes=cfg.data.num_classes,
                identities_per_split=ds_cfg.get("identities"), cache_dir=os.path.join(cfg.paths.cache_dir, "embedded"))


class FERDataModule(L.LightningDataModule):
    """Builds train (mixed), val and test loaders from `cfg.data`.

    `train_transform` replaces the default augmentation (SSL passes a MultiView); `normalization`
    (mean/std) comes from the model so that pretrained backbones see their own statistics.
    """

    def __init__(self, cfg: DictConfig, *, normalization: Optional[dict] = None,
                 train_transform: Optional[Callable] = None, run_dir: Optional[str] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.data = cfg.data
        self.label_space = LabelSpace.from_num_classes(self.data.num_classes)
        self.au_names = resolve_au_names(cfg)
        channels = self.data.channels
        norm = normalization or {}
        self.mean = list(self.data.mean or norm.get("mean") or [0.5] * channels)
        self.std = list(self.data.std or norm.get("std") or [0.5] * channels)
        self.mode = "L" if channels == 1 else "RGB"
        self._train_transform = train_transform
        self.run_dir = run_dir
        self.datasets: dict[str, FERDataset] = {}
        self.bad = BadImageLog()  # adapters + header scan, at setup
        self.runtime_bad = BadImageLog()  # decode failures reported by batches (any loader worker)
        self._bad_written = 0  # len(skipped_images) at the last write of bad_images.txt
        self._bad_epoch: Optional[int] = None  # trainer epoch of the last batch seen

    # -- sources -------------------------------------------------------------------------------------
    def load_records(self, ds_cfg: DictConfig, key: str) -> list[Record]:
        if ds_cfg.format == "embedded":
            from datamodules.procedural.dataset import render_split_cached

            records = render_split_cached(**embedded_split_args(self.cfg, ds_cfg)).to_records(domain=0)
            return self._align_aus(records, ds_cfg, key)
        from datamodules.adapters import load_records

        if not ds_cfg.root:
            raise ValueError(f"{key}.root is not set; {key}.format={ds_cfg.format} needs a dataset folder")
        loaded = load_records(ds_cfg.format, ds_cfg.root, ds_cfg.split, self.label_space, key=f"{key}.root",
                              version=ds_cfg.get("version"))
        skipped = list(loaded.skipped)  # the adapter already logged a summary of these
        records = list(loaded)
        records = self._align_aus(records, ds_cfg, key)
        records = self._keep_labelled(records, key, ds_cfg.root)
        if ds_cfg.num_images and ds_cfg.num_images < len(records):
            rng = np.random.default_rng(ds_cfg.seed)
            keep = np.sort(rng.choice(len(records), ds_cfg.num_images, replace=False))
            records = [records[i] for i in keep]
        if self.data.verify_images:
            records = scan_headers(records, self.bad, self.data.on_bad_image, f"{key} ({ds_cfg.root})")
        self.bad.extend(skipped)
        if not records:
            raise ValueError(f"{key}: no usable images under {ds_cfg.root} (format {ds_cfg.format}, "
                             f"split {ds_cfg.split}); expected at least one labelled image")
        return records

    def _align_aus(self, records: list[Record], ds_cfg: DictConfig, key: str) -> list[Record]:
        """Reorder a set's AU vectors into the run's vocabulary (`self.au_names`, from `resolve_au_names`). A set
        that declares no AUs keeps `aus=None` (has_aus false); one whose list lacks a vocabulary AU is an error."""
        from datamodules.au_vocabulary import AUAligner

        found = dataset_au_names(ds_cfg)
        if found is None:
            for rec in records:
                rec.aus = None
            return records
        align = AUAligner(found[0], self.au_names, source_name=f"{key} ({found[1]})",
                          target_name="the run's AU vocabulary")
        if not align.identity:
            for rec in records:
                rec.aus = align(rec.aus)
        return records

    def _keep_labelled(self, records: list[Record], key: str, root: str) -> list[Record]:
        """Unlabelled faces (`annotate` on a folder without classes: label -1) train the generator, which needs only
        captions and AUs; every other family needs a class, so they are left out there, counted and named."""
        unlabelled = [r for r in records if r.label < 0]
        if not unlabelled or self.cfg.get("task") in LABEL_FREE_TASKS:
            return records
        self.bad.extend([f"{root}: record {r.id!r} has no label ({key} of task {self.cfg.get('task')!r} needs one)"
                         for r in unlabelled])
        return [r for r in records if r.label >= 0]

    def build_dataset(self, name: str, transform: Callable) -> Optional[FERDataset]:
        ds_cfg = self.data.get(name)
        if ds_cfg is None:
            return None
        records = self.load_records(ds_cfg, f"data.{name}")
        if ds_cfg.get("shots"):  # few-shot: exactly K of every class (datamodules/fewshot.py)
            from datamodules.fewshot import draw_shots

            seed = ds_cfg.shots_seed if ds_cfg.get("shots_seed") is not None else self.cfg.get("seed", 0)
            records = draw_shots(records, ds_cfg.shots, seed, self.label_space.names, key=f"data.{name}.shots")
        if ds_cfg.get("repeat", 1) > 1:  # every copy gets its own augmentation draw (seeded per item)
            records = [r for _ in range(int(ds_cfg.repeat)) for r in records]
        if name == "synthetic":
            for r in records:
                r.domain = SYNTHETIC
        return FERDataset(records, transform, mode=self.mode, label_names=self.label_space.names,
                          au_names=self.au_names, on_bad_image=self.data.on_bad_image, source=f"data.{name}")

    def setup(self, stage: Optional[str] = None) -> None:
        size = self.data.image_size
        train_tf = self._train_transform or train_transform(self.data.augment, size, self.data.channels,
                                                            self.mean, self.std)
        eval_tf = eval_transform(size, self.mean, self.std)
        wanted = {"fit": ("train", "synthetic", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "fit", ("train", "synthetic", "val", "test"))
        for name in wanted:
            if name in self.datasets:
                continue
            if name == "train" and self.data.mix.synthetic_ratio >= 1.0 and self.data.train is None:
                continue
            ds = self.build_dataset(name, train_tf if name in ("train", "synthetic") else eval_tf)
            if ds is not None:
                self.datasets[name] = ds
        self._write_bad_image_log()

    # -- bad images met at run time ---------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Main process, every batch of every stage: collect the decode failures the batch reports."""
        if isinstance(batch, dict) and "skipped" in batch:
            for item in batch["skipped"]:
                for message in item.split("\n") if item else ():
                    self.runtime_bad.add_new(message, announce=False)  # the decoding process logged it
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else None
        if epoch != self._bad_epoch:  # first batch of a new epoch: the previous epoch's skips go to disk
            self._bad_epoch = epoch
            self._write_bad_image_log(only_if_new=True)
        return batch

    def teardown(self, stage: str) -> None:
        self._write_bad_image_log(only_if_new=True)

    def on_exception(self, exception: BaseException) -> None:
        self._write_bad_image_log(only_if_new=True)

    @property
    def runtime_skipped(self) -> list[str]:
        """Decode failures met while loading, each file once: reported by batches (loader workers) or met by
        the datasets in this process (num_workers=0, or direct indexing)."""
        seen, out = set(), []
        for log_ in (self.runtime_bad, *(d.bad for d in self.datasets.values())):
            for message in log_.skipped:
                if message not in seen:
                    seen.add(message)
                    out.append(message)
        return out

    @property
    def skipped_images(self) -> list[str]:
        return [*self.bad.skipped, *self.runtime_skipped]

    def _write_bad_image_log(self, only_if_new: bool = False) -> None:
        """Atomically (re)write the run dir's list of skipped images. Under DDP each rank writes the files its
        own shards met: rank 0 `bad_images.txt`, rank k `bad_images.rank<k>.txt` (only when it met any)."""
        names = self.skipped_images
        if not self.run_dir or not names or (only_if_new and len(names) == self._bad_written):
            return
        from datamodules.atomic import atomic_write_lines

        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None and trainer.world_size > 1 else 0
        if rank and not self.runtime_skipped:
            return  # rank 0 lists the setup-time skips, which every rank shares
        path = Path(self.run_dir) / ("bad_images.txt" if rank == 0 else f"bad_images.rank{rank}.txt")
        atomic_write_lines(path, names)
        self._bad_written = len(names)
        log.warning("%d bad images skipped; list in %s", len(names), path)

    # -- loaders -------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return max(1, trainer.world_size), trainer.global_rank

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.data.num_workers
        return dict(num_workers=workers, persistent_workers=self.data.persistent_workers and workers > 0,
                    pin_memory=self.data.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        real = self.datasets.get("train")
        synth = self.datasets.get("synthetic")
        parts = [d for d in (real, synth) if d is not None]
        world, rank = self._world()
        sampler = MixingBatchSampler(
            len(real) if real is not None else 0, len(synth) if synth is not None else 0,
            global_batch_size=self.data.batch_size, synthetic_ratio=self.data.mix.synthetic_ratio,
            synthetic_scale=self.data.mix.synthetic_scale, world_size=world, rank=rank, seed=self.cfg.seed)
        # ConcatDataset order matches the sampler's index space: real first, then synthetic.
        dataset = SeededConcatDataset(parts if real is not None else [_Empty(), synth])
        return ResumableDataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def _eval_loader(self, name: str) -> DataLoader:
        if name not in self.datasets:
            raise ValueError(f"data.{name} is not configured; set data.{name}.root and data.{name}.format")
        ds = self.datasets[name]
        world, rank = self._world()
        sampler = DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=self.data.eval_batch_size, sampler=sampler, shuffle=False,
                          **self._loader_kwargs())

    def val_dataloader(self) -> Any:
        if self.data.get("val") is None:
            return []  # data.val: null: no validation (the Trainer factory then keeps last.ckpt only)
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    @property
    def num_skipped(self) -> int:
        return len(self.bad) + len(self.runtime_skipped)


class SeededConcatDataset(ConcatDataset):
    """The training set: real then synthetic records, fetched a batch at a time. When the batch sampler hands a
    `SeededBatch`, each item's augmentation draws from the torch RNG seeded with its own seed, and the global RNG
    is left untouched, so augmentations do not depend on loader workers or on where a resumed run restarted."""

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        seeds = getattr(indices, "seeds", None)
        if seeds is None:
            return [self[i] for i in indices]
        out = []
        for i, seed in zip(indices, seeds):
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also seed (or, without CUDA, queue with a stack
                # trace, ~1.7 ms an item) every accelerator's RNG, which fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(seed)
                out.append(self[i])
        return out


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> Any:
        raise IndexError(index)
