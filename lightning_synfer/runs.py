"""Run directories: one per run, holding everything needed to trust and resume it.

    runs/<experiment>/<YYYYmmdd-HHMMSS>-<hash8>/
        config.yaml        the resolved config
        provenance.json    git commit (and dirty flag), package versions, host, command line
        tb/                TensorBoard logs
        checkpoints/       best.ckpt, last.ckpt
        metrics.json       written last, by every task; tables are built from these files only

The hash covers the resolved config minus volatile keys (resume, run_dir, ...), so `resume=auto`
finds the newest run of the same config.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_synfer.config.compose import ConfigError, to_container
from lightning_synfer.config.schema import VOLATILE_KEYS
from datamodules.atomic import atomic_write_json, atomic_write_text

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "timm", "diffusers", "transformers", "peft",
            "lightly", "omegaconf", "numpy", "pillow")


def config_hash(cfg: DictConfig) -> str:
    data = to_container(cfg)
    for key in VOLATILE_KEYS:
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def package_versions() -> dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class RunDir:
    path: Path
    config_hash: str
    resumed_from: Optional[Path] = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return atomic_write_json(self.metrics_path, metrics)

    def last_checkpoint(self) -> Optional[Path]:
        """The newest resumable checkpoint: last.ckpt, or Lightning's hpc_ckpt_N.ckpt (saved in the run dir on a
        SLURM SIGUSR1 requeue) when that is newer."""
        return newest_resumable(self.path)


def newest_resumable(run_dir: Path) -> Optional[Path]:
    found = [p for p in (run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _experiment_root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.runs_dir) / cfg.experiment.replace("/", os.sep)


def find_resumable(cfg: DictConfig, digest: str) -> Optional[Path]:
    """Newest run dir of the same config hash that has a last.ckpt (or hpc checkpoint)."""
    root = _experiment_root(cfg)
    if not root.is_dir():
        return None
    candidates = sorted(root.glob(f"*-{digest}"), reverse=True)
    for cand in candidates:
        if newest_resumable(cand) is not None:
            return cand
    return None


def is_global_zero() -> bool:
    # Before the Trainer exists: launchers (torchrun, SLURM, Lightning's subprocess DDP) set these.
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def launcher_stamp() -> Optional[str]:
    """A run-dir stamp that every rank of an externally launched job agrees on (torchrun, SLURM srun),
    where processes start independently and cannot inherit one from rank 0."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("WORLD_SIZE", "1") != "1":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    job = os.environ.get("SLURM_JOB_ID")
    if job and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        array = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"-{array}" if array else "")
    return None


def prepare_run_dir(cfg: DictConfig, *, argv: Optional[list[str]] = None) -> RunDir:
    """Create (or find, for resume=auto) the run directory and write config and provenance.

    Under DDP every rank calls this; the directory name must be the same on every rank, so the
    timestamp comes from SYNFER_RUN_STAMP, which rank 0 sets before Lightning spawns the others.
    """
    digest = config_hash(cfg)
    resumed_from = None
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if (path / "metrics.json").exists() and not cfg.overwrite and cfg.resume is None and is_global_zero():
            raise ConfigError(f"run_dir={path} already holds a finished run (metrics.json); "
                              f"pass overwrite=true to replace it or resume=auto to continue")
    else:
        path = None
        if cfg.resume == "auto":
            path = find_resumable(cfg, digest)
            resumed_from = path
        if path is None:
            stamp = launcher_stamp()
            if stamp is None:
                if is_global_zero():
                    # A fresh stamp per run; DDP children that Lightning launches later inherit it.
                    os.environ["SYNFER_RUN_STAMP"] = time.strftime("%Y%m%d-%H%M%S")
                stamp = os.environ.get("SYNFER_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
            path = _experiment_root(cfg) / f"{stamp}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    if is_global_zero():
        atomic_write_text(path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(path / "provenance.json", {
            "git": git_info(),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "host": socket.gethostname(),
            "argv": argv if argv is not None else sys.argv,
            "config_hash": digest,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": str(resumed_from) if resumed_from else None,
        })
    return RunDir(path=path, config_hash=digest, resumed_from=resumed_from)


def resolve_resume_checkpoint(cfg: DictConfig, run: RunDir) -> Optional[str]:
    """The checkpoint to pass as Trainer.fit(ckpt_path=...), or None for a fresh start."""
    if cfg.resume in (None, "", "none", "never"):
        return None
    if cfg.resume == "auto":
        last = run.last_checkpoint()
        return str(last) if last else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    return str(path)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
