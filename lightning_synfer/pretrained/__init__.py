"""Generator bases shipped with the package, and the lookup from `generator.init_from` to an export folder.

Each base is a `GeneratorModule.save_pretrained` folder beside a PROVENANCE.json that names the command, commit,
data, steps and loss that made it and the sha256 of every weight file (`check_provenance` verifies them). The
miniature's base is the "Stable Diffusion" of the embedded faces: a text-to-image model pretrained on a large pool
of rendered faces with captions, which the main job fine-tunes with the FAU adapter as SynFER fine-tunes SD.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
PROVENANCE = "PROVENANCE.json"


def shipped_bases() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "generator_config.json").is_file())


def resolve_export(value: str | os.PathLike, key: str = "generator.init_from") -> Path:
    """A generator export folder: the path itself, or a shipped base by name (`embedded_base`)."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_dir():
        if not (path / "generator_config.json").is_file():
            raise FileNotFoundError(f"{key}={value}: {path} has no generator_config.json (expected a "
                                    f"GeneratorModule.save_pretrained export folder)")
        return path
    shipped = SHIPPED_DIR / str(value)
    if os.sep not in str(value) and (shipped / "generator_config.json").is_file():
        return shipped
    raise FileNotFoundError(f"{key}={value}: no such export folder, and no shipped base of that name "
                            f"(shipped: {shipped_bases() or 'none'})")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                  and p.name != PROVENANCE)


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in weight_files(folder)}


def check_provenance(folder: str | os.PathLike) -> dict:
    """The folder's PROVENANCE.json, after checking that every file it lists has the recorded hash."""
    folder = Path(folder)
    prov_path = folder / PROVENANCE
    if not prov_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {PROVENANCE} (a shipped base must say how it was made)")
    prov = json.loads(prov_path.read_text())
    recorded = prov.get("files") or {}
    actual = file_hashes(folder)
    if recorded != actual:
        changed = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
        raise ValueError(f"{prov_path}: the files do not match their recorded sha256 ({changed}); rebuild the base "
                         f"with `{prov.get('command', '?')}`")
    return prov
