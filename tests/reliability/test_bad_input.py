"""Bad input: every case ends in a clear error naming the file/key/value (through `run.py`: exit code 2 and
one `error:` line, never a traceback), or in a counted skip where `data.on_bad_image=skip` says so; odd but
valid images (16-bit PNG, CMYK JPEG, alpha) load correctly, converted. Nothing here is silently wrong."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.labels import CANONICAL_8
from datamodules.records import BadImageError, load_image
from fixtures import make_affectnet, make_folder_dataset, make_synthetic_set
from lightning_synfer.cli import main
from lightning_synfer.config import compose, to_container

FAST = ["trainer.fast_dev_run=true", "data.val=null", "data.test=null", "model.backbone=test_resnet",
        "logger.tensorboard=false"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`run.py ARGV` in this process: (exit code, stderr). A bare traceback would raise here instead."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- image files ---------------------------------------------------------------------------------------------

def _jpeg_bytes(mode: str = "L", size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3) if mode == "RGB" else (size, size), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"garbage" * 50,
        "truncated.jpg": _jpeg_bytes()[:200],
        "zero.png": b"",
        "text_as.png": b"this is not a png at all",
    }
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    return out


@pytest.mark.parametrize("name,reason", [("corrupt.jpg", "cannot decode"), ("truncated.jpg", "cannot decode"),
                                         ("zero.png", "zero-byte"), ("text_as.png", "cannot decode")])
def test_broken_image_raises_bad_image_error_naming_file(tmp_path, name, reason):
    path = make_bad_files(tmp_path)[name]
    with pytest.raises(BadImageError, match=reason) as exc:
        load_image(str(path))
    assert str(path) in str(exc.value)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 Mpx, a few kB on disk
    with pytest.raises(BadImageError, match="decompression bomb") as exc:
        load_image(str(path))
    assert str(path) in str(exc.value)


def test_16bit_png_cmyk_jpeg_and_alpha_load_converted(tmp_path):
    arr16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.asarray(load_image(str(tmp_path / "deep.png"), "L")).tolist() == [[0, 128, 255]]

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    rgb = np.asarray(load_image(str(tmp_path / "cmyk.jpg"), "RGB")).astype(int)
    assert rgb.shape == (8, 8, 3) and rgb[..., 0].min() > 200 and rgb[..., 1:].max() < 60

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white
    rgba[1, 1] = (255, 255, 255, 0)  # fully transparent white -> black background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    gray = np.asarray(load_image(str(tmp_path / "alpha.png"), "L"))
    assert gray[0, 0] == 255 and gray[1, 1] == 0


def _bad_folder(tmp_path: Path) -> tuple[Path, int]:
    root = make_folder_dataset(tmp_path / "faces", classes=("happy", "sad"), per_class=8, size=32)
    bad = make_bad_files(root / "happy")
    (root / "sad" / "notes.txt").write_text("not an image")  # non-image file: skipped by the adapter
    # odd-but-valid files next to them must load, not be skipped
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / "sad" / "deep.png")
    Image.new("CMYK", (32, 32), (0, 0, 0, 100)).save(root / "happy" / "cmyk.jpg")
    Image.new("RGBA", (32, 32), (200, 200, 200, 128)).save(root / "happy" / "alpha.png")
    return root, len(bad) + 1


def test_skip_policy_counts_every_bad_file_and_loads_the_rest(tmp_path, tiny):
    from datamodules.datamodule import FERDataModule

    root, num_bad = _bad_folder(tmp_path)
    cfg = compose("supervised/embedded", tiny(f"data.train.root={root}", "data.train.format=folder",
                                              "data.val=null", "data.test=null", "data.on_bad_image=skip"))
    dm = FERDataModule(cfg, run_dir=str(tmp_path / "run"))
    dm.setup("fit")
    train = dm.datasets["train"]
    for i in range(len(train)):  # runtime decode failures (truncated JPEG) are skipped as they are met
        sample = train[i]
        assert torch.isfinite(sample["image"]).all()
    assert dm.num_skipped == num_bad, (dm.bad.skipped, train.bad.skipped)
    listed = (tmp_path / "run" / "bad_images.txt").read_text()
    assert "zero.png" in listed and "text_as.png" in listed and "notes.txt" in listed
    names = {Path(r.image).name for r in train.records}
    assert {"deep.png", "cmyk.jpg", "alpha.png"} <= names


def test_error_policy_fails_naming_the_file(tmp_path, tiny, capsys):
    root, _ = _bad_folder(tmp_path)
    code, err = run_cli(capsys, "fit", *tiny(*FAST, f"data.train.root={root}", "data.train.format=folder",
                                             "data.on_bad_image=error"))
    line = one_error_line(err)
    assert code == 2 and "data.on_bad_image=skip" in line and str(root) in line


# -- labels and datasets -------------------------------------------------------------------------------------

def test_unknown_class_folder(tmp_path, tiny, capsys):
    root = make_folder_dataset(tmp_path / "faces", classes=("happy", "bored"), per_class=2, size=32)
    code, err = run_cli(capsys, "fit", *tiny(*FAST, f"data.train.root={root}", "data.train.format=folder"))
    assert code == 2 and "bored" in one_error_line(err)


def test_label_code_out_of_range_in_csv(tmp_path, tiny, capsys):
    root = make_affectnet(tmp_path / "an", n_train=3, codes=[1, 2, 11], size=32)
    code, err = run_cli(capsys, "fit", *tiny(*FAST, f"data.train.root={root}", "data.train.format=affectnet"))
    line = one_error_line(err)
    assert code == 2 and "training.csv" in line and "11" in line


def test_empty_dataset_after_filtering(tmp_path, tiny, capsys):
    root = make_folder_dataset(tmp_path / "faces", classes=("contempt",), per_class=3, size=32)
    with pytest.warns(UserWarning, match="contempt"):
        code, err = run_cli(capsys, "fit", *tiny(*FAST, "data.num_classes=7", f"data.train.root={root}",
                                                 "data.train.format=folder"))
    assert code == 2 and "data.train.root" in one_error_line(err)


@pytest.mark.parametrize("aus,key", [("NaN", "aus[0]"), ("Infinity", "aus[0]"), ("1.5", "aus[0]"),
                                     ("-0.1", "aus[0]"), (None, "aus")])
def test_bad_au_values_in_manifest(tmp_path, tiny, capsys, aus, key):
    root = make_synthetic_set(tmp_path / "syn", n=8, num_classes=8, size=32)
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[3])
    if aus is None:
        rec["aus"] = rec["aus"][:-1]  # wrong length
        lines[3] = json.dumps(rec)
    else:
        lines[3] = json.dumps({**rec, "aus": [0.0] + rec["aus"][1:]}).replace('"aus": [0.0', f'"aus": [{aus}')
    manifest.write_text("\n".join(lines) + "\n")
    code, err = run_cli(capsys, "fit", *tiny(*FAST, f"data.synthetic.root={root}", "data.synthetic.format=synthetic",
                                             "data.mix.synthetic_ratio=0.5"))
    line = one_error_line(err)
    assert code == 2 and f"{manifest}:4" in line and f"'{key}" in line
    assert main(["check-dataset", str(root)]) == 1


@pytest.mark.parametrize("bad", [[float("nan")] * 12, [float("inf")] * 12, [1.5] * 12, [-1.0] * 12, [0.5] * 11])
def test_bad_au_input_to_the_generator(tiny, bad):
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/tiny_test", tiny("generator.sample_every_n_steps=0"))
    gen = GeneratorModule(to_container(cfg), list(CANONICAL_8))
    aus = torch.tensor([bad + [0.0] * (len(gen.au_names) - 12)]) if len(bad) == 12 else torch.tensor([bad])
    with pytest.raises(ValueError, match="AU"):
        gen.encode_aus(aus)


# -- config -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,named", [("trainer.max_epoch=2", "trainer.max_epoch"),
                                            ("data.batch_size=eight", "data.batch_size"),
                                            ("data.mix.synthetic_ratio=-0.1", "synthetic_ratio"),
                                            ("data.mix.synthetic_ratio=1.5", "synthetic_ratio")])
def test_bad_config_values(tiny, capsys, override, named):
    code, err = run_cli(capsys, "fit", *tiny(override))
    assert code == 2 and named in one_error_line(err)


# -- checkpoints ------------------------------------------------------------------------------------------------

@pytest.fixture
def classifier_ckpt(tmp_path, tiny) -> Path:
    """A real (untrained) 8-class supervised checkpoint, saved the way fit saves it."""
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("supervised/embedded", tiny("model.backbone=test_resnet", "logger.log_confusion_matrix=false"))
    module = SupervisedFER(config=to_container(cfg), label_names=list(CANONICAL_8))
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "clf.ckpt")
    return tmp_path / "clf.ckpt"


def test_checkpoint_errors(tmp_path, tiny, capsys, classifier_ckpt):
    from lightning_synfer.checkpoints import CheckpointError, load_module
    from lightning_synfer.modules.generator import GeneratorModule

    code, err = run_cli(capsys, "evaluate", *tiny(f"ckpt={tmp_path / 'missing.ckpt'}"))
    assert code == 2 and "missing.ckpt" in one_error_line(err)
    # another task type
    with pytest.raises(CheckpointError, match="'supervised' checkpoint"):
        load_module(classifier_ckpt, tasks=("ssl",))
    with pytest.raises(CheckpointError, match="expected a generator"):
        GeneratorModule.load(classifier_ckpt)
    # another number of classes
    with pytest.raises(CheckpointError, match="8 classes"):
        load_module(classifier_ckpt, num_classes=7)
    # resume from a checkpoint that is not one of ours
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a lightning-synfer checkpoint"):
        load_module(tmp_path / "foreign.ckpt")


def test_generator_folder_without_its_unet(tmp_path, tiny):
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/tiny_test", tiny("data.image_size=16"))
    export = GeneratorModule(to_container(cfg), list(CANONICAL_8)).save_pretrained(tmp_path / "export")
    for f in (Path(export) / "unet").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="unet/diffusion_pytorch_model.safetensors") as exc:
        GeneratorModule.load(export)
    assert str(export) in str(exc.value)


# -- training ---------------------------------------------------------------------------------------------------

def test_non_finite_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, tiny, capsys, monkeypatch):
    import lightning as L

    from lightning_synfer.tasks import fit

    class PoisonBatch(L.Callback):
        """A batch of NaN pixels at the 4th step (global step 3 -> 4): the loss is NaN at a known step, after
        three good checkpoints, whatever the learning rate or the platform."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                batch["image"].fill_(float("nan"))

    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: real_build(*a, callbacks=[PoisonBatch()], **k))
    run = tmp_path / "run"
    code, err = run_cli(capsys, "fit", *tiny("model.backbone=test_resnet", "data.test=null", "optim.warmup_fraction=0",
                                             "trainer.checkpoint_every_n_steps=1", "logger.tensorboard=false",
                                             f"run_dir={run}"))
    line = one_error_line(err)
    assert code == 2 and "non-finite training loss (nan) at global step 4, epoch 0, batch 3" in line, line
    assert f"last good checkpoint is kept in {run / 'checkpoints'}" in line and "optim.lr" in line, line
    assert not (run / "metrics.json").exists()
    # The NaN step (its update made the weights NaN too) is never saved: last.ckpt is the step before, finite.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and all(torch.isfinite(v).all() for v in floats)


def test_run_dir_is_never_overwritten_without_overwrite_true(tmp_path, tiny, capsys):
    run = tmp_path / "r"
    args = tiny("trainer.fast_dev_run=true", "model.backbone=test_resnet", "data.test=null", f"run_dir={run}")
    assert main(["fit", *args]) == 0
    before = (run / "metrics.json").read_bytes()
    code, err = run_cli(capsys, "fit", *args)
    assert code == 2 and "overwrite=true" in one_error_line(err)
    assert (run / "metrics.json").read_bytes() == before
    assert main(["fit", *args, "overwrite=true"]) == 0


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(tmp_path, tiny, monkeypatch):
    import lightning as L

    from lightning_synfer.tasks import fit
    from lightning_synfer.trainer import NonFiniteLossError

    class PoisonGradsAtStep2(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:  # the update that becomes step 2
                next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))

    real_build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer", lambda *a, **k: real_build(*a, callbacks=[PoisonGradsAtStep2()], **k))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite weights .* at global step 2"):
        fit.run(compose("supervised/embedded", tiny("model.backbone=test_resnet", "data.test=null",
                                                    "trainer.checkpoint_every_n_steps=1", f"run_dir={run}")))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
