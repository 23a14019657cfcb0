"""Dataset adapters on tiny fixture datasets written to tmp_path."""
from __future__ import annotations

import os
import time

import pytest

from datamodules.adapters import (
    FORMATS, DatasetLayoutError, DatasetRootNotFoundError, EmptyDatasetError, RecordList, dataset_roots, load_records,
    register_format,
)
from datamodules.adapters.affectnet import AffectNetLabelError
from datamodules.adapters.rafdb import RafdbLabelError
from datamodules.labels import CANONICAL_7, CANONICAL_8, LabelSpace, UnknownLabelError
from datamodules.records import REAL, SYNTHETIC, load_image
from tests.fixtures import (
    make_affectnet, make_folder_dataset, make_rafdb, make_sfew, make_synthetic_set, write_image,
)

SEVEN = LabelSpace.from_num_classes(7)
EIGHT = LabelSpace.from_num_classes(8)


def labels_by_class(records, space):
    counts: dict[str, int] = {}
    for r in records:
        counts[space.names[r.label]] = counts.get(space.names[r.label], 0) + 1
    return counts


# ------------------------------------------------------------------------------------ registry

def test_every_adapter_module_registers_its_format_codes_and_roots():
    # found by discovery: adapters/__init__.py names none of them
    assert FORMATS.names() == ["affectnet", "folder", "rafdb", "sfew", "synthetic"]
    assert FORMATS.get("rafdb").codes[4] == "happy" and FORMATS.get("affectnet").codes[7] == "contempt"
    roots = dataset_roots()
    assert roots["rafdb"].env == "SYNFER_RAFDB" and roots["rafdb"].default == "/data/RAF-DB/basic"
    assert set(roots) == {"fer2013", "rafdb", "affectnet", "sfew", "synthetic"}
    assert [n for n, f in FORMATS.items() if f.versioned] == ["synthetic"]


def test_registration_refuses_non_canonical_codes_and_a_second_loader():
    with pytest.raises(ValueError, match="not canonical"):
        register_format("odd", codes={1: "bored"})
    with pytest.raises(ValueError, match="'rafdb' is registered twice"):
        register_format("rafdb")(lambda root, split, label_space: RecordList())
    assert "odd" not in FORMATS


def test_unknown_format_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError) as exc:
        load_records("rafbd", str(tmp_path), "train", SEVEN, key="data.train.root")
    assert "data.train.format='rafbd'" in str(exc.value) and "Did you mean 'rafdb'" in str(exc.value)
    for name in FORMATS.names():
        assert name in str(exc.value)


def test_config_refuses_a_format_no_adapter_registers():
    from lightning_synfer.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"'data.test.format' = 'rafbd': expected embedded or a registered dataset "
                                          r"format \(affectnet, folder, rafdb, sfew, synthetic\)"):
        compose("supervised/embedded", ["data.test.format=rafbd", "data.test.root=/x"])


def test_missing_root_names_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetRootNotFoundError) as exc:
        load_records("folder", str(missing), "train", SEVEN, key="data.real.root")
    assert isinstance(exc.value, FileNotFoundError)
    assert "data.real.root" in str(exc.value) and str(missing) in str(exc.value)


def test_unset_root_names_key():
    with pytest.raises(ValueError, match="data.real.root"):
        load_records("folder", "", "train", SEVEN, key="data.real.root")


# -------------------------------------------------------------------------------------- folder

