"""Supervised-module features: Mixup/CutMix, soft-target cross-entropy with label smoothing, the warmup-cosine
schedule, local timm weights (model.pretrained_path) for 1- and 3-channel backbones with timm's normalisation,
and a fit on RGB input."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from datamodules.procedural.aus import NUM_AUS
from lightning_synfer import optim
from lightning_synfer.config import compose
from lightning_synfer.losses import SoftTargetCrossEntropy
from lightning_synfer.modules.base import default_normalization
from lightning_synfer.modules.supervised import SupervisedFER
from lightning_synfer.tasks import fit

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NAMES = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
# The trainer attributes optim.configure reads: one device, no gradient accumulation, 100 optimizer steps.
ONE_DEVICE = SimpleNamespace(num_devices=1, num_nodes=1, accumulate_grad_batches=1, estimated_stepping_batches=100)


# -- Mixup / CutMix ----------------------------------------------------------------------------------------------

def _batch(n: int = 8, size: int = 32, has_aus: bool = True) -> dict:
    labels = torch.arange(n) % len(NAMES)  # distinct labels: a mixed row names both of its parts
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 1, size, size, generator=g), "label": labels,
            "label_soft": F.one_hot(labels, len(NAMES)).float(), "aus": torch.rand(n, NUM_AUS, generator=g),
            "has_aus": torch.full((n,), has_aus), "domain": torch.zeros(n, dtype=torch.long)}


def _partners(target: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Read the partner of each sample and lambda off mixed one-hot targets of distinct labels."""
    partner = torch.arange(len(labels))
    lams = []
    for i, row in enumerate(target):
        others = [int(c) for c in row.nonzero() if int(c) != int(labels[i])]
        if others:
            partner[i] = int((labels == others[0]).nonzero())
            lams.append(float(row[labels[i]]))
    assert lams and max(lams) - min(lams) < 1e-6  # one coefficient for the whole batch
    return partner, lams[0]


def _run_step(module, batch, monkeypatch) -> dict:
    """training_step, recording what the backbone, the class loss and the AU loss were given."""
    from lightning_synfer.modules import supervised

    seen = {}
    module.backbone.register_forward_pre_hook(lambda m, args: seen.update(images=args[0].clone()))
    module.criterion.register_forward_pre_hook(lambda m, args: seen.update(target=args[1].clone()))
    real_mse = F.mse_loss
    monkeypatch.setattr(supervised.F, "mse_loss", lambda pred, target: seen.update(
        au_rows=len(pred), au_target=target.clone()) or real_mse(pred, target))
    torch.manual_seed(0)
    assert torch.isfinite(module.training_step(batch, 0))
    return seen


