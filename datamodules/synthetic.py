"""The synthetic dataset format: written by the generator, read by the data modules.

A synthetic set is a folder:

    dataset.json          header: {"format": "synfer-synthetic", "version": 1, "label_names": [...],
                          "au_names": [...], "image_size": .., "channels": .., "generator": "..."}
                          optional: "domain": "real" (faces from `annotate`; default "synthetic"),
                          "label_optional": true (some faces have no class), "au_scale"/"au_source" (provenance)
    manifest.jsonl        version 1 of the record list, one JSON object per line
    manifest.v2.jsonl     later versions (e.g. after label rectification); readers take the newest
    images/...            image files, referenced by relative path

Record keys:
    id           str, unique within the manifest                                   (required)
    image        relative path inside the folder; no absolute paths, no escaping    (required)
    label        int index into label_names: the label the image was generated for (required, unless the
                 header says "label_optional": true: then null or absent for an unlabelled face)
    label_soft   list[float], len(label_names), non-negative, sums to 1 +- 1e-3     (optional)
    aus          list[float], len(au_names), finite, in [0, 1]                      (optional)
    caption      str;  seed: int;  generator: str;  label_source: str               (optional)
    agreement    number in [0, 1] (e.g. how many rectifiers agreed)                 (optional)
Unknown keys are kept and ignored, so later tools can add fields without breaking readers.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from datamodules.adapters.base import RecordList
from datamodules.atomic import atomic_write_text
from datamodules.labels import LabelSpace, UnknownLabelError, canonical_name
from datamodules.records import REAL, SYNTHETIC, Record

FORMAT_NAME = "synfer-synthetic"
FORMAT_VERSION = 1
HEADER_FILE = "dataset.json"
MANIFEST_STEM = "manifest"
SOFT_SUM_TOLERANCE = 1e-3
DOMAINS = {"synthetic": SYNTHETIC, "real": REAL}  # header key `domain`: what kind of faces the set holds
_VERSIONED_NAME = re.compile(r"^manifest\.v(\d+)\.jsonl$")


class ManifestError(ValueError):
    """A bad header or manifest record; the message names the file (and line), the key and what was expected."""


# ----------------------------------------------------------------------------------------- paths

def manifest_path(root: str, version: int) -> str:
    """manifest.jsonl for version 1, manifest.v<N>.jsonl for N >= 2."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"manifest version must be an integer >= 1, got {version!r}")
    name = f"{MANIFEST_STEM}.jsonl" if version == 1 else f"{MANIFEST_STEM}.v{version}.jsonl"
    return os.path.join(root, name)


def newest_version(root: str) -> int:
    """Highest manifest version present in `root`; 0 when there is none yet."""
    newest = 0
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    for name in names:
        if name == f"{MANIFEST_STEM}.jsonl":
            newest = max(newest, 1)
            continue
        match = _VERSIONED_NAME.match(name)
        if match:
            newest = max(newest, int(match.group(1)))
    return newest


def _is_absolute(rel: str) -> bool:
    # Windows-style absolute paths would be relative on Linux but are never meant that way.
    return os.path.isabs(rel) or rel.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", rel))


def _escapes_lexically(rel: str) -> bool:
    normalized = os.path.normpath(rel.replace("\\", "/"))
    return normalized == ".." or normalized.startswith("../")


