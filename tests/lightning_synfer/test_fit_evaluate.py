"""fit on embedded data (fast_dev_run and a real short run), evaluate on a fixture folder, resume."""
import json
from pathlib import Path

import pytest
import torch

from fixtures import make_folder_dataset, make_synthetic_set
from lightning_synfer.checkpoints import CheckpointError, load_module
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.tasks import fit


def _only_run_dir(root: Path) -> Path:
    runs = [p.parent for p in root.rglob("config.yaml")]
    assert len(runs) == 1, runs
    return runs[0]


def test_fast_dev_run_fit(tiny, tmp_path):
    cfg = compose("supervised/embedded", tiny("trainer.fast_dev_run=true"))
    metrics = fit.run(cfg)
    assert metrics["global_step"] == 1


def test_fit_writes_run_dir_and_metrics(tiny, tmp_path):
    cfg = compose("supervised/embedded", tiny("model.backbone=resnet18", "trainer.max_epochs=2"))
    fit.run(cfg)
    run = _only_run_dir(tmp_path / "runs")
    assert run.parent.name == "embedded" and run.parent.parent.name == "supervised"
    for name in ("config.yaml", "provenance.json", "metrics.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents*"))
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["packages"]["torch"] and "commit" in prov["git"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert len(metrics["test"]["per_class_recall"]) == 8
    assert metrics["test"]["num_images"] == 32


def test_evaluate_on_fixture_folder_excludes_missing_classes(tiny, tmp_path, capsys):
    cfg = compose("supervised/embedded", tiny("data.num_classes=7", "data.channels=1"))
    fit.run(cfg)
    ckpt = _only_run_dir(tmp_path / "runs") / "checkpoints" / "best.ckpt"
    folder = make_folder_dataset(tmp_path / "faces", classes=("happy", "sad", "contempt"), per_class=3, size=40)
    argv = tiny(f"ckpt={ckpt}", f"data.test.root={folder}", "data.test.format=folder", "data.test.split=test",
                "experiment=supervised/embedded")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="contempt"):
        assert main(["evaluate", *argv]) == 0
    printed = capsys.readouterr().out.splitlines()
    runs = sorted((tmp_path / "runs").rglob("metrics.json"))
    metrics = json.loads(max(runs, key=lambda p: p.stat().st_mtime).read_text())
    assert metrics["task"] == "evaluate"
    assert metrics["num_images"] == 6
    assert metrics["excluded_classes"] == {"contempt": 3}
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
    # evaluate prints its table: the values of metrics.json, in percent
    for row in ("| metric | value |", f"| accuracy | {100 * metrics['accuracy']:.2f} |",
                f"| macro-F1 | {100 * metrics['macro_f1']:.2f} |",
                f"| recall happy | {100 * metrics['per_class_recall']['happy']:.2f} |",
                "| recall neutral | n/a |", "| images | 6 |", f"| skipped | {metrics['num_skipped']} |"):
        assert row in printed, (row, printed)


def test_evaluate_rejects_bad_checkpoints(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_module(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "synfer": {"task": "generator", "label_names": []}, "hyper_parameters": {}}, other)
    with pytest.raises(CheckpointError, match="generator"):
        load_module(other, tasks=("supervised",))
    cfg = compose("supervised/embedded", tiny("trainer.max_epochs=1"))
    fit.run(cfg)
    ckpt = _only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="8 classes"):
        load_module(ckpt, num_classes=7)
    assert main(["evaluate", f"ckpt={tmp_path / 'nope.ckpt'}"]) == 2
    # A checkpoint written before a schema key existed still loads (the key takes its default).
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    del old["hyper_parameters"]["config"]["model"]["small_input"]
    torch.save(old, tmp_path / "older.ckpt")
    assert load_module(tmp_path / "older.ckpt").cfg.model.small_input is False


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


class _Crash(Exception):
    pass


