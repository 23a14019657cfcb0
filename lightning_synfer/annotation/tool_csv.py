"""AUs from the CSV files of the AU tools people run on faces: OpenFace 2.x, py-feat, LibreFace.

Each reader returns an `AUTable`: the tool's AU list (canonical names), the scale it declared mapped to [0, 1],
and one `FaceAUs` per face: the values, or why the face failed (the detector's success flag, a confidence below
`min_confidence`, missing values). Rows are found by the image they describe (`AUTable.lookup`).

- OpenFace 2.x (FeatureExtraction / FaceLandmarkImg): columns `frame, face_id, timestamp, confidence, success, ...,
  AU01_r ... AU45_r` (intensities 0-5; the 17 AUs 1 2 4 5 6 7 9 10 12 14 15 17 20 23 25 26 45), `AU01_c ...`
  (presence 0/1, used only without `_r` columns). Headers may carry a space after each comma. One CSV per image
  (FaceLandmarkImg's `<image stem>.csv`, a folder of them) or one CSV whose `frame` N is the N-th image in sorted
  path order (FeatureExtraction -fdir). Several faces in one image or frame: the most confident one.
- py-feat (`Fex.to_csv`): `FaceRectX, FaceRectY, FaceRectWidth, FaceRectHeight, FaceScore, ..., AU01 ... AU43`
  (probabilities 0-1), emotions, `input` (the image path), `frame`. A face the detector missed is a row of NaNs.
- LibreFace (`save_facial_attributes_image` / the `libreface` CLI): `input_image_path, aligned_image_path, ...,
  au_1 ... au_24` (BP4D presence 0/1) and `au_1_intensity ... au_26_intensity` (DISFA intensities 0-5).
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from datamodules.au_vocabulary import canonical_aus, to_unit


class AUCSVError(ValueError):
    """A tool CSV that does not have the columns its tool writes; the message names the file and the columns."""


@dataclass
class FaceAUs:
    values: Optional[list[float]]  # in [0, 1], ordered as AUTable.au_names; None when the face failed
    failure: str = ""  # why it failed (success=0, low confidence, missing values)
    confidence: float = 1.0


@dataclass
class AUTable:
    tool: str
    source: str  # the file or folder read
    au_names: list[str]
    scale: str  # the scale the values were declared on (AU_SCALES), now in [0, 1]
    by_key: dict[str, FaceAUs] = field(default_factory=dict)  # image reference (path / name / stem) -> face
    by_frame: dict[int, FaceAUs] = field(default_factory=dict)  # OpenFace FeatureExtraction: 1-based frame -> face

    def lookup(self, path: str, rel: str, ordinal: int) -> Optional[FaceAUs]:
        """The face of image `path` (`rel` below the annotated root, `ordinal` its 0-based sorted position)."""
        if self.by_key:
            for key in _keys_of(path, rel):
                if key in self.by_key:
                    return self.by_key[key]
            return None
        return self.by_frame.get(ordinal + 1)


def _keys_of(path: str, rel: str) -> list[str]:
    """Ways a tool may have written an image's name, most specific first."""
    p, r = Path(path), Path(rel)
    return [_norm_path(str(p)), _norm_path(str(r)), p.name, p.stem]


def _norm_path(text: str) -> str:
    return os.path.normpath(str(text).strip().replace("\\", "/"))


def _index_by_reference(faces: Iterable[tuple[str, FaceAUs]]) -> dict[str, FaceAUs]:
    """References -> the most confident face; file names and stems only where they name one image."""
    best: dict[str, FaceAUs] = {}
    for ref, face in faces:
        key = _norm_path(ref)
        if key not in best or face.confidence > best[key].confidence:
            best[key] = face
    out = dict(best)
    for short in (lambda k: Path(k).name, lambda k: Path(k).stem):
        counts: dict[str, int] = {}
        for key in best:
            counts[short(key)] = counts.get(short(key), 0) + 1
        for key, face in best.items():
            if counts[short(key)] == 1:
                out.setdefault(short(key), face)
    return out


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, skipinitialspace=True)  # OpenFace writes "frame, face_id, ..."
        if reader.fieldnames is None:
            return [], []
        names = [n.strip() for n in reader.fieldnames]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return names, rows


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _face(row: dict[str, str], columns: Sequence[str], scale: str, *, confidence: float = 1.0,
          failure: str = "") -> FaceAUs:
    raw = [_number(row.get(c, "")) for c in columns]
    if failure:
        return FaceAUs(None, failure, confidence)
    bad = [c for c, v in zip(columns, raw) if math.isnan(v)]
    if bad:
        return FaceAUs(None, f"no AU values (empty or NaN in {bad[:3]}{'...' if len(bad) > 3 else ''})", confidence)
    return FaceAUs([to_unit(v, scale) for v in raw], "", confidence)


def _au_columns(names: Sequence[str], pattern: str) -> list[str]:
    return [n for n in names if re.fullmatch(pattern, n, flags=re.IGNORECASE)]


def _need(columns: Sequence[str], path: Path, tool: str, expected: str) -> None:
    if not columns:
        raise AUCSVError(f"{path}: no {tool} AU columns; expected {expected}")


