"""Diffusion-feature pseudo-labeler: hooks, attention-keeping processors (with and without the FAU adapter),
fusion shapes, fit/evaluate on its checkpoints, self-contained checkpoints, a generator export as the UNet."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from datamodules.labels import CANONICAL_8
from lightning_synfer.checkpoints import ImageClassifier, load_module
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.config.compose import ConfigError, to_container
from lightning_synfer.models.au_adapter import cross_attention_layers, install_au_processors
from lightning_synfer.models.diffusion_features import (AttentionTokens, BidirectionalFusion,
                                                        DiffusionFeatureExtractor, FeatureTokens)
from lightning_synfer.models.unets import tiny_unet_config
from lightning_synfer.modules.labeler import PseudoLabelerModule
from lightning_synfer.tasks import fit


def _unet(levels=(True, False, True)) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(16, 1, (8, 16, 32), 1, levels, cross_attention_dim=16,
                                                   attention_heads=2))


def test_hooks_capture_every_up_block_at_its_scale():
    ex = DiffusionFeatureExtractor(_unet()).eval()
    x, cond = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16)
    feats, _ = ex(x, torch.tensor([1, 1]), cond)
    # up_blocks[i] ends with an upsampler except the last: 4 -> 8, 8 -> 16, 16.
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 16, 16, 16), (2, 8, 16, 16)]
    assert ex.scale_channels == [32, 16, 8]


def test_attention_maps_of_every_cross_attention_layer_keep_the_output_exact():
    unet = _unet()
    x, t, cond = torch.randn(2, 1, 16, 16), torch.tensor([3, 3]), torch.randn(2, 5, 16)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=cond).sample
    names = list(cross_attention_layers(unet))
    ex = DiffusionFeatureExtractor(unet).eval()
    with torch.no_grad():
        _, maps = ex(x, t, cond)
        wrapped = unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)  # the wrapper only reads
    # levels 0 and 2 of the down and up paths have cross-attention (1 + 2 layers each) plus the mid block.
    assert ex.attention_layers == names and len(maps) == 7
    sizes = sorted(m.shape[-1] for m in maps)
    assert sizes == [4, 4, 4, 4, 16, 16, 16]
    for m in maps:
        assert m.shape[:2] == (2, 5)
        torch.testing.assert_close(m.sum(1), torch.ones(2, *m.shape[-2:]))  # a softmax over text tokens


def test_with_au_processors_only_text_tokens_are_kept_and_au_weights_still_apply():
    unet = _unet()
    install_au_processors(unet, num_tokens=3)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 1])
    cond = torch.randn(2, 5 + 3, 16)  # cat([text tokens, AU tokens])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=cond).sample
    ex = DiffusionFeatureExtractor(unet, text_tokens=4).eval()
    with torch.no_grad():
        _, maps = ex(x, t, cond)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=cond).sample, plain, rtol=0, atol=0)
    assert len(maps) == 7 and all(m.shape[1] == 4 for m in maps)  # first 4 text tokens, no AU tokens
    assert any(".inner.to_k_au." in k for k in unet.state_dict())


def test_token_branches_and_fusion_block_shapes():
    ft = FeatureTokens([32, 16, 8], 24, grid=2)
    feats = [torch.randn(3, 32, 4, 4), torch.randn(3, 16, 8, 8), torch.randn(3, 8, 16, 16)]
    f = ft(feats)
    assert FeatureTokens([32, 16, 8], 24, grid=1)(feats).shape == (3, 3, 24)  # global-pool variant
    at = AttentionTokens(num_layers=7, num_tokens=5, grid=6, dim=24)
    a = at([torch.rand(3, 5, s, s) for s in (4, 8, 16, 16, 8, 4, 2)])
    assert f.shape == (3, 3 * 2 * 2, 24) and a.shape == (3, 7 * 5, 24)
    f2, a2 = BidirectionalFusion(24, 4)(f, a)
    assert f2.shape == f.shape and a2.shape == a.shape
    f2.sum().backward()
    assert at.proj.weight.grad is not None  # feature tokens read the attention tokens


def _module(tiny, *extra) -> PseudoLabelerModule:
    cfg = compose("labeler/embedded", tiny(*extra))
    return PseudoLabelerModule(to_container(cfg), list(CANONICAL_8))


def _save(module, path: Path) -> Path:
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _assert_checkpoint_outlives(source: Path, module, x: torch.Tensor, path: Path) -> None:
    """A checkpoint of `module` still gives its outputs on `x` after the frozen model's folder `source` is gone."""
    ckpt = _save(module, path)
    with torch.no_grad():
        ref = module(x)
    shutil.rmtree(source)
    with torch.no_grad():
        torch.testing.assert_close(load_module(ckpt)(x), ref)


def test_only_the_heads_train_and_the_frozen_unet_stays_in_eval(tiny):
    m = _module(tiny).train()
    assert not m.extractor.training and all(not p.requires_grad for p in m.extractor.parameters())
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"feature_tokens", "attention_tokens", "fusion", "readout_norm", "head"}
    logits = m(torch.rand(2, 1, 32, 32) * 2 - 1)
    logits.sum().backward()
    assert m.head[-1].weight.grad is not None and logits.shape == (2, 8)


