"""`python run.py check-dataset DIR [--format auto|FORMAT] [--split train]`; FORMAT: a registered dataset format.

Verifies a synthetic or real dataset and prints a report; exits 1 on any problem. It checks that every
record's image exists and decodes, that shapes and label values are valid, that AU vectors have the right
length and finite values in [0, 1], that no id is duplicated and that no path escapes the folder.
Unlike training, which skips bad images by policy, this reports every problem it finds.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from typing import Optional

from datamodules import synthetic as syn
from datamodules.adapters import FORMATS, load_records
from datamodules.labels import CANONICAL_8, LabelSpace
from datamodules.records import BadImageError, load_image

MAX_LISTED = 20


def _check_synthetic(root: str, version: Optional[int], problems: list[str], counts: Counter) -> None:
    try:
        header = syn.read_header(root)
    except (syn.ManifestError, FileNotFoundError, ValueError) as exc:
        problems.append(str(exc))
        return
    version = version or syn.newest_version(root)
    if version == 0:
        problems.append(f"{root}: no manifest.jsonl")
        return
    path = syn.manifest_path(root, version)
    resolver = syn.InsideResolver(root)
    size, channels = header.get("image_size"), header.get("channels")
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            source = f"{path}:{line_no}"
            counts["records"] += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{source}: not valid JSON ({exc.msg}); a half-written line?")
                continue
            try:
                image_path = syn.validate_record(rec, header, source=source, resolver=resolver)
            except (syn.ManifestError, ValueError) as exc:
                problems.append(str(exc))
                continue
            if rec["id"] in seen:
                problems.append(f"{source}: duplicate id {rec['id']!r}")
            seen.add(rec["id"])
            counts[f"label {header['label_names'][rec['label']]}"] += 1
            try:
                img = load_image(image_path, "RGB" if channels == 3 else "L")
            except BadImageError as exc:
                problems.append(f"{source}: {exc}")
                continue
            if size and img.size != (size, size):
                problems.append(f"{source}: image {img.size[0]}x{img.size[1]}, header says {size}x{size}")


def _check_real(root: str, fmt: str, split: str, problems: list[str], counts: Counter) -> None:
    try:
        records = load_records(fmt, root, split, LabelSpace(CANONICAL_8), key="DIR")
    except (ValueError, FileNotFoundError) as exc:
        problems.append(str(exc))
        return
    problems.extend(records.skipped)
    for rec in records:
        counts["records"] += 1
        counts[f"label {CANONICAL_8[rec.label]}"] += 1
        try:
            load_image(rec.image, "L")
        except BadImageError as exc:
            problems.append(str(exc))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run.py check-dataset", description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--format", default="auto", choices=["auto", *FORMATS.names()],
                    help="auto: synthetic if DIR has dataset.json, else folder")
    ap.add_argument("--split", default="train")
    ap.add_argument("--version", type=int, default=None, help="synthetic manifest version (default newest)")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    fmt = args.format
    if fmt == "auto":
        fmt = "synthetic" if os.path.isfile(os.path.join(root, "dataset.json")) else "folder"
    problems: list[str] = []
    counts: Counter = Counter()
    if not os.path.isdir(root):
        problems.append(f"{root}: not a directory")
    elif fmt == "synthetic":
        _check_synthetic(root, args.version, problems, counts)
    else:
        _check_real(root, fmt, args.split, problems, counts)
    print(f"check-dataset {root} (format {fmt})")
    print(f"  records: {counts.pop('records', 0)}")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    if problems:
        print(f"  PROBLEMS: {len(problems)}")
        for msg in problems[:MAX_LISTED]:
            print(f"    - {msg}")
        if len(problems) > MAX_LISTED:
            print(f"    ... and {len(problems) - MAX_LISTED} more")
        return 1
    print("  OK: no problems found")
    return 0