def test_resume_equals_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Crash mid-epoch 2 (step 11 of 16), resume=auto from the step-9 checkpoint: same weights as 16 straight."""
    import lightning as L

    det = ["trainer.deterministic=true", "data.augment.preset=none", "model.drop_rate=0.0", "trainer.max_epochs=2",
           "trainer.checkpoint_every_n_steps=3"]
    fit.run(compose("supervised/embedded", tiny(*det, f"run_dir={tmp_path/'full'}")))

    class CrashAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 11:
                raise _Crash()

    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: real_build(*a, callbacks=[CrashAt()], **k))
    with pytest.raises(_Crash):
        fit.run(compose("supervised/embedded", tiny(*det, f"run_dir={tmp_path/'part'}")))
    monkeypatch.setattr(fit, "build_trainer", real_build)
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 9  # mid-epoch: 8 steps per epoch
    metrics = fit.run(compose("supervised/embedded", tiny(*det, f"run_dir={tmp_path/'part'}", "resume=auto")))
    assert metrics["global_step"] == 16
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_finished_run_dir_is_not_overwritten(tiny, tmp_path):
    cfg = compose("supervised/embedded", tiny("trainer.fast_dev_run=true", f"run_dir={tmp_path/'r'}"))
    fit.run(cfg)
    assert main(["fit", *tiny("trainer.fast_dev_run=true", f"run_dir={tmp_path/'r'}")]) == 2
    assert main(["fit", *tiny("trainer.fast_dev_run=true", f"run_dir={tmp_path/'r'}", "overwrite=true")]) == 0


def test_init_from_warm_starts_from_a_classifier_checkpoint(tiny, tmp_path):
    """model.init_from copies a checkpoint's weights before training; another label space is refused."""
    from lightning_synfer.checkpoints import init_weights_from
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("supervised/embedded", tiny("trainer.max_epochs=1"))
    fit.run(cfg)
    ckpt = _only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt"
    trained = load_module(ckpt)
    fresh = SupervisedFER(config=trained.hparams["config"], label_names=trained.label_names)
    assert not torch.equal(fresh.head.weight, trained.head.weight)
    init_weights_from(fresh, ckpt)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    seven = compose("supervised/embedded", tiny("data.num_classes=7"))
    other = SupervisedFER(config=seven, label_names=["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"])
    with pytest.raises(CheckpointError, match="model.init_from"):
        init_weights_from(other, ckpt)
    # Through the config: a second run starts from the first run's weights and still trains.
    warm = fit.run(compose("supervised/embedded", tiny("trainer.max_epochs=1", "seed=1", f"model.init_from={ckpt}")))
    assert warm["global_step"] > 0


