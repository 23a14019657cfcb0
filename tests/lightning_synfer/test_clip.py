"""Task `clip` and `run.py zeroshot`: the contrastive loss against CLIP's formula, prompt-ensemble zero-shot on a toy
problem with a known answer, prompt files, fast_dev_run of the miniature configs, metrics.json in evaluate's format,
and a real transformers.CLIPModel (built from a CLIPConfig, saved to a folder, no download) with full, LoRA and
projection-only fine-tuning and a checkpoint that rebuilds without the folder's weights."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.labels import CANONICAL_8
from lightning_synfer.config import ConfigError, compose, to_container
from lightning_synfer.losses.clip import CLIPLoss
from lightning_synfer.prompts import PromptError, PromptSet, class_embeddings
from lightning_synfer.tasks import load

TINY_TEXT = ["clip.text_dim=16", "clip.text_layers=1", "clip.text_vocab_size=256", "clip.embed_dim=16",
             "clip.text_max_length=24"]
MINIATURE = ("zeroshot/embedded_tiny", "zeroshot/embedded_tiny_synthetic", "zeroshot/embedded_tiny_both")


def test_clip_loss_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    x, y, s = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.tensor(7.0)
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(6):  # -log softmax of the matching pair, image -> captions and caption -> images, averaged
        ref -= math.log(math.exp(s * xn[i] @ yn[i]) / sum(math.exp(s * xn[i] @ yn[j]) for j in range(6))) / 12
        ref -= math.log(math.exp(s * yn[i] @ xn[i]) / sum(math.exp(s * yn[i] @ xn[j]) for j in range(6))) / 12
    got = CLIPLoss()(x, y, s)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    one_way = F.cross_entropy(s * xn @ yn.T, torch.arange(6))
    assert abs(one_way.item() - ref) > 1e-3  # the loss is symmetric, not image -> text only
    with pytest.raises(ValueError, match="one caption per image"):
        CLIPLoss()(x, y[:5], s)


def _word_encoder(words: dict[str, int], dim: int):
    """A toy text tower: a prompt's embedding is the sum of one-hot vectors of its known words."""
    def encode(prompts):
        out = torch.zeros(len(prompts), dim)
        for i, p in enumerate(prompts):
            for w in p.lower().replace(".", " ").split():
                if w in words:
                    out[i, words[w]] += 1.0
        return out
    return encode


def test_prompt_ensemble_zero_shot_on_a_toy_problem(tmp_path, tiny):
    from lightning_synfer.modules.clip import CLIPModule

    prompts = PromptSet.load()
    assert len(prompts.templates) >= 5 and "{}" in prompts.templates[0]
    # every class word gets its own axis; every other word of the templates shares the context axis 8
    words = {w: c for c, name in enumerate(CANONICAL_8) for w in prompts.class_words[name]}
    context = {w for t in prompts.templates for w in t.replace("{}", "").replace(".", " ").lower().split()}
    words.update({w: 8 for w in context})
    cfg = compose("zeroshot/embedded_tiny", tiny(*TINY_TEXT))
    module = CLIPModule(config=to_container(cfg), label_names=list(CANONICAL_8)).eval()
    module.encoder.encode_text = _word_encoder(words, 9)
    module.encoder.encode_image = lambda images: images.flatten(1)[:, :9]  # "images" that are their embedding
    table = module.prompts
    assert len(table["happy"]) == len(prompts.templates) * len(prompts.class_words["happy"])
    # the ensemble formula: the mean of the normalised prompt embeddings, normalised
    emb = class_embeddings(module.encoder.encode_text, table)
    happy = F.normalize(module.encoder.encode_text(table["happy"]), dim=-1).mean(0)
    torch.testing.assert_close(emb[1], happy / happy.norm())
    # faces of class c lie near axis c (plus context and a neighbour's axis): the known answer is c
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat(4)
    faces = F.one_hot(labels, 9).float() + 0.5 * F.one_hot((labels + 1) % 8, 9).float() \
        + 0.3 * F.one_hot(torch.full_like(labels, 8), 9).float() + 0.05 * torch.rand(32, 9, generator=g)
    with torch.no_grad():
        logits = module(faces.view(32, 1, 3, 3))
    assert logits.argmax(-1).tolist() == labels.tolist()
    assert torch.allclose(logits, module.scale() * F.normalize(faces, dim=-1) @ emb.T, atol=1e-5)
    # a prompt file replaces the templates: one template whose class slot is ignored gives every class one embedding
    (tmp_path / "p.txt").write_text("# comment\na photo of a {} face\n")
    module.set_prompts(PromptSet.load(str(tmp_path / "p.txt")), ensemble=False)
    assert module.prompts["anger"] == ["a photo of a angry face"]
    (tmp_path / "bad.txt").write_text("no slot here\n")
    with pytest.raises(PromptError, match="exactly one"):
        PromptSet.load(str(tmp_path / "bad.txt"))
    (tmp_path / "p.yaml").write_text("templates: ['{} face']\nclass_words: {angry: [mad]}\n")
    assert PromptSet.load(str(tmp_path / "p.yaml")).prompts(["anger", "sad"]) == {"anger": ["mad face"],
                                                                                  "sad": ["sad face", "unhappy face"]}


@pytest.mark.parametrize("name", MINIATURE)
def test_fast_dev_run_fit_miniature(name, tiny, tmp_path):
    """zeroshot/embedded_tiny, zeroshot/embedded_tiny_synthetic, zeroshot/embedded_tiny_both: one contrastive step,
    zero-shot val and test."""
    cfg = compose(name, tiny("trainer.fast_dev_run=true", "data.synthetic.num_images=32", *TINY_TEXT)
                  if name != MINIATURE[0] else tiny("trainer.fast_dev_run=true", *TINY_TEXT))
    metrics = load("fit")(cfg, ["fit", f"experiment={name}"])
    assert metrics["family"] == "clip" and metrics["global_step"] == 1
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and len(metrics["test"]["per_class_recall"]) == 8


