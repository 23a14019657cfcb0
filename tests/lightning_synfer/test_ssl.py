"""Self-supervised pre-training: every method runs, losses equal their reference formulas, the EMA teacher
and its tau schedule, the kNN metric, LR scaling with the global batch, and pre-train -> linear/knn/finetune
-> evaluate end to end. (The 2-process DDP gradient check is in test_ssl_ddp.py.)"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from discover_experiments import ssl_pretraining_on_embedded_data
from lightning_synfer.checkpoints import load_module
from lightning_synfer.cli import main
from lightning_synfer.config import ConfigError, compose, to_container
from lightning_synfer.losses.ssl import MoCoV3Loss
from lightning_synfer.metrics.knn import WeightedKNN
from lightning_synfer.modules.ssl import METHODS, SSLModule
from lightning_synfer.tasks import fit

# A backbone without batch statistics that runs in milliseconds, and small heads.
SMALL = ["model.backbone=test_vit", "ssl.proj_hidden_dim=32", "ssl.pred_hidden_dim=32", "ssl.proj_output_dim=16",
         "ssl.methods.dino.output_dim=64", "ssl.methods.dino.bottleneck_dim=16", "ssl.aug.local_size=16",
         "data.train.num_images=32"]


# -- every method trains ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ssl_pretraining_on_embedded_data())
def test_fast_dev_run(experiment, tiny):
    """Every SSL pre-training experiment on the embedded faces (found by what it configures: a new method's YAML
    runs here without being listed)."""
    extra = ["data.synthetic.num_images=32"] if compose(experiment).data.synthetic is not None else []
    cfg = compose(experiment, tiny("trainer.fast_dev_run=true", *SMALL, *extra))
    metrics = fit.run(cfg)
    assert metrics["global_step"] == 1 and metrics["method"] == cfg.ssl.method
    assert math.isfinite(metrics["train_ssl_loss"])
    assert 0.0 <= metrics["val_knn_acc"] <= 1.0 and 0.0 <= metrics["val_linear_acc"] <= 1.0


@pytest.mark.parametrize("experiment,synthetic_share", [("embedded_mocov3_synthetic", 1.0),
                                                         ("embedded_mocov3_both", 0.5)])
def test_pretraining_batches_mix_real_and_synthetic(experiment, synthetic_share, tiny):
    from lightning_synfer.modules.ssl.base import SSLDataModule

    cfg = compose(f"ssl/{experiment}", tiny(*SMALL, "data.synthetic.num_images=32", "ssl.aug.local_crops=0"))
    dm = SSLDataModule(cfg, normalization=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["image"], list) and len(batch["image"]) == 2
    assert batch["image"][0].shape == (8, 1, 32, 32) and not torch.equal(batch["image"][0], batch["image"][1])
    assert batch["domain"].float().mean().item() == pytest.approx(synthetic_share)
    bank, val = dm.val_dataloader()  # kNN bank (real train, eval transform) first, then the real val split
    assert len(bank.dataset) == 32 and all(r.domain == 0 for r in bank.dataset.records)
    assert len(val.dataset) == 32


def test_face_nuisance_views_rotate_light_and_add_noise(tiny):
    """ssl.aug.rotation / light_gradient / noise_std: off by default (the published recipes); on, a flat grey
    face stays grey in the middle but gets grey-filled rotated corners, a brightness ramp of at most the asked
    strength, and pixel noise of the asked size."""
    from PIL import Image

    from lightning_synfer.modules.ssl.base import multi_view_transform

    flat = Image.new("L", (32, 32), 200)
    plain = ["ssl.aug.crop_scale=[1.0,1.0]", "ssl.aug.hflip=0", "ssl.aug.color_jitter=0", "ssl.aug.blur_prob=[0,0]",
             "ssl.aug.solarize_prob=[0,0]"]
    views = multi_view_transform(compose("ssl/embedded_mocov3", tiny(*plain)), [0.0], [1.0])(flat)
    assert all(torch.allclose(v, torch.full_like(v, 200 / 255)) for v in views)
    torch.manual_seed(0)
    noisy = multi_view_transform(compose("ssl/embedded_mocov3", tiny(*plain, "ssl.aug.noise_std=0.05")),
                                 [0.0], [1.0])(flat)[0]
    assert (noisy - 200 / 255).std().item() == pytest.approx(0.05, rel=0.15)
    turned = multi_view_transform(compose("ssl/embedded_mocov3", tiny(*plain, "ssl.aug.rotation=45")),
                                  [0.0], [1.0])
    corners = torch.stack([v[0, 0, 0] for _ in range(20) for v in [turned(flat)[0]]])
    assert (corners < 190 / 255).any()  # some rotation moved grey fill (127) into a corner
    assert all(torch.allclose(turned(flat)[0][0, 12:20, 12:20], torch.tensor(200 / 255)) for _ in range(5))
    lit = multi_view_transform(compose("ssl/embedded_mocov3", tiny(*plain, "ssl.aug.light_gradient=0.3")),
                               [0.0], [1.0])
    ramps = [lit(flat)[0][0] for _ in range(20)]
    assert all(torch.allclose(r[15:17, 15:17], torch.tensor(200 / 255), atol=0.02) for r in ramps)  # centre kept
    spread = [float(r.max() - r.min()) for r in ramps]
    # opposite corners: gain 1 -/+ s * (cos + sin), at most 1 -/+ s * sqrt(2), s <= 0.3
    assert max(spread) > 0.1 and max(spread) <= 2 * 0.3 * math.sqrt(2) * 200 / 255 + 1e-4
    for bad in ("ssl.aug.rotation=-5", "ssl.aug.noise_std=-0.1", "ssl.aug.light_gradient=2"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            compose("ssl/embedded_mocov3", [bad])


def test_registry_and_config_errors(tiny):
    assert METHODS.names() == ["byol", "dino", "mocov3", "simclr"]  # found by discovery: ssl/__init__.py lists none
    with pytest.raises(ConfigError, match="'ssl.method' = 'swav': expected a registered SSL method"):
        compose("ssl/embedded_mocov3", ["ssl.method=swav"])
    with pytest.raises(ConfigError, match=r"ssl.aug.local_crops.*uses local crops \(dino\)"):
        compose("ssl/embedded_mocov3", ["ssl.aug.local_crops=2"])
    # each method's settings: misspelt keys get the closest one, ranges are the method's own, old flat keys moved
    with pytest.raises(ConfigError, match=r"'ssl.methods.dino.teacher_tmp'.*Did you mean ssl.methods.dino.teacher_temp"):
        compose("ssl/embedded_dino", ["ssl.methods.dino.teacher_tmp=0.1"])
    with pytest.raises(ConfigError, match="Did you mean 'dino'"):
        compose("ssl/embedded_mocov3", ["ssl.methods.dnio.teacher_temp=0.1"])
    with pytest.raises(ConfigError, match=r"'ssl.methods.simclr.temperature' = -1.0: expected a value > 0"):
        compose("ssl/embedded_simclr", ["ssl.methods.simclr.temperature=-1"])
    with pytest.raises(ConfigError, match="ssl.methods.dino.output_dim"):
        compose("ssl/embedded_dino", ["ssl.methods.dino.output_dim=many"])
    with pytest.raises(ConfigError, match="renamed to 'ssl.methods.dino.teacher_temp'"):
        compose("ssl/embedded_dino", ["ssl.dino_teacher_temp=0.1"])
    # a section of another method may stay, so the method can be switched on the command line
    assert compose("ssl/embedded_dino", ["ssl.method=mocov3", "ssl.aug.local_crops=0"]).ssl.method == "mocov3"


# -- losses against their reference formulas ----------------------------------------------------------------


def _pairs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_mocov3_loss_matches_paper_formula_and_differs_from_ntxent():
    q, k = _pairs()
    tau = 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    # ctr(q, k) = mean_i -log( exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) ) * 2 tau   (MoCo v3, Alg. 1)
    ref = torch.stack([-(qn[i] @ kn[i] / tau - torch.logsumexp(qn[i] @ kn.T / tau, 0)) for i in range(len(q))])
    ref = ref.mean() * 2 * tau
    torch.testing.assert_close(MoCoV3Loss(tau)(q, k), ref)
    # lightly's NT-Xent also uses the other queries as negatives and symmetrises: a different objective.
    ntxent = NTXentLoss(temperature=tau, memory_bank_size=0)(q, k) * 2 * tau
    assert not torch.allclose(ntxent, ref, rtol=1e-3)


def _views(module, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Two global views and, for multi-crop methods, two local ones, as the SSL DataModule gives them."""
    g = torch.Generator().manual_seed(seed)
    size, ch = module.cfg.data.image_size, module.cfg.data.channels
    local = module.cfg.ssl.aug.local_size
    sizes = [size, size] + ([local, local] if module.uses_local_crops else [])
    return [torch.randn(n, ch, s, s, generator=g) for s in sizes]