def test_checkpoint_is_self_contained_and_store_frozen_false_reloads(tiny, tmp_path):
    m = _module(tiny).eval()
    x = torch.rand(3, 1, 32, 32)
    path = _save(m, tmp_path / "lab.ckpt")
    loaded = ImageClassifier(load_module(path, tasks=("labeler",))).eval()
    with torch.no_grad():
        ref = ImageClassifier(m).eval()(x)
        torch.testing.assert_close(loaded(x), ref)
        # Eval predictions do not depend on the batch (one fixed noise map).
        torch.testing.assert_close(loaded(x[:1]), ref[:1], rtol=1e-4, atol=1e-5)
    light = _module(tiny, "labeler.store_frozen=false").eval()
    light.load_state_dict(m.state_dict())
    small = _save(light, tmp_path / "light.ckpt")
    stored = torch.load(small, map_location="cpu", weights_only=True)["state_dict"]
    assert stored and not any(k.startswith(("extractor.unet.", "latent_encoder.")) for k in stored)
    frozen_bytes = sum(p.numel() * p.element_size() for p in m.extractor.unet.parameters())
    assert small.stat().st_size < path.stat().st_size - 0.9 * frozen_bytes
    with torch.no_grad():
        torch.testing.assert_close(load_module(small)(x * 2 - 1), m(x * 2 - 1))


def test_fit_fast_dev_run(tiny):
    metrics = fit.run(compose("labeler/embedded", tiny("trainer.fast_dev_run=true")))
    assert metrics["family"] == "labeler" and metrics["global_step"] == 1


def test_fit_then_evaluate_its_checkpoint(tiny, tmp_path):
    args = tiny("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.test.num_images=16",
                "logger.log_confusion_matrix=false")
    metrics = fit.run(compose("labeler/embedded", args))
    ckpt = metrics["best_checkpoint"]
    assert Path(ckpt).is_file() and metrics["test"]["num_images"] == 16
    assert main(["evaluate", "experiment=labeler/embedded", *args, f"ckpt={ckpt}"]) == 0


def test_generator_export_as_frozen_unet_and_checkpoint_without_the_folder(tiny, tmp_path):
    from lightning_synfer.modules.generator import GeneratorModule

    gcfg = compose("generator/tiny_test", tiny("data.image_size=16"))
    torch.manual_seed(0)
    export = GeneratorModule(config=to_container(gcfg), label_names=list(CANONICAL_8)).save_pretrained(
        tmp_path / "gen")
    m = _module(tiny, "data.image_size=16", f"labeler.unet_path={export}", "labeler.caption=a face").eval()
    assert m.frozen_spec["source"] == "generator" and m.frozen_spec["au"]["num_tokens"] == 4
    features, maps = m.diffusion_features(torch.rand(2, 1, 16, 16))
    # The generator's text tokens only (16), though the UNet also reads its 4 AU tokens.
    assert len(maps) == len(cross_attention_layers(m.extractor.unet)) and all(a.shape[1] == 16 for a in maps)
    assert [f.shape[1] for f in features] == [16, 8]
    _assert_checkpoint_outlives(export, m, torch.rand(2, 1, 16, 16), tmp_path / "lab.ckpt")


def test_bad_labeler_config_names_the_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match="labeler.dim"):
        compose("labeler/embedded", tiny("labeler.dim=30", "labeler.heads=4"))
    with pytest.raises(FileNotFoundError, match="labeler.unet_path"):
        _module(tiny, f"labeler.unet_path={tmp_path}")


def test_stable_diffusion_folder_reads_latents_of_the_vae(tiny, tmp_path):
    from fixtures import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd")
    m = _module(tiny, "data.image_size=16", f"labeler.unet_path={sd}").eval()
    assert m.frozen_spec["source"] == "sd" and m.latent_encoder is not None
    x = torch.rand(2, 1, 16, 16) * 2 - 1  # grayscale in, RGB to the VAE
    assert tuple(m.model_input(x).shape) == (2, 4, 8, 8)
    features, maps = m.diffusion_features(x)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 8, 8), (8, 8, 8)]
    assert len(maps) == 4 and all(a.shape[1] == 16 for a in maps)  # down 1 + up 2 + mid 1; CLIP has 16 positions
    _assert_checkpoint_outlives(sd, m, x, tmp_path / "lab.ckpt")


def test_fit_on_a_plain_diffusers_unet_folder(tiny, tmp_path):
    """labeler.unet_path = a bare UNet2DConditionModel.save_pretrained folder: no generator export, no SD folder."""
    folder = tmp_path / "unet"
    unet = _unet()  # 16 px, 1 channel, cross-attention width 16
    unet.save_pretrained(folder)
    extra = ("data.image_size=16", f"labeler.unet_path={folder}")
    m = _module(tiny, *extra).eval()
    assert m.frozen_spec["source"] == "diffusers-unet" and m.latent_encoder is None
    assert m.conditioning.shape[-1] == 16  # a fixed caption encoding at the UNet's width
    # The folder's weights, not a fresh random UNet.
    saved, loaded = unet.state_dict(), m.extractor.unet.state_dict()
    assert saved.keys() <= loaded.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items())
    features, maps = m.diffusion_features(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert [f.shape[1] for f in features] == [32, 16, 8] and len(maps) == 7
    metrics = fit.run(compose("labeler/embedded", tiny(*extra, "trainer.fast_dev_run=true")))
    assert metrics["family"] == "labeler" and metrics["global_step"] == 1
