"""The synthetic manifest format: header, validation, versions, atomic writes, label mapping."""
from __future__ import annotations

import json
import os

import pytest

from datamodules.labels import LabelSpace
from datamodules.records import SYNTHETIC
from datamodules.synthetic import (
    ManifestError, manifest_path, newest_version, read_header, read_manifest, records_from_manifest,
    resolve_inside, validate_record, write_header, write_manifest,
)
from tests.fixtures import DEFAULT_AU_NAMES, make_synthetic_set, write_image

SEVEN = LabelSpace.from_num_classes(7)
EIGHT = LabelSpace.from_num_classes(8)
HEADER = {"format": "synfer-synthetic", "version": 1, "label_names": ["neutral", "happy", "sad"],
          "au_names": ["AU06", "AU12"]}


def good_record(**overrides):
    rec = {"id": "a", "image": "images/a.png", "label": 1, "aus": [0.2, 0.9], "caption": "a smiling face",
           "seed": 3, "generator": "test", "label_soft": [0.1, 0.8, 0.1]}
    rec.update(overrides)
    return rec


def test_round_trip(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=10, num_classes=7, aus=True, soft=True)
    header, records = read_manifest(str(root))
    assert header["label_names"] == list(SEVEN.names)
    assert header["au_names"] == list(DEFAULT_AU_NAMES)
    assert header["image_size"] == 48 and header["generator"] == "fixture"
    assert [r["id"] for r in records] == [f"syn-{i:06d}" for i in range(10)]
    out = records_from_manifest(str(root), SEVEN)
    assert len(out) == 10 and out.skipped == []
    first = out[0]
    assert first.domain == SYNTHETIC and os.path.isabs(first.image) and os.path.isfile(first.image)
    assert first.label == 0 and len(first.aus) == len(DEFAULT_AU_NAMES)
    assert first.label_soft[0] == pytest.approx(0.8) and sum(first.label_soft) == pytest.approx(1.0)
    assert first.caption.startswith("a photo of")


def test_write_header_rejects_unknown_class(tmp_path):
    with pytest.raises(ValueError, match="bored"):
        write_header(str(tmp_path), ["happy", "bored"], [])


def test_read_header_errors_name_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_header(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({**HEADER, "format": "other"}))
    with pytest.raises(ManifestError, match="format"):
        read_header(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({**HEADER, "version": 99}))
    with pytest.raises(ManifestError, match="newer"):
        read_header(str(tmp_path))


def test_label_names_mapped_by_name_into_label_space(tmp_path):
    # Header order differs from the canonical order and uses aliases.
    root = tmp_path / "syn"
    write_header(str(root), ["Happiness", "angry", "contempt"], [], image_size=48, channels=3, generator="t")
    records = []
    for i, label in enumerate([0, 1, 2]):
        write_image(root / f"{i}.png", mode="RGB")
        records.append({"id": str(i), "image": f"{i}.png", "label": label,
                        "label_soft": [0.6, 0.2, 0.2] if label == 0 else None})
    write_manifest(str(root), records)
    seven = records_from_manifest(str(root), SEVEN)
    assert [SEVEN.names[r.label] for r in seven] == ["happy", "anger"]
    assert len(seven.skipped) == 1 and "contempt" in seven.skipped[0]
    # contempt mass dropped and renormalised over the 7 classes
    soft = seven[0].label_soft
    assert len(soft) == 7
    assert soft[SEVEN.names.index("happy")] == pytest.approx(0.75)
    assert soft[SEVEN.names.index("anger")] == pytest.approx(0.25)
    eight = records_from_manifest(str(root), EIGHT)
    assert [EIGHT.names[r.label] for r in eight] == ["happy", "anger", "contempt"]


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x.png", "images/../../x.png", "C:\\x.png", "..\\x.png"])
def test_path_escape_rejected(tmp_path, rel):
    with pytest.raises(ManifestError) as exc:
        validate_record(good_record(image=rel), HEADER, source="m.jsonl:7")
    assert "m.jsonl:7" in str(exc.value) and "'image'" in str(exc.value)
    with pytest.raises(ManifestError):
        resolve_inside(str(tmp_path), rel)


def test_inner_dotdot_allowed(tmp_path):
    assert resolve_inside(str(tmp_path), "images/../a.png") == os.path.join(os.path.realpath(tmp_path), "a.png")