def test_folder_aliases_map_to_canonical(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", per_class=2)
    records = load_records("folder", str(root), "train", SEVEN)
    assert isinstance(records, RecordList) and records.skipped == []
    assert labels_by_class(records, SEVEN) == {name: 2 for name in CANONICAL_7}
    # angry/ -> anger, surprise folder -> surprise
    angry = [r for r in records if "/angry/" in r.image]
    assert angry and all(r.label == SEVEN.names.index("anger") for r in angry)
    assert all(os.path.isabs(r.image) and r.domain == REAL for r in records)
    assert load_image(records[0].image, "L").size == (48, 48)


def test_folder_order_is_sorted_and_deterministic(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", per_class=3)
    first = [r.image for r in load_records("folder", str(root), "train", SEVEN)]
    again = [r.image for r in load_records("folder", str(root), "train", SEVEN)]
    assert first == again == sorted(first)


def test_folder_uses_split_folder_when_present(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", per_class=2, split="train")
    make_folder_dataset(tmp_path / "fer", per_class=1, split="test")
    assert len(load_records("folder", str(root), "train", SEVEN)) == 14
    assert len(load_records("folder", str(root), "test", SEVEN)) == 7
    # "val" resolves to valid/ or validation/ when that is how the export names it
    make_folder_dataset(tmp_path / "fer", per_class=1, classes=("happy",), split="validation")
    assert len(load_records("folder", str(root), "val", SEVEN)) == 1


def test_folder_missing_split_among_split_folders_is_an_error(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", per_class=1, split="train")
    with pytest.raises(DatasetLayoutError, match="val"):
        load_records("folder", str(root), "val", SEVEN)


def test_folder_unknown_class_lists_known_names(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", classes=("happy", "bored"), per_class=1)
    with pytest.raises(UnknownLabelError) as exc:
        load_records("folder", str(root), "train", SEVEN)
    message = str(exc.value)
    assert "bored" in message
    for name in CANONICAL_8:
        assert name in message


def test_folder_contempt_skipped_in_7_class_kept_in_8(tmp_path):
    root = make_folder_dataset(tmp_path / "ferplus", classes=("happy", "contempt"), per_class=3)
    with pytest.warns(UserWarning, match="contempt"):
        seven = load_records("folder", str(root), "train", SEVEN)
    assert len(seven) == 3 and len(seven.skipped) == 3
    assert all("contempt" in m for m in seven.skipped)
    eight = load_records("folder", str(root), "train", EIGHT)
    assert labels_by_class(eight, EIGHT) == {"happy": 3, "contempt": 3}


def test_folder_empty_class_warns_and_non_images_counted(tmp_path):
    root = make_folder_dataset(tmp_path / "fer", classes=("happy", "sad"), per_class=2)
    (root / "fear").mkdir()
    (root / "happy" / "notes.txt").write_text("not an image")
    (root / "happy" / ".DS_Store").write_bytes(b"\0")
    (root / "README.md").write_text("readme")
    with pytest.warns(UserWarning, match="fear"):
        records = load_records("folder", str(root), "train", SEVEN)
    assert len(records) == 4
    assert len(records.skipped) == 3
    assert any("notes.txt" in m for m in records.skipped)
    assert any("README.md" in m for m in records.skipped)


def test_folder_extensions_case_insensitive(tmp_path):
    root = tmp_path / "user"
    write_image(root / "happy" / "a.JPG")
    write_image(root / "happy" / "b.png")
    write_image(root / "sad" / "c.jpeg")
    assert len(load_records("folder", str(root), "train", SEVEN)) == 3


def test_folder_with_no_class_folders_is_an_error(tmp_path):
    root = tmp_path / "flat"
    write_image(root / "a.jpg")
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        load_records("folder", str(root), "train", SEVEN)


def test_folder_all_skipped_is_empty_dataset_error(tmp_path):
    root = make_folder_dataset(tmp_path / "c", classes=("contempt",), per_class=1)
    with pytest.warns(UserWarning), pytest.raises(EmptyDatasetError, match="data.real.root"):
        load_records("folder", str(root), "train", SEVEN, key="data.real.root")


def test_folder_lists_many_files_without_decoding(tmp_path):
    # Empty .jpg files: listing must not open them, and must stay fast.
    root = tmp_path / "big"
    for cls in ("happy", "sad"):
        (root / cls).mkdir(parents=True)
        for i in range(3000):
            (root / cls / f"{i:05d}.jpg").touch()
    start = time.perf_counter()
    records = load_records("folder", str(root), "train", SEVEN)
    assert len(records) == 6000
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------- rafdb

def test_rafdb_codes_map_to_canonical(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=7, n_test=14)
    train = load_records("rafdb", str(root), "train", SEVEN)
    test = load_records("rafdb", str(root), "test", SEVEN)
    assert len(train) == 7 and len(test) == 14
    assert load_records("rafdb", str(root), "val", SEVEN)[0].image == test[0].image
    # codes 1..7 in order: surprise, fear, disgust, happy, sad, anger, neutral
    expected = ["surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"]
    assert [SEVEN.names[r.label] for r in train] == expected
    assert train[0].image.endswith("train_00001_aligned.jpg") and os.path.isfile(train[0].image)
    assert train[0].id == "train_00001"


def test_rafdb_original_images(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=3, n_test=2, aligned=False)
    records = load_records("rafdb", str(root), "train", SEVEN)
    assert records[0].image.endswith(os.path.join("original", "train_00001.jpg"))


def test_rafdb_bad_code_names_file_line_and_value(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=3, n_test=1, codes=[1, 9, 2])
    with pytest.raises(RafdbLabelError) as exc:
        load_records("rafdb", str(root), "train", SEVEN)
    message = str(exc.value)
    assert "list_patition_label.txt:2" in message and "9" in message


def test_rafdb_missing_image_skipped_and_counted(tmp_path):
    root = make_rafdb(tmp_path / "raf", n_train=3, n_test=1)
    os.remove(root / "Image" / "aligned" / "train_00002_aligned.jpg")
    records = load_records("rafdb", str(root), "train", SEVEN)
    assert len(records) == 2 and len(records.skipped) == 1


def test_rafdb_missing_label_file(tmp_path):
    (tmp_path / "raf").mkdir()
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
        load_records("rafdb", str(tmp_path / "raf"), "train", SEVEN)


# ----------------------------------------------------------------------------------- affectnet

def test_affectnet_8_to_10_dropped_contempt_by_label_space(tmp_path):
    root = make_affectnet(tmp_path / "an", n_train=11, codes=list(range(11)))
    seven = load_records("affectnet", str(root), "train", SEVEN)
    assert [SEVEN.names[r.label] for r in seven] == list(CANONICAL_7)
    assert len(seven.skipped) == 4  # 8, 9, 10 and contempt
    eight = load_records("affectnet", str(root), "train", EIGHT)
    assert [EIGHT.names[r.label] for r in eight] == list(CANONICAL_8)
    assert len(eight.skipped) == 3
    assert eight[0].image.endswith(os.path.join("Manually_Annotated_Images", "100", "train_00000.jpg"))
    assert os.path.isfile(eight[0].image)


def test_affectnet_val_and_test_read_validation_csv(tmp_path):
    root = make_affectnet(tmp_path / "an", n_train=4, n_val=6)
    assert len(load_records("affectnet", str(root), "val", EIGHT)) == 6
    assert len(load_records("affectnet", str(root), "test", EIGHT)) == 6


@pytest.mark.parametrize("bad", [11, -1, "x"])
def test_affectnet_bad_code_names_file_row_and_value(tmp_path, bad):
    root = make_affectnet(tmp_path / "an", n_train=3, codes=[1, 2, bad])
    with pytest.raises(AffectNetLabelError) as exc:
        load_records("affectnet", str(root), "train", SEVEN)
    message = str(exc.value)
    assert "training.csv" in message and "row 3" in message and str(bad) in message


def test_affectnet_images_directly_under_root(tmp_path):
    root = make_affectnet(tmp_path / "an", n_train=2, n_val=1)
    for sub in os.listdir(root / "Manually_Annotated_Images"):
        os.rename(root / "Manually_Annotated_Images" / sub, root / sub)
    os.rmdir(root / "Manually_Annotated_Images")
    records = load_records("affectnet", str(root), "train", SEVEN)
    assert records[0].image == os.path.join(str(root), "100", "train_00000.jpg")


def test_affectnet_wrong_image_folder_is_reported(tmp_path):
    root = make_affectnet(tmp_path / "an", n_train=3, n_val=1)
    os.rename(root / "Manually_Annotated_Images", root / "elsewhere")
    with pytest.raises(DatasetLayoutError, match="Manually_Annotated_Images"):
        load_records("affectnet", str(root), "train", SEVEN)


# ---------------------------------------------------------------------------------------- sfew

def test_sfew_split_folders(tmp_path):
    root = make_sfew(tmp_path / "sfew", per_class=2)
    train = load_records("sfew", str(root), "train", SEVEN)
    val = load_records("sfew", str(root), "val", SEVEN)
    assert labels_by_class(train, SEVEN) == {name: 2 for name in CANONICAL_7}
    assert len(val) == 14 and all("/Val/" in r.image for r in val)
    with pytest.raises(FileNotFoundError, match="Test"):
        load_records("sfew", str(root), "test", SEVEN)


def test_sfew_unlabelled_test_folder(tmp_path):
    root = make_sfew(tmp_path / "sfew", per_class=1, splits=("Train",))
    write_image(root / "Test" / "0001.png")
    with pytest.raises(DatasetLayoutError, match="unlabelled"):
        load_records("sfew", str(root), "test", SEVEN)


# ----------------------------------------------------------------------------------- synthetic

def test_synthetic_adapter(tmp_path):
    root = make_synthetic_set(tmp_path / "syn", n=8, num_classes=8)
    records = load_records("synthetic", str(root), "train", SEVEN)
    assert len(records) == 7 and len(records.skipped) == 1  # contempt record skipped
    assert all(r.domain == SYNTHETIC and os.path.isfile(r.image) for r in records)
