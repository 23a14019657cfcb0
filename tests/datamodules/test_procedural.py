"""The embedded procedural dataset: AU sampling, renderer, captions, splits and cache."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.labels import CANONICAL_7, CANONICAL_8, UnknownLabelError
from datamodules.procedural import (
    AU_DESCRIPTIONS, AU_INDEX, AU_NAMES, EMFACS_PROTOTYPES, EXPRESSION_WORDS, NUM_AUS, EmbeddedSplit,
    au_vector, label_caption, make_caption, render_face, render_split, render_split_cached,
    sample_aus, sample_identity,
)
from datamodules.records import Record

REQUIRED_AUS = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU12", "AU15", "AU20", "AU23", "AU25", "AU26")


def identity(seed: int = 0):
    return sample_identity(np.random.default_rng(seed), seed=seed)


def assert_prototypes_dominate(mean_aus: np.ndarray, name: str) -> None:
    prototype = [AU_INDEX[au] for au in EMFACS_PROTOTYPES[name]]
    others = [i for i in range(NUM_AUS) if i not in prototype]
    if prototype:
        assert mean_aus[prototype].min() > mean_aus[others].max() + 0.2, (name, mean_aus.round(2))
    else:
        assert mean_aus.max() < 0.1, (name, mean_aus.round(2))


# ------------------------------------------------------------------------------------------ AUs
def test_au_names_cover_required_units():
    assert set(REQUIRED_AUS) <= set(AU_NAMES)
    assert set(AU_DESCRIPTIONS) == set(AU_NAMES)
    assert set(EMFACS_PROTOTYPES) == set(CANONICAL_8)
    assert EMFACS_PROTOTYPES["contempt"] == {"AU12_unilateral": 1.0}


@pytest.mark.parametrize("name", CANONICAL_8)
def test_sampled_aus_follow_prototypes(name):
    rng = np.random.default_rng(0)
    samples = np.stack([sample_aus(name, rng) for _ in range(200)])
    assert samples.dtype == np.float32 and samples.shape == (200, NUM_AUS)
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert_prototypes_dominate(samples.mean(0), name)


def test_sampled_aus_vary_and_overlap():
    rng = np.random.default_rng(1)
    fear = np.stack([sample_aus("fear", rng) for _ in range(300)])
    assert fear[:, AU_INDEX["AU1"]].std() > 0.05  # intensity variation
    assert (fear[:, AU_INDEX["AU4"]] == 0).any()  # prototype AUs are sometimes dropped
    happy = np.stack([sample_aus("happy", rng) for _ in range(300)])
    assert (happy[:, AU_INDEX["AU4"]] > 0).any()  # and others fire weakly


def test_sample_aus_accepts_aliases_and_names_bad_class():
    sample_aus("Angry", np.random.default_rng(0))
    with pytest.raises(UnknownLabelError, match="bored"):
        sample_aus("bored", np.random.default_rng(0))
    with pytest.raises(KeyError, match="AU99"):
        au_vector({"AU99": 1.0})


# ------------------------------------------------------------------------------------- renderer
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_face_shape_and_dtype(size, channels):
    img = render_face(identity(), sample_aus("happy", np.random.default_rng(0)), size=size,
                      channels=channels, rng=np.random.default_rng(0))
    assert img.shape == (size, size, channels) and img.dtype == np.uint8
    assert img.std() > 10  # a face, not a flat image


# Weighted row centroid of the pixel change (64 px, frontal): brows/eyes above row 32, the nose
# and mouth below it.
EXPECTED_ROWS = {au: (10, 32) for au in ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7")}
EXPECTED_ROWS.update({au: (36, 60) for au in ("AU9", "AU12", "AU15", "AU20", "AU23", "AU25", "AU26",
                                               "AU12_unilateral")})


@pytest.mark.parametrize("au", AU_NAMES)
def test_each_au_changes_its_region(au):
    assert set(EXPECTED_ROWS) == set(AU_NAMES)
    for seed in range(3):
        person = identity(seed)
        rest = render_face(person, np.zeros(NUM_AUS), size=64).astype(np.int32)
        active = render_face(person, au_vector({au: 1.0}), size=64).astype(np.int32)
        change = np.abs(active - rest).sum(axis=(1, 2))
        assert change.sum() > 500, f"{au} barely changes the image (seed {seed})"
        centroid = (change * np.arange(64)).sum() / change.sum()
        low, high = EXPECTED_ROWS[au]
        assert low <= centroid <= high, f"{au} changes rows around {centroid:.1f}, expected {low}-{high}"


def test_au_intensity_is_graded():
    person = identity(2)
    rest = render_face(person, np.zeros(NUM_AUS), size=64).astype(np.int32)
    half = render_face(person, au_vector({"AU26": 0.5}), size=64).astype(np.int32)
    full = render_face(person, au_vector({"AU26": 1.0}), size=64).astype(np.int32)
    assert 0 < np.abs(half - rest).sum() < np.abs(full - rest).sum()


def test_unilateral_smile_is_asymmetric():
    person = identity(3)
    rest = render_face(person, np.zeros(NUM_AUS), size=64).astype(np.int32)
    smirk = np.abs(render_face(person, au_vector({"AU12_unilateral": 1.0}), size=64).astype(np.int32) - rest)
    smile = np.abs(render_face(person, au_vector({"AU12": 1.0}), size=64).astype(np.int32) - rest)
    def imbalance(change):  # >= 1; 1 means both halves of the face changed equally
        left, right = change[:, :32].sum(), change[:, 32:].sum()
        return max(left, right) / min(left, right)

    assert imbalance(smirk) > 1.4 and imbalance(smile) < 1.15, (imbalance(smirk), imbalance(smile))


def test_render_face_rejects_bad_input():
    with pytest.raises(ValueError, match=f"shape \\({NUM_AUS},\\)"):
        render_face(identity(), np.zeros(5))
    with pytest.raises(ValueError, match="channels must be 1 or 3, got 2"):
        render_face(identity(), np.zeros(NUM_AUS), channels=2)


def test_identities_vary():
    people = [identity(s) for s in range(30)]
    assert len({p.hair_style for p in people}) >= 3
    assert len({p.gender for p in people}) == 2
    assert np.ptp([p.skin[0] for p in people]) > 60
    assert np.ptp([p.face_width for p in people]) > 0.05


# ------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("name", CANONICAL_8)
def test_captions_mention_expression(name):
    rng = np.random.default_rng(0)
    aus = sample_aus(name, rng, intensity_range=(0.8, 1.0))
    for _ in range(5):
        caption = make_caption(name, aus, identity(), rng)
        assert any(word in caption for word in EXPRESSION_WORDS[name]), caption
        short = label_caption(name, rng)
        assert any(word in short for word in EXPRESSION_WORDS[name]), short
    strongest = AU_NAMES[int(np.argmax(aus))]
    if name == "neutral":
        assert "relaxed" in make_caption(name, aus, identity()) or "still" in make_caption(name, aus, identity())
    else:
        assert AU_DESCRIPTIONS[strongest] in make_caption(name, aus, identity())


def test_caption_example_form():
    person = identity(0)
    person.age, person.gender = "young", "man"
    aus = au_vector({"AU1": 0.9, "AU15": 0.8, "AU4": 0.2})
    assert make_caption("sad", aus, person) == (
        "a close-up photo of a young man with raised inner brows and a downturned mouth, looking sad")
    assert label_caption("happiness") == "a photo of a face looking happy"


# --------------------------------------------------------------------------------------- splits
def test_render_split_is_deterministic():
    a = render_split("train", 24, size=32, seed=3)
    b = render_split("train", 24, size=32, seed=3)
    c = render_split("train", 24, size=32, seed=4)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.aus, b.aus)
    assert a.captions == b.captions and np.array_equal(a.identity_ids, b.identity_ids)
    assert a.images.tobytes() != c.images.tobytes()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_split_shapes(size, channels):
    split = render_split("val", 8, size=size, channels=channels)
    assert isinstance(split, EmbeddedSplit) and len(split) == 8
    assert split.images.shape == (8, size, size, channels) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int64 and split.identity_ids.dtype == np.int64
    assert split.aus.shape == (8, NUM_AUS) and split.aus.dtype == np.float32
    assert len(split.captions) == 8 and all(isinstance(c, str) for c in split.captions)


def test_splits_have_disjoint_identities():
    ids = {name: set(render_split(name, 40, size=32).identity_ids.tolist()) for name in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert len(ids["train"]) > 1


@pytest.mark.parametrize("num_classes", [7, 8])
def test_render_split_is_class_balanced_and_follows_prototypes(num_classes):
    names = CANONICAL_8 if num_classes == 8 else CANONICAL_7
    split = render_split("train", 20 * num_classes, size=32, seed=1, num_classes=num_classes)
    assert split.class_names == names
    assert np.bincount(split.labels, minlength=num_classes).tolist() == [20] * num_classes
    for k, name in enumerate(names):
        assert_prototypes_dominate(split.aus[split.labels == k].mean(0), name)
        for caption in np.array(split.captions)[split.labels == k]:
            assert any(word in caption for word in EXPRESSION_WORDS[name]), caption


def test_to_records():
    split = render_split("test", 6, size=32)
    records = split.to_records(domain=1)
    assert len(records) == 6 and all(isinstance(r, Record) for r in records)
    r = records[2]
    assert r.image is None and r.id == "embedded-test-2" and r.domain == 1
    assert r.label == int(split.labels[2]) and r.caption == split.captions[2]
    assert np.array_equal(r.array, split.images[2]) and len(r.aus) == NUM_AUS


def test_render_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'training'"):
        render_split("training", 8)
    with pytest.raises(ValueError, match="got 6"):
        render_split("train", 8, num_classes=6)


def test_cache_roundtrip_and_recovery(tmp_path):
    first = render_split_cached("val", 16, size=32, seed=5, cache_dir=tmp_path)
    files = list(tmp_path.glob("embedded-val-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    again = render_split_cached("val", 16, size=32, seed=5, cache_dir=tmp_path)
    assert again.images.tobytes() == first.images.tobytes() and again.captions == first.captions
    assert np.array_equal(again.identity_ids, first.identity_ids)
    files[0].write_bytes(b"truncated")
    healed = render_split_cached("val", 16, size=32, seed=5, cache_dir=tmp_path)
    assert healed.images.tobytes() == first.images.tobytes()
    render_split_cached("val", 16, size=32, seed=6, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("embedded-val-*.npz"))) == 2


def test_config_sets_the_number_of_identities(tmp_path):
    """data.<split>.identities reaches the renderer and keys the cache (more images per person for SSL)."""
    from omegaconf import OmegaConf

    from datamodules.datamodule import embedded_split_args
    from datamodules.procedural.dataset import cache_file, render_split_cached

    cfg = OmegaConf.create({"data": {"image_size": 16, "channels": 1, "num_classes": 8},
                            "paths": {"cache_dir": str(tmp_path)}})
    few = embedded_split_args(cfg, OmegaConf.create({"split": "train", "num_images": 40, "seed": 0,
                                                     "identities": 4}))
    default = embedded_split_args(cfg, OmegaConf.create({"split": "train", "num_images": 40, "seed": 0}))
    assert few["identities_per_split"] == 4 and default["identities_per_split"] is None
    assert cache_file(**few) != cache_file(**default)
    assert len(set(render_split_cached(**few).identity_ids.tolist())) == 4
    assert len(set(render_split_cached(**default).identity_ids.tolist())) == 16