def test_symlink_escape_rejected(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=2)
    outside = write_image(tmp_path / "secret.png")
    os.symlink(outside, root / "images" / "link.png")
    os.symlink(tmp_path, root / "up")
    for rel in ("images/link.png", "up/secret.png"):
        with pytest.raises(ManifestError, match="outside"):
            resolve_inside(str(root), rel)
    # ...and through the manifest reader, naming the manifest file and line
    with open(root / "manifest.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "evil", "image": "images/link.png", "label": 0}) + "\n")
    with pytest.raises(ManifestError) as exc:
        read_manifest(str(root))
    assert "manifest.jsonl:3" in str(exc.value) and "images/link.png" in str(exc.value)


def test_symlink_inside_root_allowed(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=2)
    os.symlink(root / "images" / "000000.png", root / "alias.png")
    assert resolve_inside(str(root), "alias.png") == os.path.realpath(root / "images" / "000000.png")


@pytest.mark.parametrize("key, value", [
    ("label_soft", [0.5, 0.6, 0.1]),            # sums to 1.2
    ("label_soft", [1.1, -0.1, 0.0]),           # negative
    ("label_soft", [0.5, 0.5]),                 # wrong length
    ("label_soft", [float("nan"), 0.5, 0.5]),
    ("aus", [0.1, float("nan")]),
    ("aus", [0.1, float("inf")]),
    ("aus", [0.1, 1.5]),
    ("aus", [-0.1, 0.5]),
    ("aus", [0.1, 0.2, 0.3]),                   # wrong length
    ("aus", [0.1, "high"]),
    ("label", 3),
    ("label", -1),
    ("label", True),
    ("label", "1"),
    ("id", ""),
    ("seed", 1.5),
    ("caption", 7),
    ("agreement", 2.0),
])
def test_bad_values_rejected_naming_key(key, value):
    with pytest.raises(ManifestError) as exc:
        validate_record(good_record(**{key: value}), HEADER, source="set/manifest.jsonl:12")
    message = str(exc.value)
    assert "set/manifest.jsonl:12" in message and key in message and "must be" in message


def test_good_record_and_optional_keys_pass():
    validate_record(good_record(), HEADER, source="x")
    validate_record({"id": "b", "image": "b.png", "label": 0}, HEADER, source="x")
    validate_record(good_record(label_soft=[0.3334, 0.3333, 0.3333], extra_field={"kept": True}), HEADER, source="x")


def test_missing_required_key(tmp_path):
    rec = good_record()
    del rec["label"]
    with pytest.raises(ManifestError, match="'label'"):
        validate_record(rec, HEADER, source="x:1")


def test_nan_in_file_rejected_with_line(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=2)
    with open(root / "manifest.jsonl", "a") as fh:
        fh.write('{"id": "n", "image": "images/000000.png", "label": 0, "aus": [NaN' + ", 0.5" * 11 + "]}\n")
    with pytest.raises(ManifestError) as exc:
        read_manifest(str(root))
    assert "manifest.jsonl:3" in str(exc.value) and "aus[0]" in str(exc.value)


def test_duplicate_id_and_bad_json_rejected(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=2)
    path = root / "manifest.jsonl"
    original = path.read_text()
    path.write_text(original + original.splitlines()[0] + "\n")
    with pytest.raises(ManifestError, match="unique"):
        read_manifest(str(root))
    path.write_text(original + "{not json\n")
    with pytest.raises(ManifestError, match="manifest.jsonl:3"):
        read_manifest(str(root))


def test_atomic_write_no_tmp_and_refuses_overwrite(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=3)
    _, records = read_manifest(str(root))
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_manifest(str(root), records, version=1)
    changed = [dict(r, caption="changed") for r in records]
    write_manifest(str(root), changed, version=1, overwrite=True)
    assert read_manifest(str(root))[1][0]["caption"] == "changed"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_failed_write_leaves_nothing(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=2)
    before = sorted(os.listdir(root))
    with pytest.raises(ManifestError):
        write_manifest(str(root), [good_record(label=99)])
    assert sorted(os.listdir(root)) == before


def test_newest_version_picked(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=4)
    assert newest_version(str(root)) == 1
    _, records = read_manifest(str(root))
    relabeled = [dict(r, label=(r["label"] + 1) % 7, label_source="rectifier") for r in records]
    path = write_manifest(str(root), relabeled)
    assert path == manifest_path(str(root), 2) and path.endswith("manifest.v2.jsonl")
    write_manifest(str(root), records, version=10)
    assert newest_version(str(root)) == 10
    assert read_manifest(str(root))[1][0]["label"] == records[0]["label"]
    assert read_manifest(str(root), version=2)[1][0]["label_source"] == "rectifier"
    assert records_from_manifest(str(root), SEVEN, version=2)[0].label == 1
    with pytest.raises(FileNotFoundError, match="newest is 10"):
        read_manifest(str(root), version=3)


def test_no_manifest_yet(tmp_path):
    write_header(str(tmp_path), ["happy", "sad"], [])
    assert newest_version(str(tmp_path)) == 0
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        read_manifest(str(tmp_path))


def test_data_synthetic_version_reaches_the_datamodule(tmp_path):
    """data.synthetic.version=1 trains on the labels as generated even when a rectified v2 exists."""
    from datamodules.adapters import load_records
    from datamodules.labels import LabelSpace

    root = make_synthetic_set(tmp_path / "syn", n=4)
    _, records = read_manifest(str(root))
    write_manifest(str(root), [dict(r, label=(r["label"] + 1) % 7, label_source="rectifier") for r in records])
    space = LabelSpace.from_num_classes(7)
    original = [r.label for r in load_records("synthetic", str(root), "train", space, version=1)]
    newest = [r.label for r in load_records("synthetic", str(root), "train", space)]
    assert newest == [(x + 1) % 7 for x in original]
    assert [r.label for r in load_records("synthetic", str(root), "train", space, version=2)] == newest
    with pytest.raises(ValueError, match="data.train.version"):
        load_records("folder", str(root), "train", space, key="data.train.root", version=1)
