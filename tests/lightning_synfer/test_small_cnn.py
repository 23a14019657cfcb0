"""The small face CNNs (lightning_synfer/models/small_cnn.py): timm registration, our backbone factory, and a
fast_dev_run of supervised/embedded_fast, the experiment that trains them."""
from __future__ import annotations

import pytest
import timm
import torch

from lightning_synfer.config import compose
from lightning_synfer.models.backbones import create_backbone, normalization_for
from lightning_synfer.models.small_cnn import VARIANTS
from lightning_synfer.tasks import fit

NAMES = sorted(VARIANTS)


def test_every_variant_is_registered_with_timm():
    assert NAMES and set(NAMES) <= set(timm.list_models("synfer_cnn_*"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_create_model_gives_logits_and_a_timm_interface(name, in_chans):
    model = timm.create_model(name, in_chans=in_chans, num_classes=8, drop_rate=0.2).eval()
    images = torch.randn(2, in_chans, 32, 32)
    assert model(images).shape == (2, 8)
    feature_map = model.forward_features(images)
    assert feature_map.shape[:2] == (2, model.num_features) and feature_map.ndim == 4
    assert model.forward_head(feature_map, pre_logits=True).shape == (2, model.num_features)
    assert model.head_drop.p == 0.2
    model.reset_classifier(5)
    assert model(images).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(images).shape == (2, model.num_features)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == 3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_backbone_factory_gives_pooled_features_at_32_and_64_px(name, in_chans):
    backbone = create_backbone(name, in_chans=in_chans).eval()
    for size in (32, 64):
        assert backbone(torch.randn(3, in_chans, size, size)).shape == (3, backbone.num_features)
    # From scratch the classifier normalises with 0.5/0.5; with weights, the model's pretrained_cfg in the
    # model's channels (grayscale: one value).
    assert normalization_for(backbone, in_chans, pretrained=True) == ([0.5] * in_chans, [0.5] * in_chans)


def test_pretrained_path_loads_local_weights_into_a_grayscale_model(tmp_path):
    source = timm.create_model("synfer_cnn_s", num_classes=8)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("synfer_cnn_s", in_chans=1, pretrained_path=str(path))
    stem = source.stem[0].weight
    assert torch.allclose(loaded.stem[0].weight, stem.sum(1, keepdim=True))  # timm sums RGB filters for gray
    assert torch.equal(loaded.stages[-1][-1].conv2[0].weight, source.stages[-1][-1].conv2[0].weight)


def test_features_only_lists_the_stem_and_every_stage():
    model = timm.create_model("synfer_cnn_s", in_chans=1, features_only=True)
    maps = model(torch.randn(1, 1, 32, 32))
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == model.feature_info.reduction()


def test_bad_stage_lists_name_the_arguments():
    with pytest.raises(ValueError, match="widths=.*depths=.*strides="):
        timm.create_model("synfer_cnn_s", widths=(8, 16), depths=(1,), strides=(1, 2))


def test_small_input_is_refused_because_the_stem_has_no_max_pool():
    with pytest.raises(ValueError, match="small_input"):
        create_backbone("synfer_cnn_s", in_chans=1, small_input=True)


def test_fast_dev_run_fit_embedded_fast(tiny):
    cfg = compose("supervised/embedded_fast", tiny("trainer.fast_dev_run=true"))
    assert cfg.model.backbone in VARIANTS
    metrics = fit.run(cfg)
    assert metrics["global_step"] == 1
