"""A generator started from an earlier export (generator.init_from), patch-space UNets, and the shipped base."""
import json

import pytest
import torch

from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.modules.generator import GeneratorModule
from lightning_synfer.pretrained import check_provenance, resolve_export, shipped_bases

LABELS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
FAST = ["generator.sample_every_n_steps=0", "trainer.limit_val_batches=1"]


def _module(tiny, *extra):
    torch.manual_seed(0)
    return GeneratorModule(to_container(compose("generator/tiny_test", tiny(*FAST, *extra))), LABELS)


def _base_export(tiny, tmp_path, *extra):
    """A text-only base (no AU adapter, as SD has none), patching 2x2, with EMA weights unlike its raw ones."""
    base = _module(tiny, "generator.au_adapter=false", "generator.patch_size=2", *extra)
    with torch.no_grad():
        for p in base.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
        base.ema.step(base.trainable_parameters())  # the EMA shadow now differs from the raw weights
        for p in base.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return base, base.save_pretrained(tmp_path / "base")


def test_patch_space_is_lossless_and_shapes_follow(tiny):
    m = _module(tiny, "generator.patch_size=4")
    assert m.unet.config.in_channels == 16 and m.unet.config.sample_size == 8
    assert m.sample_shape(3) == (3, 16, 8, 8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = m.images_to_model_space(x)
    assert z.shape == (2, 16, 8, 8)
    assert torch.equal(m.model_space_to_images(z), x)
    images = m.sample(["a face looking happy"], steps=2, guidance=2.0)
    assert images.shape == (1, 1, 32, 32)


def test_patch_size_must_divide_the_image(tiny):
    from lightning_synfer.config.errors import ConfigError

    with pytest.raises(ConfigError, match="data.image_size"):
        compose("generator/tiny_test", tiny(*FAST, "generator.patch_size=3"))


def test_init_from_starts_from_the_base_ema_weights_and_trains_only_the_adapter(tiny, tmp_path):
    base, folder = _base_export(tiny, tmp_path)
    m = _module(tiny, f"generator.init_from={folder}", "generator.train_unet=false")
    assert m.patch_size == 2 and m.unet.config.in_channels == 4
    with base.ema_weights():
        want_unet = {k: v.clone() for k, v in base.unet.state_dict().items()}
        want_proj = {k: v.clone() for k, v in base.text_proj.state_dict().items()}
    got = {k: v for k, v in m.unet.state_dict().items() if ".processor." not in k}
    assert got.keys() == want_unet.keys()
    assert all(torch.equal(got[k], want_unet[k]) for k in got)
    assert all(torch.equal(m.text_proj.state_dict()[k], v) for k, v in want_proj.items())
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert "au_adapter" in trainable and trainable <= {"au_adapter", "text_proj", "unet"}
    # the UNet's own weights stay frozen; the AU processors installed in it train (to_v_au starts at zero with
    # au_value_init=zero: frozen, the AU branch would stay a no-op forever)
    assert all(not p.requires_grad for n, p in m.unet.named_parameters() if "_au" not in n)
    assert all(p.requires_grad for p in m.au_adapter.processors.parameters())
    assert {id(p) for p in m.au_adapter.processors.parameters()} <= {id(p) for p in m.trainable_parameters()}
    # The export of the fine-tune is self-contained: it reloads with the base's architecture and patching.
    m.au_adapter.mlp[0].weight.data.add_(1.0)
    again = GeneratorModule.load(m.save_pretrained(tmp_path / "fine"))
    assert again.patch_size == 2
    assert torch.equal(again.au_adapter.mlp[0].weight, m.au_adapter.mlp[0].weight)


def test_init_from_loads_a_matching_adapter_and_refuses_other_image_sizes(tiny, tmp_path):
    src = _module(tiny)
    src.au_adapter.mlp[0].weight.data.add_(0.5)
    src.ema = None  # raw weights only: the adapter loads from au_adapter.safetensors
    folder = src.save_pretrained(tmp_path / "with_adapter")
    m = _module(tiny, f"generator.init_from={folder}", "generator.ema=false")
    assert torch.equal(m.au_adapter.mlp[0].weight, src.au_adapter.mlp[0].weight)
    with pytest.raises(ValueError, match="data.image_size=16"):
        _module(tiny, f"generator.init_from={folder}", "data.image_size=16")


def test_init_from_names_what_it_expected(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shipped base of that name"):
        resolve_export("no_such_base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="generator_config.json"):
        resolve_export(tmp_path / "empty")


def test_labeler_reads_a_patching_generator(tiny, tmp_path):
    from lightning_synfer.modules.labeler import _from_generator

    _, folder = _base_export(tiny, tmp_path)
    src = _from_generator(folder, 50, "a face")
    assert src["patch_size"] == 2 and src["unet"].config.in_channels == 4


@pytest.mark.parametrize("name", shipped_bases())
def test_shipped_base_matches_its_provenance_and_loads(name):
    folder = resolve_export(name)
    prov = check_provenance(folder)
    for key in ("command", "commit", "data", "steps", "final_loss", "files"):
        assert key in prov, f"{folder}/PROVENANCE.json lacks '{key}'"
    assert sum((folder / f).stat().st_size for f in prov["files"]) <= 10 * 2 ** 20
    meta = json.loads((folder / "generator_config.json").read_text())
    gen = GeneratorModule.load(folder)
    assert gen.patch_size == meta["patch_size"] and gen.label_names == meta["label_names"]


def test_publish_writes_a_base_that_loads_and_vouches_for_its_files(tiny, tmp_path):
    import os

    from lightning_synfer.tasks import fit

    cfg = compose("generator/tiny_test", tiny(*FAST, "generator.au_adapter=false", "generator.publish_as=mini",
                                             f"generator.publish_dir={tmp_path / 'shipped'}", "trainer.max_steps=2"))
    metrics = fit.run(cfg)
    folder = tmp_path / "shipped" / "mini"
    assert metrics["published"]["dir"] == str(folder)
    prov = check_provenance(folder)
    assert prov["steps"] == 2 and prov["command"].startswith("python run.py") and prov["data"]["train"]["split"] == "train"
    assert not (folder / "unet_ema").exists()  # the EMA weights are the only ones shipped
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~umask) for p in folder.rglob("*") if p.is_file())
    assert [p.name for p in (tmp_path / "shipped").iterdir()] == ["mini"]  # no temporary folder left behind
    GeneratorModule.load(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="do not match their recorded sha256"):
        check_provenance(folder)
