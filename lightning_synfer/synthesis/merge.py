"""Per-rank manifest parts -> the synthetic dataset's manifest, and what a resumed run may skip.

    DIR/parts/rank{r}-{uuid}.jsonl   appended by each rank, one flushed line per image, written only
                                     after the image itself was renamed into place
    DIR/manifest.jsonl               the merge: unique ids (DDP padding and reruns dedupe here), ordered by index
    DIR/synthesis.json               what produced the images; a rerun with other settings is refused

A crash can leave a partial last line in a part file (ignored) or an image without a line (rewritten by
the next run, same content since sampling is deterministic by seed).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from datamodules.atomic import atomic_write_json

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
INFO_FILE = "synthesis.json"


def iter_part_records(out: str | os.PathLike) -> Iterable[dict]:
    parts = Path(out) / PARTS_DIR
    if not parts.is_dir():
        return
    for path in sorted(parts.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # Only a crash mid-write produces this, and only on a file's last line.
                    log.warning("%s:%d: skipping a partial manifest line (interrupted write)", path, lineno)
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                    yield rec


def iter_manifest_records(out: str | os.PathLike) -> Iterable[dict]:
    path = Path(out) / "manifest.jsonl"
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def collect_records(out: str | os.PathLike, expected_ids: Optional[set[str]] = None) -> dict[str, dict]:
    """id -> record, from an earlier merge and every part; only records whose image file exists."""
    out = Path(out)
    found: dict[str, dict] = {}
    for source in (iter_manifest_records(out), iter_part_records(out)):
        for rec in source:
            if rec["id"] in found or (expected_ids is not None and rec["id"] not in expected_ids):
                continue
            if (out / rec["image"]).is_file():
                found[rec["id"]] = rec
    return found


def done_ids(out: str | os.PathLike) -> set[str]:
    return set(collect_records(out)) if Path(out).is_dir() else set()


def merge(out: str | os.PathLike, label_names: Sequence[str], au_names: Sequence[str], *,
          expected_ids: Optional[set[str]] = None, header_meta: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Write dataset.json and manifest.jsonl from everything written so far. Returns a summary."""
    from datamodules.synthetic import HEADER_FILE, newest_version, read_header, write_header, write_manifest

    out = str(out)
    records = sorted(collect_records(out, expected_ids).values(), key=lambda r: (r.get("index", 0), r["id"]))
    # The part-only bookkeeping key `index` stays in the record (unknown keys are kept by readers).
    if not os.path.isfile(os.path.join(out, HEADER_FILE)):
        write_header(out, label_names, au_names, **dict(header_meta or {}))
    else:
        header = read_header(out)
        if header["label_names"] != list(label_names) or header.get("au_names", []) != list(au_names):
            raise ValueError(f"{out}/{HEADER_FILE}: label_names/au_names {header['label_names']}/"
                             f"{header.get('au_names')} differ from the generator's {list(label_names)}/"
                             f"{list(au_names)}; write to a new synthesis.out")
    if newest_version(out) > 1:
        log.warning("%s: newer manifest versions exist (relabelled); rewriting version 1 only", out)
    path = write_manifest(out, records, version=1, overwrite=True)
    missing = (len(expected_ids) - len(records)) if expected_ids is not None else 0
    return {"manifest": path, "num_records": len(records), "missing": missing}


def check_info(out: str | os.PathLike, info: Mapping[str, Any], *, write: bool, info_file: str = INFO_FILE,
               key: str = "synthesis.out") -> None:
    """Refuse to resume into a folder made with other settings; record them on the first run. `info_file`/`key`:
    the record's name and the config key of the folder (synthesis and annotate share this)."""
    path = Path(out) / info_file
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        current = json.loads(json.dumps(dict(info), default=str))
        diff = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in diff)[:1500]
            raise ValueError(f"{key}={out} holds images made with other settings ({shown}). "
                             f"Resume with the same settings, or write to a new {key}")
        return
    if write:
        atomic_write_json(path, dict(info))