def _ntxent(a, b, tau):
    """SimCLR's NT-Xent: each view's positive is the other view of its image, every other sample a negative."""
    n = len(a)
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))  # a sample is not its own negative
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def _ctr(q, k, tau):
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(qn @ kn.T / tau, torch.arange(len(q))) * 2 * tau


def _negcos(p, z):
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1).mean()


def _dino(teacher_out, student_out, teacher_temp, student_temp):
    """H(softmax(t / T_t), softmax(s / T_s)) over every (teacher view, other student view) pair; centre 0."""
    terms = [-(F.softmax(t / teacher_temp, -1) * F.log_softmax(s / student_temp, -1)).sum(-1).mean()
             for ti, t in enumerate(teacher_out) for si, s in enumerate(student_out) if si != ti]
    return torch.stack(terms).mean()


def _reference_loss(method, module, views):
    """Each method's objective from its paper, written out over the module's own heads and its settings."""
    s, f = module.settings, [module.backbone(v) for v in views]
    if method == "simclr":
        return _ntxent(module.projector(f[0]), module.projector(f[1]), s.temperature)
    t = module.teacher
    k = [t["projector"](t["backbone"](v)) for v in views[:2]]
    if method == "dino":
        return _dino(k, [module.projector(x) for x in f], s.teacher_temp, s.student_temp)
    p = [module.predictor(module.projector(x)) for x in f]
    if method == "mocov3":
        return _ctr(p[0], k[1], s.temperature) + _ctr(p[1], k[0], s.temperature)
    return 0.5 * (_negcos(p[0], k[1]) + _negcos(p[1], k[0]))  # byol


