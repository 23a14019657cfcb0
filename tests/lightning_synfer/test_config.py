import pytest

from lightning_synfer.config import ConfigError, compose, list_experiments
from lightning_synfer.runs import config_hash


def test_default_experiment_composes():
    cfg = compose()
    assert cfg.task == "supervised"
    assert cfg.data.train.format == "embedded"
    assert cfg.trainer.devices == 1


@pytest.mark.parametrize("name", list_experiments())
def test_every_experiment_composes_and_validates(name):
    from experiment_files import experiment_file_mismatches

    # composes, and keeps what the file sets: its own keys, its group choices, its parent experiments
    assert experiment_file_mismatches(name) == []


def test_group_and_dotlist_overrides():
    cfg = compose("supervised/embedded", ["trainer=cpu", "data.batch_size=32", "model=resnet50"])
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.data.batch_size == 32
    assert cfg.model.backbone == "resnet50"


def test_misspelt_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        compose("supervised/embedded", ["data.bach_size=32"])
    msg = str(err.value)
    assert "data.bach_size" in msg and "data.batch_size" in msg


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as err:
        compose("supervised/embedded", ["trainer.max_epochs=lots"])
    assert "trainer.max_epochs" in str(err.value) and "int" in str(err.value)


@pytest.mark.parametrize("ratio", ["-0.1", "1.5"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match="synthetic_ratio"):
        compose("supervised/embedded", [f"data.mix.synthetic_ratio={ratio}"])


def test_ratio_needs_synthetic_set():
    with pytest.raises(ConfigError, match="data.synthetic"):
        compose("supervised/embedded", ["data.mix.synthetic_ratio=0.5"])


def test_unknown_experiment_lists_close_names():
    import re

    with pytest.raises(ConfigError) as err:
        compose("supervised/embeded")
    closest = re.search(r"Closest: ([^.]*)\. Known experiments:", str(err.value))  # not the full list after it
    assert closest and closest.group(1).split(", ")[0] == "supervised/embedded", str(err.value)


def test_unknown_group_choice():
    with pytest.raises(ConfigError, match="Known trainer configs"):
        compose("supervised/embedded", ["trainer=tpu"])


def test_env_overrides_paths(monkeypatch):
    monkeypatch.setenv("SYNFER_RAFDB", "/elsewhere/raf")
    assert compose().paths.rafdb == "/elsewhere/raf"


def test_config_strings_are_not_evaluated(tmp_path, tiny, monkeypatch):
    from omegaconf import OmegaConf

    from lightning_synfer.cli import main

    monkeypatch.chdir(tmp_path)
    value = "__import__('pathlib').Path('PWNED').touch()"
    assert compose("supervised/embedded", [f"notes={value}"]).notes == value
    # a valid run, so that only an evaluated string could fail it; its config.yaml keeps the string as typed
    assert main(["fit", *tiny(f"notes={value}", "trainer.fast_dev_run=true", "model.backbone=test_resnet",
                              "data.test=null")]) == 0
    (config,) = (tmp_path / "runs").rglob("config.yaml")
    assert OmegaConf.load(config).notes == value
    assert not (tmp_path / "PWNED").exists()


def test_hash_ignores_volatile_keys():
    a = compose("supervised/embedded")
    b = compose("supervised/embedded", ["resume=auto", "notes=hello"])
    c = compose("supervised/embedded", ["seed=3"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_small_input_drops_the_resnet_maxpool_and_rejects_others():
    import torch

    from lightning_synfer.models.backbones import create_backbone

    plain = create_backbone("resnet18", in_chans=1).eval()
    small = create_backbone("resnet18", in_chans=1, small_input=True).eval()
    x = torch.zeros(1, 1, 32, 32)
    assert plain.forward_features(x).shape[-1] == 1 and small.forward_features(x).shape[-1] == 2
    with pytest.raises(ValueError, match="small_input"):
        create_backbone("vit_tiny_patch16_224", in_chans=1, small_input=True, img_size=32)
