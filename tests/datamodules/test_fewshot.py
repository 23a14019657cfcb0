"""K-shot sets (`data.<source>.shots`): exactly K images per class, deterministic per seed, nested across K, drawn
from the training split only (never test images), and an error naming the class when a class has fewer than K."""
from __future__ import annotations

from collections import Counter

import pytest

from datamodules.datamodule import FERDataModule
from datamodules.fewshot import NotEnoughShotsError, draw_shots
from datamodules.records import Record
from fixtures import FER2013_FOLDERS, make_folder_dataset
from lightning_synfer.config import ConfigError, compose


def _train(cfg):
    dm = FERDataModule(cfg)
    dm.setup("fit")
    return dm.datasets["train"].records


def _embedded(tiny, *extra):
    return compose("supervised/embedded", tiny("data.train.num_images=240", "data.val=null", "data.test=null",
                                               *extra))


def test_exactly_k_per_class_deterministic_and_nested(tiny):
    for k in (1, 3, 5):
        counts = Counter(r.label for r in _train(_embedded(tiny, f"data.train.shots={k}")))
        assert counts == {c: k for c in range(8)}, (k, counts)
    ids = lambda *extra: [r.id for r in _train(_embedded(tiny, *extra))]  # noqa: E731
    assert ids("data.train.shots=3") == ids("data.train.shots=3")  # same seed: the same episode
    assert ids("data.train.shots=3", "seed=1") != ids("data.train.shots=3")  # the run's seed is the episode
    assert ids("data.train.shots=3", "seed=1", "data.train.shots_seed=0") == ids("data.train.shots=3")
    assert set(ids("data.train.shots=1")) <= set(ids("data.train.shots=3")) <= set(ids("data.train.shots=5"))
    pool = ids()
    assert len(pool) == 240 and set(ids("data.train.shots=5")) <= set(pool)  # drawn from the num_images pool


def test_shots_come_from_the_train_split_never_from_test(tmp_path, tiny):
    root = make_folder_dataset(tmp_path / "fer", FER2013_FOLDERS, per_class=6, size=32, split="train")
    make_folder_dataset(tmp_path / "fer", FER2013_FOLDERS, per_class=6, size=32, split="test")
    cfg = compose("supervised/fer2013_resnet18", tiny(f"paths.fer2013={root}", "data.train.shots=4", "data.val=null",
                                                      "data.test.split=test", embedded=False))
    dm = FERDataModule(cfg)
    dm.setup("fit")
    dm.setup("test")
    train, test = dm.datasets["train"].records, dm.datasets["test"].records
    assert Counter(r.label for r in train) == {c: 4 for c in range(7)}
    assert all("/train/" in r.image for r in train) and not {r.image for r in train} & {r.image for r in test}
    # a K-shot set of the test split itself is refused at composition, naming the key
    with pytest.raises(ConfigError, match=r"data.train.shots.*would be test images"):
        compose("supervised/fer2013_resnet18", [f"paths.fer2013={root}", "data.train.shots=4",
                                                "data.train.split=test", "data.test.split=test"])


def test_a_class_with_fewer_than_k_images_is_an_error(tmp_path, tiny):
    root = make_folder_dataset(tmp_path / "fer", FER2013_FOLDERS, per_class=2, size=32, split="train")
    cfg = compose("supervised/fer2013_resnet18", tiny(f"paths.fer2013={root}", "data.train.shots=3", "data.val=null",
                                                      "data.test=null", embedded=False))
    with pytest.raises(NotEnoughShotsError, match=r"data.train.shots=3: .*anger \(2\)"):
        _train(cfg)
    # a class the split lacks altogether counts as 0 images
    records = [Record(image=None, label=c % 3, id=str(c)) for c in range(12)]
    with pytest.raises(NotEnoughShotsError, match=r"sad \(0\)"):
        draw_shots(records, 2, 0, ("neutral", "happy", "fear", "sad"))
    picked = draw_shots(records, 2, 0, ("neutral", "happy", "fear"))
    assert [r.id for r in picked] == sorted((r.id for r in picked), key=int)  # dataset order kept
    assert Counter(r.label for r in picked) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ConfigError, match="data.train.shots"):
        compose("supervised/embedded", ["data.train.shots=-2"])