def _save(module, path):
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_zeroshot_task_writes_evaluate_format(tiny, tmp_path):
    from lightning_synfer.metrics.fer import report
    from lightning_synfer.modules.clip import CLIPModule

    cfg = compose("zeroshot/embedded_tiny", tiny(*TINY_TEXT))
    ckpt = _save(CLIPModule(config=to_container(cfg), label_names=list(CANONICAL_8)), tmp_path / "clip.ckpt")
    argv = [f"ckpt={ckpt}", "data.num_classes=7", *tiny(*TINY_TEXT)]
    metrics = load("zeroshot")(compose("zeroshot/embedded_tiny", argv), ["zeroshot", *argv])
    written = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert written["task"] == "zeroshot" and written["num_images"] == 32
    assert written["label_names"] == list(CANONICAL_8[:7])  # the command's classes, not the checkpoint's
    summary = {"acc": torch.tensor(0.5), "macro_f1": torch.tensor(0.5), "mean_recall": torch.tensor(0.5),
               "recall": torch.zeros(7),
               "confusion": torch.zeros(7, 7), "per_domain": {}}
    assert set(report(summary, list(CANONICAL_8[:7]))) <= set(written)  # everything evaluate's report has
    assert metrics["prompts_per_class"]["happy"] == 8 * 3


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny but real CLIPModel (transformers classes, random weights) and a tokenizer, saved as a local folder:
    the layout clip.pretrained_path reads. The tokenizer is MiniLM's (installed with the package), so CLIP's text
    config uses BERT's special tokens ([SEP] = 102 ends a caption)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from lightning_synfer.models.text_encoders import minilm_path

    folder = tmp_path_factory.mktemp("clip")
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=101, eos_token_id=102,
                         pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hf(folder, *extra):
    return ["clip.encoder=hf", f"clip.pretrained_path={folder}", "data.channels=3", *extra]


def test_hf_clip_finetune_modes(clip_folder, tiny):
    from lightning_synfer.modules.clip import CLIPModule

    def trainable(mode):
        cfg = compose("zeroshot/embedded_tiny", tiny(*_hf(clip_folder, f"clip.finetune={mode}")))
        module = CLIPModule(config=to_container(cfg), label_names=list(CANONICAL_8))
        return module, {n for n, p in module.named_parameters() if p.requires_grad}

    full, names = trainable("full")
    assert names == {n for n, _ in full.named_parameters()}
    _, names = trainable("head")
    assert names == {"encoder.model.visual_projection.weight", "encoder.model.text_projection.weight",
                     "encoder.model.logit_scale"}
    lora, names = trainable("lora")
    assert names and all("lora_" in n or n.endswith("logit_scale") for n in names)
    assert any("vision_model" in n for n in names) and any("text_model" in n for n in names)  # both towers
    assert sum(p.numel() for n, p in lora.named_parameters() if n in names) < 0.2 * sum(
        p.numel() for p in lora.parameters())
    with pytest.raises(ConfigError, match="clip.lora.target_modules"):
        trainable_cfg = compose("zeroshot/embedded_tiny", tiny(*_hf(clip_folder, "clip.finetune=lora",
                                                                    "clip.lora.target_modules=[nothing]")))
        CLIPModule(config=to_container(trainable_cfg), label_names=list(CANONICAL_8))
    with pytest.raises(ConfigError, match="data.channels"):
        compose("zeroshot/embedded_tiny", ["clip.encoder=hf", f"clip.pretrained_path={clip_folder}"])


def test_hf_clip_lora_fit_and_checkpoint_without_the_folder_weights(clip_folder, tiny, tmp_path):
    """fast_dev_run of LoRA tuning, then a checkpoint with changed adapters rebuilds from its stored CLIPConfig and
    gives the same zero-shot logits with the folder's weights gone (only the tokenizer is read)."""
    import shutil

    from lightning_synfer.checkpoints import load_module
    from lightning_synfer.modules.clip import CLIPModule

    overrides = tiny(*_hf(clip_folder, "clip.finetune=lora"))
    metrics = load("fit")(compose("zeroshot/embedded_tiny", [*overrides, "trainer.fast_dev_run=true"]), ["fit"])
    assert metrics["global_step"] == 1
    module = CLIPModule(config=to_container(compose("zeroshot/embedded_tiny", overrides)),
                        label_names=list(CANONICAL_8)).eval()
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters that change the model
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = module(images)
    path = _save(module, tmp_path / "lora.ckpt")
    folder = tmp_path / "folder"
    shutil.copytree(clip_folder, folder)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["config"]["clip"]["pretrained_path"] = str(folder)
    torch.save(ckpt, path)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    again = load_module(path, tasks=("clip",))
    with torch.no_grad():
        torch.testing.assert_close(again(images), before)
        plain = CLIPModule(config=to_container(compose("zeroshot/embedded_tiny", tiny(*_hf(clip_folder)))),
                           label_names=list(CANONICAL_8)).eval()
        assert not torch.allclose(plain(images), before, atol=1e-3)  # the adapters were saved and applied


def test_base_clip_configs_name_the_missing_folder(tmp_path):
    cfg = compose("zeroshot/base_rafdb", [f"paths.clip={tmp_path / 'none'}", f"paths.runs_dir={tmp_path}"])
    assert cfg.clip.pretrained_path == str(tmp_path / "none") and cfg.data.test.format == "rafdb"
    with pytest.raises(FileNotFoundError, match=r"clip.pretrained_path=.*none: no CLIPModel folder"):
        load("zeroshot")(cfg, ["zeroshot"])