@pytest.mark.filterwarnings("ignore:.*self.log.*")  # a bare training_step: no trainer to log to
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_soft_labels_and_aus_with_one_coefficient(tiny, mode, monkeypatch):
    alpha = "loss.mixup_alpha=0.4" if mode == "mixup" else "loss.cutmix_alpha=1.0"
    cfg = compose("supervised/embedded", tiny(alpha, "loss.label_smoothing=0", "model.backbone=test_resnet",
                                              "model.au_head=true"))
    module = SupervisedFER(config=cfg, label_names=NAMES)
    batch = _batch()
    x, y, aus = batch["image"].clone(), batch["label_soft"].clone(), batch["aus"].clone()
    seen = _run_step(module, batch, monkeypatch)
    partner, lam = _partners(seen["target"], batch["label"])
    assert 0.0 < lam < 1.0
    assert torch.allclose(seen["target"], lam * y + (1 - lam) * y[partner], atol=1e-6)
    # the AU head is trained on the AUs of the images it sees: mixed with the same partners and lambda
    assert seen["au_rows"] == len(x)
    assert torch.allclose(seen["au_target"], lam * aus + (1 - lam) * aus[partner], atol=1e-6)
    images = seen["images"]
    if mode == "mixup":
        assert torch.allclose(images, lam * x + (1 - lam) * x[partner], atol=1e-5)
    else:  # a box pasted from the partner, lambda = the share of pixels kept (area-corrected)
        i = int((partner != torch.arange(len(x))).nonzero()[0])
        pasted = images[i, 0] != x[i, 0]
        assert torch.equal(images[i, 0][pasted], x[partner[i], 0][pasted])
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert int(pasted.sum()) == box  # a rectangle
        assert 1 - box / (32 * 32) == pytest.approx(lam, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_mixed_sample_has_aus_only_when_both_parts_have_them(tiny, monkeypatch):
    cfg = compose("supervised/embedded", tiny("loss.mixup_alpha=0.4", "model.backbone=test_resnet",
                                              "model.au_head=true", "loss.label_smoothing=0"))
    module = SupervisedFER(config=cfg, label_names=NAMES)
    batch = _batch()
    batch["has_aus"][::2] = False  # every other sample comes without AUs
    has_aus, aus = batch["has_aus"].clone(), batch["aus"].clone()
    seen = _run_step(module, batch, monkeypatch)
    partner, lam = _partners(seen["target"], batch["label"])
    both = has_aus & has_aus[partner]
    assert seen.get("au_rows", 0) == int(both.sum())  # no AU loss at all when no pair has AUs on both sides
    if both.any():
        assert torch.allclose(seen["au_target"], (lam * aus + (1 - lam) * aus[partner])[both], atol=1e-6)


def test_no_private_timm_mixup_call():
    root = Path(__file__).resolve().parents[2] / "lightning_synfer"
    assert not [str(p) for p in root.rglob("*.py") if "_mix_batch" in p.read_text()]


# -- soft-target cross-entropy -------------------------------------------------------------------------------------

def _hand_loss(logits: torch.Tensor, target: torch.Tensor, eps: float, weights=None) -> float:
    """mean_n -sum_c w_c * ((1 - eps) t_nc + eps / C) * log softmax(z_n)_c, in plain Python floats."""
    total = 0.0
    for z, t in zip(logits.tolist(), target.tolist()):
        c = len(z)
        log_norm = math.log(sum(math.exp(v) for v in z))
        total += -sum((weights[k] if weights else 1.0) * ((1 - eps) * t[k] + eps / c) * (z[k] - log_norm)
                      for k in range(c))
    return total / len(logits)


def test_soft_target_cross_entropy_with_label_smoothing_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    soft = torch.rand(6, 5, generator=g).softmax(-1)
    for eps in (0.0, 0.1, 0.3):
        assert float(SoftTargetCrossEntropy(eps)(logits, soft)) == pytest.approx(_hand_loss(logits, soft, eps), 1e-5)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    got = float(SoftTargetCrossEntropy(0.1, weights)(logits, soft))
    assert got == pytest.approx(_hand_loss(logits, soft, 0.1, weights), rel=1e-5)
    # hard labels: class indices, or their one-hot, give torch's own label-smoothed cross-entropy
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    ref = float(F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert float(SoftTargetCrossEntropy(0.1)(logits, labels)) == pytest.approx(ref, rel=1e-5)
    assert float(SoftTargetCrossEntropy(0.1)(logits, F.one_hot(labels, 5).float())) == pytest.approx(ref, rel=1e-5)


# -- warmup-cosine -------------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule_values(tiny):
    cfg = compose("supervised/embedded", tiny("optim.lr=0.001", "optim.warmup_fraction=0.1", "optim.min_lr_ratio=0.01",
                                              "optim.weight_decay=0.05"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    out = optim.configure(model, ONE_DEVICE, cfg.optim, global_batch=8)
    opt, sched = out["optimizer"], out["lr_scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # only the Linear weight decays
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    # 10 warmup steps: (s + 1) / 10 of the peak; then cosine from the peak to 1% of it at step 100
    for step, expected in [(0, 1e-4), (4, 5e-4), (9, 1e-3), (10, 1e-3), (55, 1e-3 * (0.01 + 0.99 * 0.5)),
                           (100, 1e-5)]:
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
    for step in range(10, 101):
        assert lrs[step] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    # lr scaling with the global batch, and the constant schedule
    scaled = compose("supervised/embedded", tiny("optim.lr=0.001", "optim.scale_lr_with_batch=true",
                                                 "optim.scheduler=constant"))
    out = optim.configure(model, ONE_DEVICE, scaled.optim, global_batch=512)
    assert set(out) == {"optimizer"} and out["optimizer"].param_groups[0]["lr"] == pytest.approx(2e-3)


# -- local timm weights --------------------------------------------------------------------------------------------

@pytest.fixture
def timm_weights(tmp_path):
    """A tiny timm model's full state dict (ImageNet pretrained_cfg, classifier included), as a local file."""
    source = timm.create_model("test_efficientnet", pretrained=False)
    torch.nn.init.normal_(source.conv_stem.weight)  # not the init a fresh model would draw
    path = tmp_path / "test_efficientnet.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_pretrained_path_loads_local_weights_into_1_and_3_channel_backbones(tiny, timm_weights):
    from lightning_synfer.models.backbones import create_backbone

    path, saved = timm_weights
    rgb = create_backbone("test_efficientnet", in_chans=3, pretrained_path=str(path))
    gray = create_backbone("test_efficientnet", in_chans=1, pretrained_path=str(path))
    assert set(saved) - set(rgb.state_dict()) == {"classifier.weight", "classifier.bias"}  # num_classes=0
    for key, value in rgb.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for key, value in gray.state_dict().items():
        # grayscale stem: the RGB filters summed (a gray image = equal R, G and B gives the same response)
        expected = saved[key].sum(1, keepdim=True) if key == "conv_stem.weight" else saved[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    gray_image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray.eval()(gray_image), rgb.eval()(gray_image.expand(-1, 3, -1, -1)), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="model.pretrained_path=.*missing.pth"):
        create_backbone("test_efficientnet", pretrained_path=str(path.parent / "missing.pth"))

    # normalisation: timm's resolve_data_config of the loaded model; 0.5 when training from scratch
    for channels, backbone, mean, std in ((3, rgb, IMAGENET_MEAN, IMAGENET_STD),
                                          (1, gray, [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])):
        cfg = compose("supervised/embedded", tiny(f"data.channels={channels}", f"model.pretrained_path={path}"))
        norm = default_normalization(cfg, backbone)
        assert norm["mean"] == pytest.approx(mean) and norm["std"] == pytest.approx(std)
        assert norm["channels"] == channels
        scratch = compose("supervised/embedded", tiny(f"data.channels={channels}"))
        assert default_normalization(scratch, backbone)["mean"] == [0.5] * channels


def test_fit_fast_dev_run_on_rgb_with_pretrained_weights_and_mixup_cutmix(tiny, timm_weights, monkeypatch):
    """data.channels=3 end to end: RGB batches, the local weights and timm's mean/std in the module and the loader,
    Mixup and CutMix both on (BatchMix switches between them)."""
    path, saved = timm_weights
    trainers = []
    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: trainers.append(real_build(*a, **k)) or trainers[-1])
    metrics = fit.run(compose("supervised/embedded", tiny(
        "trainer.fast_dev_run=true", "data.channels=3", "model.backbone=test_efficientnet",
        f"model.pretrained_path={path}", "loss.mixup_alpha=0.2", "loss.cutmix_alpha=1.0", "optim.lr=1e-12",
        "model.drop_rate=0")))
    assert metrics["global_step"] == 1 and 0 <= metrics["test"]["accuracy"] <= 1
    trainer = trainers[0]
    module, dm = trainer.lightning_module, trainer.datamodule
    assert module.normalization["mean"] == pytest.approx(IMAGENET_MEAN) and dm.mean == pytest.approx(IMAGENET_MEAN)
    assert dm.std == pytest.approx(IMAGENET_STD)
    assert module.backbone.conv_stem.weight.shape[1] == 3
    assert torch.allclose(module.backbone.conv_stem.weight.cpu(), saved["conv_stem.weight"], atol=1e-6)  # lr ~ 0
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32)