@pytest.mark.parametrize("method,settings", [
    ("mocov3", {"temperature": 0.3}),
    ("simclr", {"temperature": 0.3}),
    ("byol", {}),
    ("dino", {"teacher_temp": 0.07, "student_temp": 0.2}),
])
def test_each_method_wires_its_loss_views_and_settings(method, settings, tiny):
    """ssl_step's loss is the paper's objective over the right views (symmetrised, teacher on the global views
    only for DINO) with the temperatures of ssl.methods.<method>, not the loss class's defaults."""
    module = _module(method, tiny, *(f"ssl.methods.{method}.{k}={v}" for k, v in settings.items()))
    assert {k: getattr(module.settings, k) for k in settings} == settings
    views = _views(module)
    loss, feats = module.ssl_step(views)
    with torch.no_grad():
        ref = _reference_loss(method, module, views)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-5)
    assert len(feats) == 2 and all(x.shape == (4, module.feat_dim) for x in feats)  # global views, for the probe


# -- EMA teacher ---------------------------------------------------------------------------------------------


def _module(method: str, tiny, *extra: str):
    cfg = compose(f"ssl/embedded_{method}", tiny(*SMALL, *extra))
    return SSLModule(to_container(cfg), [str(i) for i in range(cfg.data.num_classes)])


