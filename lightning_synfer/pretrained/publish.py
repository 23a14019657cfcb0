"""Write a trained generator into the package as a shipped base: `generator.publish_as=<name>` at the end of a fit.

The base holds the weights it samples with (the EMA copy, stored as its only weights, so that it stays small),
then PROVENANCE.json: the command, commit, data, steps, loss, the judged accuracy of its samples when
`generator.publish_judge` names a classifier, and the sha256 of every file (tests check them). The folder is
built beside its destination and renamed into place, so a half-written base is never found.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from datamodules.atomic import atomic_write_text, current_umask
from lightning_synfer.pretrained import PROVENANCE, SHIPPED_DIR, file_hashes


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@torch.no_grad()
def judged_sample_accuracy(gen: Any, judge_ckpt: str, per_class: int, steps: int, text_scale: float,
                           seed: int = 0) -> dict[str, Any]:
    """Share of label-caption samples (no AU input, no semantic guidance) the judge gives their intended class."""
    from datamodules.datamodule import label_caption
    from lightning_synfer.checkpoints import ImageClassifier, load_module
    from lightning_synfer.sampling.ddim import DDIMSampler, SamplerSettings

    judge = ImageClassifier(load_module(judge_ckpt, tasks=("supervised",))).eval()  # images in [0, 1] -> logits
    if list(judge.label_names) != list(gen.label_names):
        raise ValueError(f"generator.publish_judge={judge_ckpt}: classes {list(judge.label_names)}; the generator "
                         f"was trained on {list(gen.label_names)}")
    sampler = DDIMSampler(gen, SamplerSettings(steps=steps, text_scale=text_scale, au_scale=1.0))
    labels = torch.arange(len(gen.label_names)).repeat_interleave(per_class)
    correct, done = 0, 0
    for chunk in labels.split(64):
        captions = [label_caption(gen.label_names[int(i)]) for i in chunk]
        images = sampler.sample(captions, None, [seed + done + k for k in range(len(chunk))])
        done += len(chunk)
        pred = judge((images + 1) / 2).argmax(1)
        correct += int((pred == chunk).sum())
    return {"judge": str(judge_ckpt), "images": int(len(labels)), "steps": steps, "text_scale": text_scale,
            "accuracy": correct / len(labels)}


def publish(gen: Any, name: str, *, argv: list[str], data: dict[str, Any], steps: int, final_loss: Optional[float],
            sample_accuracy: Optional[dict[str, Any]] = None, dest_root: Path = SHIPPED_DIR) -> Path:
    """gen's sampling weights as `<dest_root>/<name>`, with PROVENANCE.json; returns the folder."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"generator.publish_as={name!r}: expected a plain folder name such as embedded_base")
    dest = Path(dest_root) / name
    tmp = Path(dest_root) / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ema, gen.ema = gen.ema, None
    try:
        if ema is not None:
            params = gen.trainable_parameters()
            ema.store(params)
            ema.copy_to(params)
        try:
            gen.save_pretrained(tmp)
        finally:
            if ema is not None:
                ema.restore(params)
    finally:
        gen.ema = ema
    mode = 0o666 & ~current_umask()  # safetensors writes 0600: a shipped base is read by everyone the umask allows
    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(mode)
    total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    prov = {
        "name": name, "command": "python run.py " + " ".join(argv), "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": sys.version.split()[0],
        "torch": torch.__version__, "machine": platform.machine(), "data": data, "steps": steps,
        "final_loss": final_loss, "sample_accuracy": sample_accuracy, "bytes": total,
        "weights": "EMA (stored as the only weights)", "files": file_hashes(tmp),
    }
    atomic_write_text(tmp / PROVENANCE, json.dumps(prov, indent=2) + "\n")
    old = Path(dest_root) / f".{name}.old-{os.getpid()}"
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
