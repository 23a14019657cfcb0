"""Tiny on-disk fixture datasets for tests (real JPEG/PNG files written with PIL).

Every builder takes a root folder (usually pytest's tmp_path), creates the dataset inside it and
returns the dataset root as a Path. Images are small and deterministic: the mean brightness
depends on the class, so a model can even learn something from them.
"""
from __future__ import annotations

import csv
import json
import shutil
import stat
import string
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from lightning.pytorch.callbacks import Callback
from PIL import Image

# Folder names of the FER2013 image release (note the aliases angry/surprise, not anger).
FER2013_FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
SFEW_FOLDERS = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
# A DISFA/BP4D-style AU list for synthetic sets.
DEFAULT_AU_NAMES = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU09", "AU12", "AU15", "AU17", "AU20", "AU25", "AU26")


def write_image(path, *, size: int = 48, mode: str = "L", seed: int = 0, level: Optional[int] = None) -> Path:
    """Write a small noise image (format from the extension). `level` sets the mean brightness."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256) if level is None else level
    channels = 3 if mode == "RGB" else 1
    noise = rng.normal(0, 20, size=(size, size, channels))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr)  # uint8 2-D -> "L", HxWx3 -> "RGB"
    img.save(path)
    return path


def _class_level(index: int, num: int) -> int:
    return int(30 + 190 * index / max(num - 1, 1))


def make_folder_dataset(root, classes: Sequence[str] = FER2013_FOLDERS, per_class: int = 4, size: int = 48,
                        mode: str = "L", split: Optional[str] = None, ext: str = ".jpg") -> Path:
    """root/<class>/<i>.jpg, or root/<split>/<class>/<i>.jpg when `split` is given. Returns root."""
    root = Path(root)
    base = root / split if split else root
    for ci, cls in enumerate(classes):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_image(base / cls / f"{i:04d}{ext}", size=size, mode=mode,
                        seed=ci * 1000 + i, level=_class_level(ci, len(classes)))
    return root


def make_rafdb(root, n_train: int = 7, n_test: int = 7, size: int = 48, aligned: bool = True,
               codes: Optional[Sequence[int]] = None) -> Path:
    """RAF-DB basic layout: EmoLabel/list_patition_label.txt + Image/aligned (or original).

    Labels cycle through `codes` (default 1..7). Returns root.
    """
    root = Path(root)
    codes = list(codes) if codes is not None else list(range(1, 8))
    image_dir = root / "Image" / ("aligned" if aligned else "original")
    lines = []
    for prefix, count, width in (("train", n_train, 5), ("test", n_test, 4)):
        for i in range(1, count + 1):
            name = f"{prefix}_{i:0{width}d}.jpg"
            code = codes[(i - 1) % len(codes)]
            lines.append(f"{name} {code}")
            file_name = f"{prefix}_{i:0{width}d}_aligned.jpg" if aligned else name
            write_image(image_dir / file_name, size=size, mode="RGB", seed=zlib.crc32(name.encode()),
                        level=_class_level(int(code) % 7, 7) if str(code).isdigit() else 128)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")


def make_affectnet(root, n_train: int = 8, n_val: int = 8, size: int = 48,
                   codes: Optional[Sequence] = None, val_codes: Optional[Sequence] = None) -> Path:
    """AffectNet layout: training.csv / validation.csv + Manually_Annotated_Images/<sub>/<file>.jpg.

    Expressions cycle through `codes` (default 0..7); codes may include 8-10 or bad values for
    error tests. Returns root.
    """
    root = Path(root)
    codes = list(codes) if codes is not None else list(range(8))
    val_codes = list(val_codes) if val_codes is not None else codes
    root.mkdir(parents=True, exist_ok=True)
    for csv_name, count, split_codes in (("training.csv", n_train, codes), ("validation.csv", n_val, val_codes)):
        with open(root / csv_name, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(AFFECTNET_COLUMNS)
            for i in range(count):
                code = split_codes[i % len(split_codes)]
                rel = f"{100 + i % 3}/{csv_name[:5]}_{i:05d}.jpg"
                write_image(root / "Manually_Annotated_Images" / rel, size=size, mode="RGB", seed=i,
                            level=_class_level(int(code) % 8, 8) if str(code).lstrip("-").isdigit() else 128)
                landmarks = ";".join(str(v) for v in range(10))
                writer.writerow([rel, 0, 0, size, size, landmarks, code, 0.1, -0.2])
    return root


def make_sfew(root, per_class: int = 2, size: int = 48, splits: Sequence[str] = ("Train", "Val"),
              classes: Sequence[str] = SFEW_FOLDERS) -> Path:
    """SFEW 2.0 layout: root/Train/<Class>/*.png, root/Val/<Class>/*.png. Returns root."""
    root = Path(root)
    for split in splits:
        make_folder_dataset(root, classes=classes, per_class=per_class, size=size, mode="RGB",
                            split=split, ext=".png")
    return root


def make_synthetic_set(root, n: int = 16, num_classes: int = 7, aus: bool = True, soft: bool = False,
                       size: int = 48, mode: str = "RGB", version: Optional[int] = None,
                       au_names: Sequence[str] = DEFAULT_AU_NAMES) -> Path:
    """A synthetic set in the manifest format (dataset.json + manifest.jsonl + images/). Returns root.

    Labels cycle over the classes; with `soft`, each record gets a label_soft peaked on its label;
    with `aus`, each record gets deterministic AU intensities in [0, 1].
    """
    from datamodules.labels import CANONICAL_8
    from datamodules.synthetic import write_header, write_manifest

    root = Path(root)
    label_names = list(CANONICAL_8[:num_classes])
    write_header(str(root), label_names, list(au_names) if aus else [], image_size=size,
                 channels=3 if mode == "RGB" else 1, generator="fixture")
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        label = i % num_classes
        rel = f"images/{i:06d}.png"
        write_image(root / rel, size=size, mode=mode, seed=i, level=_class_level(label, num_classes))
        rec = {"id": f"syn-{i:06d}", "image": rel, "label": label,
               "caption": f"a photo of a {label_names[label]} face", "seed": i, "generator": "fixture"}
        if soft:
            dist = np.full(num_classes, 0.2 / max(num_classes - 1, 1))
            dist[label] = 0.8
            rec["label_soft"] = [float(p) for p in dist / dist.sum()]
        if aus:
            rec["aus"] = [float(v) for v in rng.uniform(0, 1, len(au_names)).round(4)]
        records.append(rec)
    write_manifest(str(root), records, version=version)
    return root


def make_tiny_sd(root) -> Path:
    """A diffusers SD folder built from config dicts: tiny UNet (4 latent channels), VAE (downsamples by 2), CLIP
    text model + tokenizer (16 positions), scheduler; every part saved with save_pretrained. Returns root."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=2, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16, vocab_size=100)).save_pretrained(root / "text_encoder")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "',.-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (root / "tok_src").mkdir()
    (root / "tok_src" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok_src" / "merges.txt").write_text("#version: 0.2\n")  # no merges: character-level BPE
    # model_max_length = the text model's positions: a stock StableDiffusionPipeline pads prompts to it.
    CLIPTokenizer(str(root / "tok_src" / "vocab.json"), str(root / "tok_src" / "merges.txt"),
                  model_max_length=16).save_pretrained(root / "tokenizer")
    # SD 1.5's schedule, steps_offset included (a stock pipeline rewrites an older config's 0 to 1).
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  steps_offset=1).save_pretrained(root / "scheduler")
    shutil.rmtree(root / "tok_src")
    from lightning_synfer.models.diffusers_interop import pipeline_index

    (root / "model_index.json").write_text(json.dumps(pipeline_index("DDPMScheduler")))  # as SD 1.5's folder has
    return root


def write_fetext(affectnet_root, num_classes: int = 7) -> Path:
    """The FEText annotation the paper generator configs train on, INTO an AffectNet root (make_affectnet): the
    synthetic dataset format (dataset.json + manifest.jsonl), one record per training image with its AffectNet path,
    label, an expression caption and AU intensities (the procedural faces' AU list). Returns the root."""
    from datamodules.adapters import load_records
    from datamodules.labels import LabelSpace
    from datamodules.procedural.aus import AU_NAMES
    from datamodules.synthetic import write_header, write_manifest

    root = Path(affectnet_root)
    space = LabelSpace.from_num_classes(num_classes)
    rng = np.random.default_rng(0)
    records = []
    for i, rec in enumerate(load_records("affectnet", str(root), "train", space)):
        name = space.names[rec.label]
        records.append({"id": f"fetext-{i:06d}", "image": str(Path(rec.image).relative_to(root.resolve())),
                        "label": int(rec.label), "caption": f"a photo of a {name} face",
                        "aus": [float(v) for v in rng.uniform(0, 1, len(AU_NAMES)).round(4)]})
    write_header(str(root), list(space.names), list(AU_NAMES), generator="fetext-fixture")
    write_manifest(str(root), records, version=1)
    return root


def fake_tool(folder, name: str, body: str) -> Path:
    """An executable shell script `folder/name` running `body`: a stand-in for sbatch, srun, scontrol on PATH."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


class CrashAfter(Callback):
    """Simulates a preemption of a prediction task: raises after `n` batches were written (the writer runs first)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 >= self.n:
            raise RuntimeError("simulated preemption")
