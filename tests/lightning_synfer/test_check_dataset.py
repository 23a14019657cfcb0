import json

import pytest
from PIL import Image

from fixtures import make_folder_dataset, make_synthetic_set, write_image
from lightning_synfer.cli import main


def _lines(root):
    return [json.loads(l) for l in (root / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _rewrite(root, records):
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_clean_synthetic_set_passes(tmp_path, capsys):
    root = make_synthetic_set(tmp_path / "syn", n=8)
    assert main(["check-dataset", str(root)]) == 0
    assert "records: 8" in capsys.readouterr().out


@pytest.mark.parametrize("fault,expected", [
    ("duplicate", "duplicate id"),
    ("escape", "image"),
    ("nan_au", "aus"),
    ("bad_label", "label"),
    ("corrupt", "cannot decode"),
    ("missing", "does not exist"),
    ("half_line", "not valid JSON"),
])
def test_each_fault_is_reported(tmp_path, capsys, fault, expected):
    root = make_synthetic_set(tmp_path / "syn", n=6)
    recs = _lines(root)
    if fault == "duplicate":
        recs[1]["id"] = recs[0]["id"]
    elif fault == "escape":
        recs[0]["image"] = "../outside.png"
    elif fault == "nan_au":
        recs[0]["aus"][0] = float("nan")
    elif fault == "bad_label":
        recs[0]["label"] = 99
    elif fault == "corrupt":
        (root / recs[0]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif fault == "missing":
        (root / recs[0]["image"]).unlink()
    if fault == "nan_au":
        text = "".join(json.dumps(r) + "\n" for r in recs)  # json writes NaN literally
        (root / "manifest.jsonl").write_text(text)
    else:
        _rewrite(root, recs)
    if fault == "half_line":
        with open(root / "manifest.jsonl", "a") as fh:
            fh.write('{"id": "half", "ima')
    assert main(["check-dataset", str(root)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and expected in out


def test_image_size_not_matching_the_header_is_reported(tmp_path, capsys):
    """Images that decode fine but not at the header's image_size (a smaller one, a non-square one) are each
    reported with their manifest line and both sizes; the records around them are not."""
    root = make_synthetic_set(tmp_path / "syn", n=6, size=48, mode="RGB")
    recs = _lines(root)
    write_image(root / recs[2]["image"], size=32, mode="RGB", seed=2)
    Image.new("RGB", (48, 40), (90, 90, 90)).save(root / recs[4]["image"])
    assert main(["check-dataset", str(root)]) == 1
    out = capsys.readouterr().out
    manifest = root / "manifest.jsonl"
    assert f"{manifest}:3: image 32x32, header says 48x48" in out, out
    assert f"{manifest}:5: image 48x40, header says 48x48" in out, out
    assert "PROBLEMS: 2" in out and "records: 6" in out, out

def test_real_folder_with_bad_files(tmp_path, capsys):
    root = make_folder_dataset(tmp_path / "real", classes=("happy", "sad"), per_class=2)
    assert main(["check-dataset", str(root), "--format", "folder"]) == 0
    (root / "happy" / "zero.jpg").write_bytes(b"")
    assert main(["check-dataset", str(root), "--format", "folder"]) == 1
    assert "zero" in capsys.readouterr().out


def test_format_choices_are_the_registered_formats(tmp_path, capsys, monkeypatch):
    from datamodules.adapters import FORMATS
    from datamodules.adapters.base import DatasetFormat

    with pytest.raises(SystemExit):
        main(["check-dataset", str(tmp_path), "--format", "fer2013csv"])
    err = capsys.readouterr().err
    assert all(name in err for name in FORMATS.names()), err
    # a format registered by its adapter module is a valid choice with no edit here
    root = make_folder_dataset(tmp_path / "real", classes=("happy", "sad"), per_class=2)
    monkeypatch.setitem(FORMATS._entries, "classfolders", DatasetFormat("classfolders", FORMATS.get("folder").load))
    assert main(["check-dataset", str(root), "--format", "classfolders"]) == 0
    assert "(format classfolders)" in capsys.readouterr().out