def test_momentum_update_and_tau_schedule(tiny):
    module = _module("byol", tiny, "ssl.momentum_start=0.9", "ssl.momentum_end=1.0")
    assert type(module).__name__ == "BYOL"
    student = module.projector.layers[0].weight
    teacher = module.teacher["projector"].layers[0].weight
    assert torch.equal(student, teacher) and not teacher.requires_grad
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    module.update_teacher(0.9)
    torch.testing.assert_close(teacher, 0.9 * before + 0.1 * student)
    # cosine from momentum_start to momentum_end over the run
    taus = [module.momentum_at(s, 101) for s in range(101)]
    assert taus[0] == pytest.approx(0.9) and taus[-1] == pytest.approx(1.0) and taus[50] == pytest.approx(0.95)
    assert all(a <= b for a, b in zip(taus, taus[1:]))


# -- kNN metric ----------------------------------------------------------------------------------------------


def _unit(deg: float) -> torch.Tensor:
    r = math.radians(deg)
    return torch.tensor([[math.cos(r), math.sin(r)]])


def test_knn_toy_problem_with_known_answers():
    bank = torch.cat([_unit(a) for a in (0, 5, 10, 80, 85, 90)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    knn = WeightedKNN(num_classes=2, k=3, temperature=0.07)
    knn.update(train_features=bank * 3.0, train_targets=labels)  # scale does not matter: cosine
    knn.update(test_features=torch.cat([_unit(2), _unit(88), _unit(30)]), test_targets=torch.tensor([0, 1, 1]))
    preds, _ = knn.predictions()
    assert preds.tolist() == [0, 1, 0]
    assert knn.compute().item() == pytest.approx(2 / 3)
    # Weighted votes: one very close neighbour of class 1 outvotes two distant class-0 neighbours at T=0.07,
    # while at a huge temperature the votes are nearly equal and the majority (class 0) wins.
    bank = torch.cat([_unit(60), _unit(-60), _unit(0)])
    for temperature, expected in ((0.07, 1), (100.0, 0)):
        knn = WeightedKNN(num_classes=2, k=3, temperature=temperature)
        knn.update(train_features=bank, train_targets=torch.tensor([0, 0, 1]))
        knn.update(test_features=_unit(0), test_targets=torch.tensor([expected]))
        assert knn.predictions()[0].item() == expected and knn.compute().item() == 1.0


# -- LR scaling ----------------------------------------------------------------------------------------------


def test_lr_scales_with_global_batch(tiny):
    module = _module("mocov3", tiny, "data.batch_size=512", "optim.lr=4e-3", "optim.scale_lr_with_batch=true")
    for devices, nodes, accumulate, expected in ((1, 1, 1, 8e-3), (2, 2, 1, 8e-3), (2, 2, 2, 16e-3)):
        module._trainer = SimpleNamespace(num_devices=devices, num_nodes=nodes, accumulate_grad_batches=accumulate,
                                          estimated_stepping_batches=100)
        opt = module.configure_optimizers()["optimizer"]
        main_groups = [g for g in opt.param_groups if g["weight_decay"] > 0]
        assert main_groups and all(g["initial_lr"] == pytest.approx(expected) for g in main_groups)
        assert module.global_batch_size() == 512 * accumulate
    module._trainer = SimpleNamespace(num_devices=3, num_nodes=1, accumulate_grad_batches=1,
                                      estimated_stepping_batches=100)
    with pytest.raises(ValueError, match="data.batch_size=512"):
        module.configure_optimizers()


# -- SyncBatchNorm where the method needs it ---------------------------------------------------------------


def test_every_method_declares_its_batchnorm_need_and_other_families_do_not_ask(tiny):
    from lightning_synfer.modules import module_class

    # All four papers normalise over the global batch (MoCo v3, SimCLR "global BN", BYOL cross-replica BN,
    # DINO's convert_sync_batchnorm); the overrides of the ssl family follow ssl.method.
    assert {name: m.cls.needs_sync_batchnorm for name, m in METHODS.items()} == \
        {"mocov3": True, "simclr": True, "byol": True, "dino": True}
    for method in METHODS.names():
        cfg = compose(f"ssl/embedded_{method}", tiny(*SMALL))
        assert SSLModule.trainer_overrides(cfg)["needs_sync_batchnorm"] is True, method
    # supervised FER keeps per-device statistics, and the generator (GroupNorm) has none to synchronise
    for family, experiment in (("supervised", "supervised/embedded"), ("generator", "generator/tiny_test")):
        hook = getattr(module_class(family), "trainer_overrides", lambda cfg: {})
        assert not hook(compose(experiment)).get("needs_sync_batchnorm", False), family

    class Undeclared(METHODS.get("simclr").cls):
        needs_sync_batchnorm = None

    with pytest.raises(TypeError, match="Undeclared .*needs_sync_batchnorm"):
        Undeclared.trainer_overrides(compose("ssl/embedded_simclr", tiny(*SMALL)))


@pytest.mark.parametrize("setting,needs,world,accelerator,expected", [
    (None, True, 2, "gpu", True),     # auto: the method needs it and two processes train
    (None, True, 1, "gpu", False),    # one process: nothing to synchronise
    (None, False, 8, "gpu", False),   # the module does not need it
    (None, True, 2, "cpu", False),    # torch's SyncBatchNorm cannot run on CPU tensors
    (False, True, 8, "gpu", False),   # forced off
    (True, False, 1, "cpu", True),    # forced on (a no-op for one process)
    (True, False, 4, "gpu", True),
])
def test_sync_batchnorm_decision(setting, needs, world, accelerator, expected):
    from lightning_synfer.trainer import resolve_sync_batchnorm

    assert resolve_sync_batchnorm(setting, needs, world, accelerator) is expected


def _layer_sync(trainer):
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    # what the Trainer was built with (the DDP strategy applies it to the model in setup; see test_ssl_ddp.py)
    return isinstance(trainer._accelerator_connector._layer_sync, TorchSyncBatchNorm)


def test_factory_turns_sync_batchnorm_on_per_method_and_config(tiny, monkeypatch, capsys):
    from lightning_synfer import trainer as factory
    from lightning_synfer.modules import module_class

    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]

    def build(experiment, *extra):
        cfg = compose(experiment, tiny(*SMALL, *ddp, *extra) if experiment.startswith("ssl/") else tiny(*ddp, *extra))
        family = module_class(cfg.task)
        return factory.build_trainer(cfg, None, **getattr(family, "trainer_overrides", lambda c: {})(cfg))

    # On CPU the auto choice stays off (torch cannot synchronise CPU BatchNorm) and says why ...
    assert not _layer_sync(build("ssl/embedded_mocov3"))
    assert "sync_batchnorm off" in capsys.readouterr().out
    with pytest.raises(ValueError, match="trainer.sync_batchnorm=true with 2 processes on cpu"):
        build("ssl/embedded_mocov3", "trainer.sync_batchnorm=true")
    # ... on an accelerator that can, every SSL method gets it, supervised FER does not, the config overrides both.
    monkeypatch.setattr(factory, "sync_batchnorm_supported", lambda accelerator: True)
    for method in METHODS.names():
        assert _layer_sync(build(f"ssl/embedded_{method}")), method
    assert "sync_batchnorm on" in capsys.readouterr().out
    assert not _layer_sync(build("ssl/embedded_mocov3", "trainer.sync_batchnorm=false"))
    assert not _layer_sync(build("supervised/embedded"))
    assert _layer_sync(build("supervised/embedded", "trainer.sync_batchnorm=true"))
    assert not _layer_sync(build("ssl/embedded_mocov3", "trainer.devices=1", "trainer.strategy=auto"))
    # the presets leave the choice to the method (null); old configs with true/false still compose
    for preset in ("ddp", "multinode"):
        assert compose("ssl/embedded_mocov3", [f"trainer={preset}"]).trainer.sync_batchnorm is None
    assert compose("supervised/embedded", ["trainer.sync_batchnorm=true"]).trainer.sync_batchnorm is True


# -- pre-train, then the offline evaluations, then evaluate --------------------------------------------------


def _metrics(run_root: Path, experiment: str) -> list[dict]:
    files = sorted((run_root / experiment).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in files]


def test_pretrain_then_linear_knn_finetune_and_evaluate(tiny, tmp_path):
    runs = tmp_path / "runs"
    args = tiny(*SMALL, "trainer.max_epochs=1")
    assert main(["fit", "experiment=ssl/embedded_mocov3", *args]) == 0
    pre = _metrics(runs, "ssl/embedded_mocov3")[-1]
    assert 0.0 <= pre["val_knn_acc"] <= 1.0 and Path(pre["best_checkpoint"]).name == "best.ckpt"
    ckpt = pre["last_checkpoint"]
    assert type(load_module(ckpt, tasks=("ssl",))).__name__ == "MoCoV3"

    for task in ("linear", "knn", "finetune"):
        assert main([task, f"ckpt={ckpt}", *args]) == 0, task
    linear, knn = _metrics(runs, "ssl/embedded_linear")
    finetune = _metrics(runs, "ssl/embedded_finetune")[-1]
    report_keys = {"accuracy", "macro_f1", "mean_class_recall", "per_class_recall", "confusion_matrix",
                   "label_names", "num_images"}
    for m, task in ((linear, "linear"), (knn, "knn"), (finetune, "finetune")):
        assert report_keys <= set(m) and m["task"] == task and m["num_images"] == 32
        assert m["backbone"] == "test_vit"

    # evaluate accepts the probe's checkpoint and reproduces its test accuracy
    assert main(["evaluate", f"ckpt={linear['best_checkpoint']}", "experiment=ssl/embedded_linear", *args]) == 0
    evaluated = [m for m in _metrics(runs, "ssl/embedded_linear") if m["task"] == "evaluate"][-1]
    assert evaluated["accuracy"] == pytest.approx(linear["accuracy"])
    assert main(["linear", *args]) == 2  # no ckpt=: one clear error line

    # The random-init control: same architecture and probe, the checkpoint's weights unused.
    assert main(["linear", f"ckpt={ckpt}", "ssl.probe.random_init=true", *args]) == 0
    control = [m for m in _metrics(runs, "ssl/embedded_linear") if m.get("random_init")][-1]
    source = load_module(ckpt, tasks=("ssl",)).backbone.state_dict()
    probes = {"pre-trained": load_module(linear["best_checkpoint"]), "random": load_module(control["best_checkpoint"])}
    same = {name: all(torch.equal(p.backbone.state_dict()[k], v) for k, v in source.items())
            for name, p in probes.items()}
    assert same == {"pre-trained": True, "random": False}


def test_linear_probe_standardises_frozen_features(tiny):
    """ssl.probe.feature_norm: the head reads BatchNorm-standardised features (no affine, no trained parameters);
    probe checkpoints written without it still load."""
    from lightning_synfer.modules.probe import LinearProbe

    cfg = compose("ssl/embedded_linear", tiny(*SMALL))
    names = [f"c{i}" for i in range(cfg.data.num_classes)]
    probe = LinearProbe(config=to_container(cfg), label_names=names)
    assert isinstance(probe.feature_norm, torch.nn.BatchNorm1d) and not list(probe.feature_norm.parameters())
    probe.train()
    assert probe.feature_norm.training and not probe.backbone.training
    size = cfg.data.image_size
    x = torch.rand(16, cfg.data.channels, size, size) * 50.0  # features far off unit scale
    with torch.no_grad():
        feats = probe.backbone(x)
        probe.feature_norm.momentum = 1.0  # running stats = this batch's
        probe.head(probe.feature_norm(feats))
        probe.eval()
        normed = probe.feature_norm(feats)
    assert torch.allclose(normed.mean(0), torch.zeros_like(normed[0]), atol=1e-3)
    plain = compose("ssl/embedded_linear", tiny(*SMALL, "ssl.probe.feature_norm=false"))
    assert isinstance(LinearProbe(config=to_container(plain), label_names=names).feature_norm,
                      torch.nn.Identity)
