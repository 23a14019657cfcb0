"""Run directories: one per run, holding everything needed to trust and resume it.

    runs/<experiment>/<YYYYmmdd-HHMMSS>-<hash8>/
        config.yaml        the resolved config
        provenance.json    git commit (and dirty flag), package versions, host, command line, hardware choices
        tb/                TensorBoard logs
        checkpoints/       best.ckpt, last.ckpt
        metrics.json       written last, by every task; tables are built from these files only

The hash covers the resolved config minus volatile keys (resume, run_dir, ...), so `resume=auto`
finds the newest unfinished run of the same config. A later run of the same config started in the same
second gets `<YYYYmmdd-HHMMSS>-2-<hash8>` (then -3, ...). A folder holding a run (metrics.json or
checkpoints) is only reused when `resume=` or `overwrite=true` says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_synfer import hardware
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


NO_RESUME = (None, "", "none", "never")
_STAMPED = re.compile(r"^(?P<stamp>\d{8}-\d{6})(?:-(?P<n>\d+))?-(?P<digest>[0-9a-f]{8})$")


def _newest_first(name: str) -> tuple[str, int]:
    # `<stamp>-<n>-<hash>` (the n-th run of the same config in the same second) is newer than `<stamp>-<hash>`,
    # and `-10-` newer than `-9-`: plain string order gets both wrong.
    m = _STAMPED.match(name)
    return (m["stamp"], int(m["n"] or 1)) if m else (name, 0)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def find_resumable(cfg: DictConfig, digest: str) -> Optional[Path]:
    """Newest unfinished run dir of the same config hash that has a last.ckpt (or hpc checkpoint).

    A finished run (metrics.json) is never picked: continuing it would rewrite its results. The search also
    stops there, so resume=auto after a finished run starts a new run dir, as a run without resume=auto does,
    rather than reviving an older crashed run that the finished one superseded.
    """
    root = _experiment_root(cfg)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob(f"*-{digest}") if p.is_dir()), key=lambda p: _newest_first(p.name),
                        reverse=True)
    for cand in candidates:
        if is_finished(cand):
            return None
        if newest_resumable(cand) is not None:
            return cand
    return None


def _checkpoints_in(path: Path) -> list[Path]:
    return sorted([*(path / "checkpoints").glob("*.ckpt"), *path.glob("hpc_ckpt_*.ckpt")])


def _refuse_to_reuse(cfg: DictConfig, path: Path) -> None:
    """An explicit run_dir that holds a run is only reused when asked: resume=... continues it, overwrite=true
    replaces it. Starting over silently would mix two runs' checkpoints in one folder."""
    if cfg.overwrite or cfg.resume not in NO_RESUME or not is_global_zero():
        return
    if (path / "metrics.json").exists():
        raise ConfigError(f"run_dir={path} already holds a finished run (metrics.json); "
                          f"pass overwrite=true to replace it or resume=auto to continue")
    found = _checkpoints_in(path)
    if found:
        raise ConfigError(f"run_dir={path} holds checkpoints of an unfinished run ({newest_resumable(path) or found[0]}"
                          f"); pass resume=auto to continue it or overwrite=true to start over in it")


def _new_run_dir(cfg: DictConfig, digest: str) -> Path:
    """A fresh `<stamp>-<hash>` dir, created here. Runs of the same config started in the same second (two
    shells, a job array) each get their own: the exclusive mkdir fails for the later one, which takes
    `<stamp>-2-<hash>`, `<stamp>-3-<hash>`, ..."""
    root = _experiment_root(cfg)
    stamp = launcher_stamp()
    if stamp is not None:  # every rank computes this same name on its own: no suffix is possible
        path = root / f"{stamp}-{digest}"
        path.mkdir(parents=True, exist_ok=True)
        return path
    if not is_global_zero():
        # DDP children that Lightning launches inherit rank 0's stamp, suffix included: same dir.
        stamp = os.environ.get("SYNFER_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
        path = root / f"{stamp}-{digest}"
        path.mkdir(parents=True, exist_ok=True)
        return path
    root.mkdir(parents=True, exist_ok=True)
    base = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        stamp = base if n == 1 else f"{base}-{n}"
        path = root / f"{stamp}-{digest}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        os.environ["SYNFER_RUN_STAMP"] = stamp
        return path
    raise ConfigError(f"{root}: could not create a new run dir for {base}-*-{digest} (9999 already exist)")


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
        _refuse_to_reuse(cfg, path)
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = find_resumable(cfg, digest) if cfg.resume == "auto" else None
        resumed_from = path
        if path is None:
            path = _new_run_dir(cfg, digest)
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
            # what trainer.precision / model.channels_last `auto` chose on this machine, and why
            "hardware": hardware.describe(cfg.get("trainer"), cfg.get("model")),
        })
    return RunDir(path=path, config_hash=digest, resumed_from=resumed_from)


def resolve_resume_checkpoint(cfg: DictConfig, run: RunDir) -> Optional[str]:
    """The checkpoint to pass as Trainer.fit(ckpt_path=...), or None for a fresh start."""
    if cfg.resume in NO_RESUME:
        return None
    if cfg.resume == "auto":
        last = run.last_checkpoint()
        return str(last) if last else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    return str(path)
