"""The AU vocabulary reaches the models: the FAU adapter trains on a real AU list, checkpoints carry theirs, and a
set or checkpoint with other AUs is an error naming them (synthesis specs, resume, the judge's AU metrics)."""
from __future__ import annotations

import pytest
import torch

from datamodules.au_vocabulary import AUVocabularyError, canonical_au
from datamodules.labels import CANONICAL_8
from datamodules.procedural.aus import AU_NAMES
from fixtures import DEFAULT_AU_NAMES, make_synthetic_set
from lightning_synfer.checkpoints import read_checkpoint
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.metrics.generation import au_index_pairs
from lightning_synfer.models.au_adapter import AUAdapter
from lightning_synfer.modules.generator import GeneratorModule
from lightning_synfer.sampling.specs import specs_from_config
from lightning_synfer.tasks import fit

DISFA = [canonical_au(n) for n in DEFAULT_AU_NAMES]


def test_generator_trains_its_adapter_on_a_disfa_style_set(tiny, tmp_path, monkeypatch):
    root = make_synthetic_set(tmp_path / "disfa", n=16, num_classes=8, size=32, mode="L")
    seen: list[torch.Tensor] = []
    forward = AUAdapter.forward

    def recording(self, aus):
        if self.training:
            seen.append(aus.detach().clone())
        return forward(self, aus)

    monkeypatch.setattr(AUAdapter, "forward", recording)
    cfg = compose("generator/tiny_test", tiny("data.train.format=synthetic", f"data.train.root={root}", "data.val=null", "data.test=null",
                                              "generator.au_dropout=0", "generator.sample_every_n_steps=0",
                                              "trainer.limit_train_batches=2", "generator.export_on_fit_end=false"))
    fit.run(cfg)
    assert seen and all(a.shape[1] == 12 for a in seen)
    assert bool((torch.cat(seen) != 0).any()), "the FAU adapter saw only zeros: the AUs were dropped"
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    stored = read_checkpoint(last)
    assert stored["synfer"]["au_names"] == DISFA and stored["hyper_parameters"]["au_names"] == DISFA
    module = GeneratorModule.load(last)
    assert module.au_adapter.num_aus == 12 and module.au_names == DISFA


def test_resuming_a_checkpoint_with_other_aus_names_them(tiny):
    cfg = compose("generator/tiny_test", tiny())
    module = GeneratorModule(to_container(cfg), list(CANONICAL_8))  # the embedded vocabulary
    with pytest.raises(AUVocabularyError) as err:
        module.on_load_checkpoint({"synfer": {"au_names": DISFA}})
    msg = str(err.value)
    assert "generator checkpoint" in msg and "AU17" in msg and "AU12_unilateral" in msg


def test_synthesis_specs_refuse_a_training_set_without_the_generators_aus(tiny, tmp_path):
    """The generator speaks DISFA's AUs, the specs' AU statistics come from embedded faces: an error naming AU17,
    never a fallback to zeros or to EMFACS prototypes."""
    cfg = compose("generator/synthesize_embedded", tiny("synthesis.num_images=4", "data.train.num_images=16"))
    with pytest.raises(AUVocabularyError) as err:
        specs_from_config(cfg, list(CANONICAL_8), DISFA)
    assert "data.train (the embedded renderer" in str(err.value) and "missing ['AU17']" in str(err.value)
    root = make_synthetic_set(tmp_path / "disfa", n=16, num_classes=8, size=16, mode="L")
    cfg = compose("generator/synthesize_embedded", tiny("synthesis.num_images=4", "data.train.format=synthetic",
                                                        f"data.train.root={root}"))
    specs = specs_from_config(cfg, list(CANONICAL_8), list(reversed(DISFA)))  # any order of the same AUs
    assert all(len(s.aus) == 12 for s in specs)


def test_judge_metrics_pair_aus_by_name_in_any_spelling():
    assert au_index_pairs(["AU01", "AU17", "AU12"], list(AU_NAMES)) == [(0, 0), (2, 7)]