class InsideResolver:
    """Resolves many relative paths under one root, caching the resolved folders.

    realpath() of every image costs an lstat per path component; images share a few folders,
    so only the folder is resolved once and the file itself is checked for being a symlink.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_real = os.path.realpath(root)
        self._prefix = self.root_real if self.root_real.endswith(os.sep) else self.root_real + os.sep
        self._folders: dict[str, str] = {}

    def resolve(self, rel: str, *, source: str = "") -> str:
        where = f"{source}: " if source else ""
        if not isinstance(rel, str) or not rel:
            raise ManifestError(f"{where}key 'image' must be a non-empty relative path, got {rel!r}")
        if _is_absolute(rel):
            raise ManifestError(f"{where}key 'image' must be a path relative to {self.root}, got absolute path {rel!r}")
        if _escapes_lexically(rel):
            raise ManifestError(f"{where}key 'image' must stay inside {self.root}, got {rel!r} (escapes with '..')")
        folder, name = os.path.split(os.path.normpath(rel))
        folder_real = self._folders.get(folder)
        if folder_real is None:
            folder_real = os.path.realpath(os.path.join(self.root_real, folder))
            self._folders[folder] = folder_real
        target = os.path.join(folder_real, name)
        if os.path.islink(target):
            target = os.path.realpath(target)
        if target != self.root_real and not target.startswith(self._prefix):
            raise ManifestError(
                f"{where}key 'image' must stay inside {self.root_real}, got {rel!r} which resolves to {target} "
                f"(symlink pointing outside the dataset)"
            )
        return target


def resolve_inside(root: str, rel: str, *, source: str = "") -> str:
    """Absolute, symlink-resolved path of `rel` under `root`; raises ManifestError if it leaves root.

    Rejects absolute paths, `..` escapes, and symlinks (file or folder) that point outside root.
    An inner `..` that stays inside (`a/../b.png`) is normalised lexically before resolving.
    """
    return InsideResolver(root).resolve(rel, source=source)


# ---------------------------------------------------------------------------------------- header

def write_header(root: str, label_names: Sequence[str], au_names: Sequence[str] = (), **meta: Any) -> str:
    """Write `root/dataset.json` atomically (creating root). Extra keyword args are stored as metadata.

    Typical meta: image_size=int, channels=1|3, generator="sd15-lora@<hash>". Returns the path.
    """
    label_names = [str(n) for n in label_names]
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "label_names": label_names, "au_names": [str(a) for a in au_names]}
    for key in ("format", "version", "label_names", "au_names"):
        if key in meta:
            raise ValueError(f"write_header: '{key}' is set by the format itself; do not pass it in meta")
    header.update(meta)
    _check_header(header, os.path.join(root, HEADER_FILE))
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, HEADER_FILE)
    atomic_write_text(path, json.dumps(header, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def read_header(root: str) -> dict:
    """Read and check `root/dataset.json`. Raises FileNotFoundError / ManifestError naming the file."""
    path = os.path.join(root, HEADER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root}: not a synthetic dataset; header {path} is missing")
    try:
        with open(path, encoding="utf-8") as fh:
            header = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from None
    _check_header(header, path)
    return header


def _check_header(header: Any, path: str) -> None:
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: key 'format' must be '{FORMAT_NAME}', got {header.get('format')!r}")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: key 'version' must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version} is newer than this reader ({FORMAT_VERSION}); update lightning-synfer"
        )
    names = header.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"{path}: key 'label_names' must be a non-empty list of class names, got {names!r}")
    canonical = [canonical_name(n, source=f"{path} label_names") for n in names]
    if len(set(canonical)) != len(canonical):
        raise ManifestError(f"{path}: key 'label_names' has duplicate classes after aliasing: {names!r}")
    aus = header.get("au_names", [])
    if not isinstance(aus, list) or not all(isinstance(a, str) and a for a in aus):
        raise ManifestError(f"{path}: key 'au_names' must be a list of AU names (may be empty), got {aus!r}")
    if len(set(aus)) != len(aus):
        raise ManifestError(f"{path}: key 'au_names' has duplicates: {aus!r}")
    from datamodules.au_vocabulary import AUVocabularyError, canonical_aus

    try:
        canonical_aus(aus, source=f"{path} au_names")
    except AUVocabularyError as exc:
        raise ManifestError(str(exc)) from None
    if header.get("domain", "synthetic") not in DOMAINS:
        raise ManifestError(f"{path}: key 'domain' must be one of {list(DOMAINS)}, got {header.get('domain')!r}")
    if not isinstance(header.get("label_optional", False), bool):
        raise ManifestError(f"{path}: key 'label_optional' must be true or false, got {header.get('label_optional')!r}")


# --------------------------------------------------------------------------------------- records

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(source: str, key: str, expected: str, value: Any) -> ManifestError:
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return ManifestError(f"{source}: key '{key}' must be {expected}, got {shown}")


def _check_vector(rec: Mapping, key: str, length: int, source: str, *, low: float, high: Optional[float]) -> None:
    value = rec[key]
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    expected = f"a list of {length} finite numbers {bounds}"
    if not isinstance(value, list) or len(value) != length:
        raise _fail(source, key, expected, value)
    # Fast path for the common all-good case (this runs once per record on 100k-record manifests);
    # a non-finite value makes the plain sum non-finite.
    if all(type(x) is float or type(x) is int for x in value) and (
            not value or (math.isfinite(sum(value)) and min(value) >= low and (high is None or max(value) <= high))):
        return
    for i, x in enumerate(value):
        if not _is_number(x) or not math.isfinite(x) or x < low or (high is not None and x > high):
            raise ManifestError(f"{source}: key '{key}[{i}]' must be a finite number {bounds}, got {x!r}")


def validate_record(rec: Mapping, header: Mapping, *, source: str, root: Optional[str] = None,
                    resolver: Optional[InsideResolver] = None) -> Optional[str]:
    """Check one manifest record against its header. Raises ManifestError naming source, key and expectation.

    `source` is "file:line" (or any location text). With `root` (or a `resolver` for many records),
    the image path is also resolved through symlinks, must stay inside root, and the resolved
    absolute path is returned; otherwise only lexical path checks are made and None is returned.
    """
    if not isinstance(rec, Mapping):
        raise ManifestError(f"{source}: expected a JSON object per line, got {type(rec).__name__}")
    num_labels = len(header["label_names"])
    num_aus = len(header.get("au_names", []))
    label_optional = bool(header.get("label_optional", False))
    for key in ("id", "image") if label_optional else ("id", "image", "label"):
        if key not in rec:
            raise ManifestError(f"{source}: required key '{key}' is missing (keys present: {sorted(rec)})")

    if not isinstance(rec["id"], str) or not rec["id"]:
        raise _fail(source, "id", "a non-empty string", rec["id"])
    image = rec["image"]
    if not isinstance(image, str) or not image:
        raise _fail(source, "image", "a non-empty relative path", image)
    resolved = None
    if resolver is None and root is not None:
        resolver = InsideResolver(root)
    if resolver is not None:
        resolved = resolver.resolve(image, source=source)
    elif _is_absolute(image):
        raise _fail(source, "image", "a path relative to the dataset folder (not absolute)", image)
    elif _escapes_lexically(image):
        raise _fail(source, "image", "a path inside the dataset folder (no '..' escape)", image)

    label = rec.get("label")
    if label is None and label_optional:
        pass
    elif not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels:
        raise _fail(source, "label", f"an integer index 0..{num_labels - 1} into label_names", label)

    if rec.get("label_soft") is not None:
        _check_vector(rec, "label_soft", num_labels, source, low=0.0, high=None)
        total = math.fsum(rec["label_soft"])
        if abs(total - 1.0) > SOFT_SUM_TOLERANCE:
            raise _fail(source, "label_soft", f"a distribution summing to 1 +- {SOFT_SUM_TOLERANCE} (sum is {total:.6g})",
                        rec["label_soft"])
    if rec.get("aus") is not None:
        _check_vector(rec, "aus", num_aus, source, low=0.0, high=1.0)

    for key in ("caption", "generator", "label_source"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise _fail(source, key, "a string", rec[key])
    if rec.get("seed") is not None and (not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool)):
        raise _fail(source, "seed", "an integer", rec["seed"])
    agreement = rec.get("agreement")
    if agreement is not None and not (_is_number(agreement) and math.isfinite(agreement) and 0 <= agreement <= 1):
        raise _fail(source, "agreement", "a number in [0, 1]", agreement)
    return resolved


def read_manifest(root: str, version: Optional[int] = None) -> tuple[dict, list[dict]]:
    """(header, records) of `root`, newest manifest version unless `version` is given.

    Every record is validated (including the symlink-escape check); ids must be unique.
    """
    header, records, _, _ = _read_manifest(root, version)
    return header, records


def _read_manifest(root: str, version: Optional[int]) -> tuple[dict, list[dict], list[str], str]:
    """(header, records, resolved absolute image paths, manifest file path)."""
    header = read_header(root)
    if version is None:
        version = newest_version(root)
        if version == 0:
            raise FileNotFoundError(f"{root}: no manifest found; expected {manifest_path(root, 1)}")
    path = manifest_path(root, version)
    if not os.path.isfile(path):
        available = newest_version(root)
        raise FileNotFoundError(
            f"{path}: manifest version {version} does not exist"
            + (f" (newest is {available})" if available else " (no manifest in this folder)")
        )
    resolver = InsideResolver(root)
    records: list[dict] = []
    images: list[str] = []
    first_line_of_id: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{source}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            images.append(validate_record(rec, header, source=source, resolver=resolver))
            if rec["id"] in first_line_of_id:
                raise ManifestError(
                    f"{source}: key 'id' must be unique, got {rec['id']!r} again "
                    f"(first at line {first_line_of_id[rec['id']]})"
                )
            first_line_of_id[rec["id"]] = lineno
            records.append(rec)
    return header, records, images, path


def write_manifest(root: str, records: Iterable[Mapping], version: Optional[int] = None, *,
                   overwrite: bool = False) -> str:
    """Validate and write `records` as manifest version `version` (default: newest + 1). Returns the path.

    Atomic (datamodules.atomic), so readers never see half a file.
    An existing version is never replaced unless overwrite=True (FileExistsError otherwise).
    Needs the header (write_header) first, since records are validated against it.
    """
    header = read_header(root)
    if version is None:
        version = newest_version(root) + 1
    path = manifest_path(root, version)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: manifest version {version} already exists; pass overwrite=True to replace it")

    lines: list[str] = []
    first_line_of_id: dict[str, int] = {}
    resolver = InsideResolver(root)
    for lineno, rec in enumerate(records, start=1):
        source = f"{path}:{lineno} (being written)"
        validate_record(rec, header, source=source, resolver=resolver)
        if rec["id"] in first_line_of_id:
            raise ManifestError(f"{source}: key 'id' must be unique, got {rec['id']!r} again "
                                f"(first at line {first_line_of_id[rec['id']]})")
        first_line_of_id[rec["id"]] = lineno
        lines.append(json.dumps(dict(rec), ensure_ascii=False, allow_nan=False))

    try:
        atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""), overwrite=overwrite)
    except FileExistsError:  # another writer created this version after the check above
        raise FileExistsError(f"{path}: another writer created manifest version {version} first; "
                              f"pass overwrite=True or write a new version") from None
    return path


# ------------------------------------------------------------------------------ label-space mapping

def remap_soft(soft: Sequence[float], index_map: Sequence[int], num_classes: int) -> Optional[list[float]]:
    """Move a distribution over the header's classes onto the target label space.

    Mass on classes the target lacks is dropped and the rest renormalised; None when nothing is left.
    """
    out = [0.0] * num_classes
    for p, target in zip(soft, index_map):
        if target >= 0:
            out[target] += float(p)
    total = math.fsum(out)
    if total <= 1e-8:
        return None
    return [p / total for p in out]


def records_from_manifest(root: str, label_space: LabelSpace, version: Optional[int] = None) -> list[Record]:
    """Records (domain from the header: SYNTHETIC, or REAL for `annotate`d faces) of the set at `root`, labels mapped into `label_space` by name.

    Returns a RecordList (a list with `.skipped` messages): records whose class is not in
    `label_space` (contempt in a 7-class run) are skipped and counted there.
    """
    header, raw_records, images, manifest_file = _read_manifest(root, version)
    source_names = [canonical_name(n) for n in header["label_names"]]
    index_map = [label_space.names.index(n) if n in label_space.names else -1 for n in source_names]

    out = RecordList()
    domain = DOMAINS[header.get("domain", "synthetic")]
    for rec, image in zip(raw_records, images):
        if rec.get("label") is None:  # an unlabelled face (header label_optional): label -1, no soft label
            out.append(Record(image=image, label=-1, id=rec["id"], caption=rec.get("caption"), domain=domain,
                              aus=[float(a) for a in rec["aus"]] if rec.get("aus") is not None else None))
            continue
        target = index_map[rec["label"]]
        if target < 0:
            out.skipped.append(
                f"{manifest_file}: record {rec['id']!r}: class '{source_names[rec['label']]}' "
                f"not in the {len(label_space)}-class label space"
            )
            continue
        soft = rec.get("label_soft")
        out.append(Record(
            image=image,
            label=target,
            id=rec["id"],
            label_soft=remap_soft(soft, index_map, len(label_space)) if soft is not None else None,
            aus=[float(a) for a in rec["aus"]] if rec.get("aus") is not None else None,
            caption=rec.get("caption"),
            domain=domain,
        ))
    return out


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "HEADER_FILE", "ManifestError", "UnknownLabelError",
    "manifest_path", "newest_version", "resolve_inside", "InsideResolver", "write_header", "read_header",
    "validate_record", "read_manifest", "write_manifest", "records_from_manifest", "remap_soft",
]
