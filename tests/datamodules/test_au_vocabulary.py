"""AU vocabularies as data: spellings, scales, the run's vocabulary from the sets' headers, no silent drop."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from datamodules.au_vocabulary import (AUAligner, AUVocabularyError, au_difference, canonical_au, canonical_aus,
                                       to_unit)
from datamodules.datamodule import FERDataModule, resolve_au_names
from datamodules.procedural.aus import AU_NAMES
from datamodules.synthetic import read_manifest
from fixtures import DEFAULT_AU_NAMES, make_synthetic_set
from lightning_synfer.config import compose

DISFA = [canonical_au(n) for n in DEFAULT_AU_NAMES]  # AU1 ... AU26, 12 of them


@pytest.mark.parametrize("spelling", ["AU01", "AU1", "AU01_r", "au_1", "au 1", "AU01_c", "au_1_intensity", " AU001 "])
def test_usual_spellings_name_one_au(spelling):
    assert canonical_au(spelling) == "AU1"


def test_qualified_controls_stay_distinct_and_duplicates_are_named():
    assert canonical_au("AU12_unilateral") == "AU12_unilateral" != canonical_au("AU12")
    assert canonical_aus(AU_NAMES) == list(AU_NAMES)  # the renderer's list is already canonical
    with pytest.raises(AUVocabularyError, match=r"'AU01' and 'AU1_r' are the same AU \(AU1\)"):
        canonical_aus(["AU01", "AU2", "AU1_r"], source="x.csv")


def test_declared_scales_map_to_unit_interval():
    assert to_unit(2.5, "facs") == 0.5 and to_unit(5.0, "facs") == 1.0 and to_unit(7.0, "facs") == 1.0
    assert to_unit(0.25, "unit") == 0.25 and to_unit(-0.1, "unit") == 0.0
    assert to_unit(0.0, "logits") == 0.5
    assert np.isnan(to_unit(float("nan"), "facs"))
    with pytest.raises(ValueError, match="expected one of"):
        to_unit(1.0, "percent")


def test_aligner_reorders_and_refuses_a_missing_au():
    align = AUAligner(["AU02", "AU1", "AU4"], ["AU1", "AU2"], source_name="set", target_name="model")
    assert align([0.2, 0.1, 0.9]) == [0.1, 0.2]
    with pytest.raises(AUVocabularyError, match=r"missing \['AU17'\], extra \['AU4'\]"):
        AUAligner(["AU1", "AU4"], ["AU1", "AU17"], source_name="set", target_name="model")
    assert au_difference(["AU1", "AU4"], ["AU01", "AU17"]) == (["AU17"], ["AU4"])


def _cfg(tiny, *extra):
    return compose("supervised/embedded", tiny(*extra))


def test_embedded_run_keeps_the_renderers_14_aus(tiny):
    assert resolve_au_names(_cfg(tiny)) == list(AU_NAMES)


def test_a_disfa_set_brings_its_own_vocabulary_in_order(tiny, tmp_path):
    root = make_synthetic_set(tmp_path / "disfa", n=8, num_classes=7, size=16)
    cfg = _cfg(tiny, "data.train.format=synthetic", f"data.train.root={root}", "data.val=null", "data.test=null")
    assert resolve_au_names(cfg) == DISFA
    dm = FERDataModule(cfg)
    dm.setup("fit")
    _, raw = read_manifest(str(root))
    got = {r.id: r.aus for r in dm.datasets["train"].records}
    assert all(got[r["id"]] == r["aus"] for r in raw)  # same order, values untouched
    assert dm.datasets["train"][0]["aus"].shape == (12,)


def test_mixing_sets_intersects_with_a_warning_naming_the_dropped_aus(tiny, tmp_path, caplog):
    root = make_synthetic_set(tmp_path / "disfa", n=8, num_classes=7, size=32, mode="L")
    cfg = _cfg(tiny, "data.synthetic.format=synthetic", f"data.synthetic.root={root}", "data.mix.synthetic_ratio=0.5")
    with caplog.at_level(logging.WARNING, logger="datamodules.datamodule"):
        names = resolve_au_names(cfg)
    shared = [n for n in AU_NAMES if n in DISFA]
    assert names == shared and len(shared) == 11
    text = caplog.text
    assert "data.train" in text and "AU7" in text and "AU12_unilateral" in text  # the renderer's AUs DISFA lacks
    assert "data.synthetic" in text and "AU17" in text and str(root) in text
    dm = FERDataModule(cfg)
    dm.setup("fit")
    synth = dm.datasets["synthetic"][0]
    assert synth["aus"].shape == (11,) and bool(synth["has_aus"])  # aligned, not dropped to "no AUs"


def test_strict_policy_names_missing_and_extra_aus_and_the_file(tiny, tmp_path):
    root = make_synthetic_set(tmp_path / "disfa", n=8, num_classes=7, size=32, mode="L")
    cfg = _cfg(tiny, "data.synthetic.format=synthetic", f"data.synthetic.root={root}", "data.mix.synthetic_ratio=0.5",
               "data.au_policy=strict")
    with pytest.raises(AUVocabularyError) as err:
        resolve_au_names(cfg)
    msg = str(err.value)
    assert f"{root}/dataset.json" in msg and "missing ['AU7', 'AU23', 'AU12_unilateral']" in msg
    assert "extra ['AU17']" in msg


def test_data_au_names_asking_for_an_au_a_set_lacks_is_an_error(tiny, tmp_path):
    root = make_synthetic_set(tmp_path / "disfa", n=8, num_classes=7, size=16)
    base = ["data.train.format=synthetic", f"data.train.root={root}", "data.val=null", "data.test=null"]
    assert resolve_au_names(_cfg(tiny, *base, "data.au_names=[AU06,AU12]")) == ["AU6", "AU12"]
    with pytest.raises(AUVocabularyError, match=r"missing \['AU45'\]"):
        resolve_au_names(_cfg(tiny, *base, "data.au_names=[AU06,AU45]"))