def read_openface(source: str, *, min_confidence: float = 0.5) -> AUTable:
    """OpenFace 2.x output: one CSV (frames) or a folder of per-image CSVs (FaceLandmarkImg)."""
    src = Path(source)
    files = sorted(src.glob("*.csv")) if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"annotate.aus.csv={source}: no OpenFace CSV (a file, or a folder of <stem>.csv)")
    au_columns: Optional[list[str]] = None
    scale = "facs"
    faces: list[tuple[str, FaceAUs]] = []
    frames: dict[int, FaceAUs] = {}
    for path in files:
        names, rows = _read_rows(path)
        columns = _au_columns(names, r"AU\d+_r")
        file_scale = "facs"
        if not columns:
            columns, file_scale = _au_columns(names, r"AU\d+_c"), "unit"
        _need(columns, path, "OpenFace", "AU01_r ... AU45_r (intensities) or AU01_c ... (presence)")
        if au_columns is None:
            au_columns, scale = columns, file_scale
        elif columns != au_columns:
            raise AUCSVError(f"{path}: AU columns {columns} differ from {files[0]}'s {au_columns}; expected one "
                             f"OpenFace run with one AU set")
        for row in rows:
            confidence = _number(row.get("confidence", "1"))
            success = row.get("success", "1")
            failure = ""
            if success not in ("1", "1.0", ""):
                failure = f"OpenFace success={success}"
            elif math.isnan(confidence) or confidence < min_confidence:
                failure = f"OpenFace confidence {confidence} < annotate.aus.min_confidence={min_confidence}"
            face = _face(row, au_columns, scale, confidence=0.0 if math.isnan(confidence) else confidence,
                         failure=failure)
            if src.is_dir():
                faces.append((path.stem, face))
            elif "frame" in row:
                frame = int(_number(row["frame"])) if not math.isnan(_number(row["frame"])) else -1
                if frame not in frames or face.confidence > frames[frame].confidence:
                    frames[frame] = face
            else:
                raise AUCSVError(f"{path}: an OpenFace CSV without a 'frame' column; expected FeatureExtraction "
                                 f"output, or a folder of FaceLandmarkImg per-image CSVs")
    names = canonical_aus(au_columns or [], source=str(src))
    return AUTable("openface", str(src), names, scale, by_key=_index_by_reference(faces), by_frame=frames)


def read_pyfeat(source: str, *, min_confidence: float = 0.5) -> AUTable:
    """py-feat's Fex CSV: one row per detected face, `input` naming its image, `FaceScore` its confidence."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"annotate.aus.csv={source}: no py-feat CSV (Fex.to_csv output)")
    names, rows = _read_rows(path)
    columns = _au_columns(names, r"AU\d+")
    _need(columns, path, "py-feat", "AU01 ... AU43 (Fex.aus)")
    if "input" not in names:
        raise AUCSVError(f"{path}: no 'input' column; expected py-feat's Fex CSV, which names each face's image there")
    faces = []
    for row in rows:
        score = _number(row.get("FaceScore", "1"))
        failure = ""
        if math.isnan(score):
            failure = "py-feat found no face (FaceScore empty)"
        elif score < min_confidence:
            failure = f"py-feat FaceScore {score} < annotate.aus.min_confidence={min_confidence}"
        faces.append((row["input"], _face(row, columns, "unit", confidence=0.0 if math.isnan(score) else score,
                                          failure=failure)))
    return AUTable("pyfeat", str(path), canonical_aus(columns, source=str(path)), "unit",
                   by_key=_index_by_reference(faces))


def read_libreface(source: str, *, values: str = "intensity") -> AUTable:
    """LibreFace's CSV: `input_image_path` per image; au_k_intensity (0-5) or au_k (0/1) per AU."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"annotate.aus.csv={source}: no LibreFace CSV")
    names, rows = _read_rows(path)
    if values == "intensity":
        columns, scale, expected = _au_columns(names, r"au_\d+_intensity"), "facs", "au_1_intensity ... au_26_intensity"
    else:
        columns, scale, expected = _au_columns(names, r"au_\d+"), "unit", "au_1 ... au_24 (detection)"
    _need(columns, path, "LibreFace", expected)
    key = next((k for k in ("input_image_path", "image_path", "input") if k in names), None)
    if key is None:
        raise AUCSVError(f"{path}: no 'input_image_path' column; expected LibreFace's image CSV")
    faces = [(row[key], _face(row, columns, scale)) for row in rows]
    return AUTable("libreface", str(path), canonical_aus(columns, source=str(path)), scale,
                   by_key=_index_by_reference(faces))


READERS: dict[str, Callable[..., AUTable]] = {"openface": read_openface, "pyfeat": read_pyfeat,
                                              "libreface": read_libreface}


def read_tool_csv(tool: str, source: str, *, min_confidence: float = 0.5, libreface_values: str = "intensity") -> AUTable:
    if tool == "libreface":
        return read_libreface(source, values=libreface_values)
    if tool not in READERS:
        raise ValueError(f"annotate.aus.source={tool!r}: expected one of {sorted(READERS)}")
    return READERS[tool](source, min_confidence=min_confidence)
