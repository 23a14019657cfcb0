"""One learning-rate rule for every family: lr x effective batch / 256, where the effective batch is the global
batch (data.batch_size, over all devices and nodes) x trainer.accumulate_grad_batches."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_synfer import optim
from lightning_synfer.config import compose, to_container

LABELS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
BASE_LR = 1e-3
SCALED = ("optim.lr=0.001", "optim.scale_lr_with_batch=true", "optim.scheduler=constant", "data.batch_size=16")


def _supervised(cfg):
    from lightning_synfer.modules.supervised import SupervisedFER
    return SupervisedFER(to_container(cfg), LABELS)


def _labeler(cfg):
    from lightning_synfer.modules.labeler import PseudoLabelerModule
    return PseudoLabelerModule(to_container(cfg), LABELS)


def _generator(cfg):
    from lightning_synfer.modules.generator import GeneratorModule
    return GeneratorModule(to_container(cfg), LABELS)


def _ssl(cfg):
    from lightning_synfer.modules.ssl import SSLModule
    return SSLModule(to_container(cfg), [str(i) for i in range(cfg.data.num_classes)])


FAMILIES = {
    "supervised": ("supervised/embedded", ("model.backbone=test_resnet",), _supervised),
    "labeler": ("labeler/embedded", (), _labeler),
    "generator": ("generator/tiny_test", ("generator.sample_every_n_steps=0",), _generator),
    "ssl": ("ssl/embedded_mocov3", ("model.backbone=test_resnet",), _ssl),
}


def _peak_lrs(module, *, devices: int, accumulate: int) -> set[float]:
    module._trainer = SimpleNamespace(num_devices=devices, num_nodes=1, accumulate_grad_batches=accumulate,
                                      estimated_stepping_batches=100)
    out = module.configure_optimizers()
    opt = out["optimizer"] if isinstance(out, dict) else out
    return {g["lr"] for g in opt.param_groups}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_scales_lr_by_global_batch_times_accumulation(family, tiny):
    experiment, extra, build = FAMILIES[family]
    module = build(compose(experiment, tiny(*extra, *SCALED)))
    # 16 samples x 4 accumulated micro-batches = 64 per optimizer step, on 1 or 2 devices alike
    expected = BASE_LR * 16 * 4 / 256
    for devices in (1, 2):
        lrs = _peak_lrs(module, devices=devices, accumulate=4)
        assert any(lr == pytest.approx(expected) for lr in lrs), (family, devices, lrs)
    assert any(lr == pytest.approx(BASE_LR * 16 / 256) for lr in _peak_lrs(module, devices=1, accumulate=1)), family


def test_effective_batch_is_global_batch_times_accumulation():
    trainer = SimpleNamespace(num_devices=4, num_nodes=2, accumulate_grad_batches=3)
    assert optim.effective_batch(64, trainer) == 64 * 3
    with pytest.raises(ValueError, match=r"data.batch_size=60.*\(8 = devices x nodes\)"):
        optim.effective_batch(60, trainer)


def test_scaled_lr_off_keeps_the_configured_lr(tiny):
    cfg = compose("supervised/embedded", tiny("optim.lr=0.001", "optim.scale_lr_with_batch=false"))
    assert optim.scaled_lr(cfg.optim, 4096) == 0.001
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(num_devices=1, num_nodes=1, accumulate_grad_batches=8, estimated_stepping_batches=10)
    assert optim.configure(model, trainer, cfg.optim, 16)["optimizer"].param_groups[0]["lr"] == pytest.approx(0.001)