def test_tta_hflip_averages_image_and_mirror_probabilities(tiny):
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("supervised/embedded", tiny("eval.tta_hflip=true"))
    module = SupervisedFER(config=cfg, label_names=[f"c{i}" for i in range(cfg.data.num_classes)]).eval()
    assert module.tta_hflip
    images = torch.rand(3, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        expected = 0.5 * (module(images).softmax(-1) + module(images.flip(-1)).softmax(-1))
        got = module._eval_logits(images).softmax(-1)
        assert torch.allclose(got, expected, atol=1e-5)
        module.tta_hflip = False  # evaluate sets it from eval.tta_hflip for any checkpoint
        assert torch.allclose(module._eval_logits(images), module(images))


def test_tta_crops_average_five_resized_crops_and_their_mirrors(tiny):
    import torch.nn.functional as F

    from lightning_synfer.modules.base import five_crops
    from lightning_synfer.modules.supervised import SupervisedFER

    images = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    crops = five_crops(images, 0.8)
    assert len(crops) == 5 and all(c.shape == images.shape for c in crops)
    # the bottom-right crop is rows/cols 2..9, resized back to 10x10
    expected = F.interpolate(images[..., 2:, 2:], size=(10, 10), mode="bilinear", align_corners=False)
    assert torch.equal(crops[3], expected)
    assert all(torch.equal(c, images) for c in five_crops(images, 1.0))

    cfg = compose("supervised/embedded", tiny("eval.tta_crops=true", "eval.tta_crop_fraction=0.75",
                                              "eval.tta_hflip=true"))
    module = SupervisedFER(config=cfg, label_names=[f"c{i}" for i in range(cfg.data.num_classes)]).eval()
    assert module.tta_crops == 0.75
    x = torch.rand(3, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        views = five_crops(x, 0.75)
        views += [v.flip(-1) for v in views]
        expected = torch.stack([module(v).softmax(-1) for v in views]).mean(0)
        assert torch.allclose(module._eval_logits(x).softmax(-1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="tta_crop_fraction"):
        module.tta_crops = 1.5


def test_evaluate_ensemble_averages_member_probabilities(tiny, tmp_path):
    from lightning_synfer.modules.ensemble import EnsembleClassifier
    from lightning_synfer.tasks import evaluate

    cfg7 = ("data.num_classes=7", "data.channels=1", "trainer.max_epochs=1")
    ckpts = []
    for seed in (0, 1):
        fit.run(compose("supervised/embedded", tiny(*cfg7, f"seed={seed}")))
        ckpts.append(max((tmp_path / "runs").rglob("best.ckpt"), key=lambda p: p.stat().st_mtime))
    assert ckpts[0] != ckpts[1]
    members = [load_module(p) for p in ckpts]
    ensemble = EnsembleClassifier(members, [str(p) for p in ckpts])
    x = torch.rand(4, 1, members[0].normalization["image_size"], members[0].normalization["image_size"])
    with torch.no_grad():
        expected = 0.5 * (members[0](x).softmax(-1) + members[1](x).softmax(-1))
        assert torch.allclose(ensemble(x).softmax(-1), expected, atol=1e-5)

    folder = make_folder_dataset(tmp_path / "faces", classes=("happy", "sad"), per_class=3, size=40)
    metrics = evaluate.run(compose("supervised/embedded", tiny(
        f"ckpt={ckpts[0]}", f"eval.ensemble=[{ckpts[1]}]", f"data.test.root={folder}", "data.test.format=folder",
        "data.test.split=test", "task=supervised")))
    assert metrics["ensemble"] == [str(ckpts[1])] and metrics["num_images"] == 6

    eight = fit.run(compose("supervised/embedded", tiny("data.num_classes=8", "trainer.max_epochs=1", "seed=2")))
    with pytest.raises(ValueError, match="share one label space"):
        EnsembleClassifier([members[0], load_module(eight["best_checkpoint"])], [str(ckpts[0]), "eight.ckpt"])


def test_au_head_is_built_and_saved_by_fit(tiny, tmp_path):
    """model.au_head=true through `fit` (not only when a caller passes AU names) gives a judge with an AU head."""
    from datamodules.procedural.aus import AU_NAMES

    cfg = compose("supervised/embedded", tiny("model.au_head=true", "trainer.max_epochs=1"))
    fit.run(cfg)
    module = load_module(_only_run_dir(tmp_path / "runs") / "checkpoints" / "last.ckpt")
    assert module.au_names == list(AU_NAMES)
    size = cfg.data.image_size
    aus = module.predict_aus(torch.rand(2, cfg.data.channels, size, size))
    assert aus.shape == (2, len(AU_NAMES)) and bool(((aus >= 0) & (aus <= 1)).all())


# -- metrics per domain ------------------------------------------------------------------------------------------

def _hand_metrics(preds: list[int], labels: list[int], num_classes: int) -> tuple[float, float, dict]:
    """Accuracy, macro-F1 over the classes present, per-class recall (None when absent), by counting."""
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    recall, f1s = {}, []
    for c in range(num_classes):
        support = sum(y == c for y in labels)
        if not support:
            recall[c] = None
            continue
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        predicted = sum(p == c for p in preds)
        r, prec = tp / support, (tp / predicted if predicted else 0.0)
        recall[c] = r
        f1s.append(2 * prec * r / (prec + r) if prec + r else 0.0)
    return acc, sum(f1s) / len(f1s), recall


def test_per_domain_metrics_match_a_hand_computation(tiny, tmp_path):
    """Mixed real + synthetic eval batches: val_<domain>/acc|macro_f1, val_<domain>_recall/<class> (and test_...)
    are logged for both domains, and the test report's per_domain block holds the same numbers."""
    import lightning as L
    from torch.utils.data import DataLoader

    from datamodules.datamodule import FERDataModule, FERDataset
    from datamodules.transforms import eval_transform
    from lightning_synfer.metrics.fer import report
    from lightning_synfer.modules.supervised import SupervisedFER

    syn = make_synthetic_set(tmp_path / "syn", n=12, num_classes=8, size=32, mode="L")
    cfg = compose("supervised/embedded", tiny(f"data.synthetic.root={syn}", "data.synthetic.format=synthetic",
                                              "data.mix.synthetic_ratio=0.5", "model.backbone=test_resnet",
                                              "data.val=null", "data.test=null"))
    dm = FERDataModule(cfg)
    dm.setup("fit")
    real, synthetic = dm.datasets["train"].records[:20], dm.datasets["synthetic"].records
    records = [r for pair in zip(real, synthetic) for r in pair] + real[len(synthetic):]  # domains interleaved
    names = list(dm.label_space.names)
    ds = FERDataset(records, eval_transform(32, dm.mean, dm.std), mode=dm.mode, label_names=names,
                    au_names=dm.au_names)
    module = SupervisedFER(config=cfg, label_names=names).eval()
    proj = torch.randn(32 * 32, len(names), generator=torch.Generator().manual_seed(0))
    module.forward = lambda images: images.flatten(1) @ proj  # a fixed classifier whose predictions vary
    with torch.no_grad():
        preds = module(torch.stack([ds[i]["image"] for i in range(len(ds))])).argmax(-1).tolist()
    assert len(set(preds)) > 2
    labels = [r.label for r in records]
    domains = {"real": [i for i, r in enumerate(records) if r.domain == 0],
               "synthetic": [i for i, r in enumerate(records) if r.domain == 1]}
    assert len(domains["real"]) == 20 and len(domains["synthetic"]) == 12

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(ds, batch_size=8)
    logged = trainer.validate(module, loader, verbose=False)[0]
    trainer.test(module, loader, verbose=False)
    logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")})
    test_report = report(module.last_test_summary, names)
    assert set(test_report["per_domain"]) == {"real", "synthetic"}
    for domain, idx in domains.items():
        acc, f1, recall = _hand_metrics([preds[i] for i in idx], [labels[i] for i in idx], len(names))
        for stage in ("val", "test"):
            assert logged[f"{stage}_{domain}/acc"] == pytest.approx(acc, abs=1e-6)
            assert logged[f"{stage}_{domain}/macro_f1"] == pytest.approx(f1, abs=1e-6)
            for c, name in enumerate(names):
                key = f"{stage}_{domain}_recall/{name}"
                assert (key in logged) == (recall[c] is not None), key
                if recall[c] is not None:
                    assert logged[key] == pytest.approx(recall[c], abs=1e-6), key
        block = test_report["per_domain"][domain]
        assert block["num_images"] == len(idx)
        assert block["accuracy"] == pytest.approx(acc) and block["macro_f1"] == pytest.approx(f1)
        assert block["per_class_recall"] == pytest.approx({n: recall[c] for c, n in enumerate(names)})
    overall_acc, overall_f1, _ = _hand_metrics(preds, labels, len(names))
    assert logged["val/acc"] == pytest.approx(overall_acc, abs=1e-6)
    assert test_report["macro_f1"] == pytest.approx(overall_f1)


def test_mixed_fit_logs_per_domain_metrics_and_reports_them(tiny, tmp_path, monkeypatch):
    """fit on real + synthetic (ratio 0.5), val on real, test on a synthetic set: val_real/* is logged next to
    val/*, and metrics.json's test report has a per_domain block for the test set's one domain."""
    import lightning as L

    class KeepValMetrics(L.Callback):
        seen: dict = {}

        def on_validation_end(self, trainer, pl_module):
            KeepValMetrics.seen = {k: float(v) for k, v in trainer.callback_metrics.items()}

    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: real_build(*a, callbacks=[KeepValMetrics()], **k))
    syn = make_synthetic_set(tmp_path / "syn", n=16, num_classes=8, size=32, mode="L")
    syn_test = make_synthetic_set(tmp_path / "syn_test", n=8, num_classes=8, size=32, mode="L")
    metrics = fit.run(compose("supervised/embedded", tiny(
        f"data.synthetic.root={syn}", "data.synthetic.format=synthetic", "data.mix.synthetic_ratio=0.5",
        f"data.test.root={syn_test}", "data.test.format=synthetic", "model.backbone=test_resnet",
        "logger.tensorboard=false")))
    seen = KeepValMetrics.seen
    assert seen["val_real/acc"] == pytest.approx(seen["val/acc"])  # val is all real
    assert seen["val_real/macro_f1"] == pytest.approx(seen["val/macro_f1"])
    recalls = [k for k in seen if k.startswith("val_real_recall/")]
    assert recalls and all(seen[k] == pytest.approx(seen[k.replace("val_real_", "val_")]) for k in recalls)
    assert not [k for k in seen if k.startswith("val_synthetic")]
    saved = json.loads((_only_run_dir(tmp_path / "runs") / "metrics.json").read_text())["test"]
    assert saved == metrics["test"] and set(saved["per_domain"]) == {"synthetic"}
    block = saved["per_domain"]["synthetic"]
    assert block == {"accuracy": saved["accuracy"], "macro_f1": saved["macro_f1"],
                     "per_class_recall": saved["per_class_recall"], "num_images": 8}
