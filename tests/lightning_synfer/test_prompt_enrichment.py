"""Prompt enrichment at synthesis: captions from the generator's own training set (expression words swapped to the
target), a local LLM (a tiny random GPT-2 built from a config dict), templates as the fallback; stored per record."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.labels import CANONICAL_8
from datamodules.procedural.aus import AU_NAMES
from datamodules.synthetic import read_manifest
from fixtures import make_synthetic_set
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.sampling.prompts import PromptEnricher, describe_active_aus, swap_expression_words
from lightning_synfer.sampling.specs import specs_from_config
from lightning_synfer.tasks import synthesize

OTHER_CLASS_WORDS = {"happy", "sad", "angry", "anger", "scared", "fear", "disgusted", "disgust", "surprised",
                     "surprise", "neutral", "happiness", "sadness"}


def test_expression_words_are_swapped_to_the_target():
    assert swap_expression_words("a smiling young woman, looking happy", "sad") == "a sad young woman, looking sad"
    assert swap_expression_words("a face full of anger", "happy") == "a face full of happiness"
    assert swap_expression_words("Angry man", "contempt") == "contemptuous man"


def test_training_set_captions_of_the_target_class_with_a_fallback_pool(tiny, tmp_path):
    train = make_synthetic_set(tmp_path / "gen_train", n=14, num_classes=7, size=16, mode="L")  # no contempt faces
    gen_cfg = compose("generator/tiny_test", tiny("data.train.format=synthetic", f"data.train.root={train}",
                                                  "data.val=null", "data.test=null"))
    cfg = compose("generator/synthesize_embedded", tiny("synthesis.num_images=16", "synthesis.captions=training_set",
                                                        "synthesis.au_source=emfacs"))
    specs = specs_from_config(cfg, list(CANONICAL_8), list(AU_NAMES), generator_cfg=gen_cfg)
    assert {s.caption_source for s in specs} == {"training_set"}
    for s in specs:
        name = CANONICAL_8[s.label]
        if name == "contempt":  # no caption of its own: another class's, its words swapped
            assert "contempt" in s.caption and not set(s.caption.split()) & OTHER_CLASS_WORDS
        else:  # the fixture's own caption of that class
            assert s.caption == swap_expression_words(f"a photo of a {name} face", name)
    again = specs_from_config(cfg, list(CANONICAL_8), list(AU_NAMES), generator_cfg=gen_cfg)
    assert [s.caption for s in again] == [s.caption for s in specs]  # deterministic per spec


def make_tiny_gpt2(folder: Path) -> Path:
    """A random GPT-2 text-generation folder from config dicts: a byte-level BPE tokenizer trained on a few words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a detailed photo of a happy face with raised cheeks"] * 4, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.eos_token_id))
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gen_export(tmp_path_factory):
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/tiny_test", ["data.image_size=16"])
    torch.manual_seed(0)
    return GeneratorModule(config=to_container(cfg), label_names=list(CANONICAL_8)).save_pretrained(
        tmp_path_factory.mktemp("gen") / "export")


def test_llm_enrichment_writes_the_prompt_used_per_record(tmp_path, gen_export):
    llm = make_tiny_gpt2(tmp_path / "gpt2")
    enricher = PromptEnricher(str(llm), max_new_tokens=6)
    aus = np.zeros(len(AU_NAMES))
    aus[[list(AU_NAMES).index("AU6"), list(AU_NAMES).index("AU12")]] = [0.9, 0.5]
    text = enricher.instruction_for("a face", "happy", aus.tolist(), AU_NAMES)
    assert "Coarse description: a face" in text and "expression happy" in text
    assert "raised cheeks (AU6), pulled-up lip corners (AU12)" in text
    assert describe_active_aus(None, AU_NAMES) == "none given"
    out = tmp_path / "synth"
    args = ["trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.image_size=16",
            "data.train.num_images=16", f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"synthesis.generator={gen_export}", f"synthesis.out={out}", "synthesis.batch_size=2", "sampling.steps=2",
            "synthesis.num_images=3", "synthesis.captions=llm", f"synthesis.llm.model={llm}",
            "synthesis.llm.max_new_tokens=6"]
    cfg = compose("generator/synthesize_embedded", args)
    synthesize.run(cfg)
    _, records = read_manifest(str(out))
    assert len(records) == 3
    for rec in records:
        assert rec["caption_source"] in ("llm", "llm_fallback_coarse") and rec["coarse_caption"]
        expected = enricher([rec["coarse_caption"]], [CANONICAL_8[rec["label"]]], [rec["aus"]], AU_NAMES)[0]
        assert (rec["caption"], rec["caption_source"]) == expected  # the prompt the generator saw, reproducible
    assert any(r["caption_source"] == "llm" and r["caption"] != r["coarse_caption"] for r in records)
    # Without enrichment the templates stay, as before.
    plain = tmp_path / "plain"
    synthesize.run(compose("generator/synthesize_embedded", [*args[:-3], f"synthesis.out={plain}"]))
    assert {r["caption_source"] for r in read_manifest(str(plain))[1]} == {"templates"}
