import re
import shutil
from pathlib import Path

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


# -- renamed keys: the old name fails with the new one -------------------------------------------------------

@pytest.mark.parametrize("old, new", [
    ("gen.ckpt=X", "'gen.ckpt' was renamed to 'synthesis.generator'"),
    ("sg.ckpt=X", "'sg.ckpt' was renamed to 'guidance.classifier'"),
    ("sg.window=0.5", "'sg.window' was renamed to 'guidance.window'"),
    ("synth.num_images=3", "'synth.num_images' was renamed to 'synthesis.num_images'"),
    ("synth.dir=X", "'synth.dir' was renamed to 'generation_eval.dataset' or 'labeling.dataset'"),
    ("layout.root=X", "'layout.root' was renamed to 'synthesis.layout.root'"),
    ("judge.ckpt=X", "'judge.ckpt' was renamed to 'generation_eval.judge'"),
    ("judge.features=inception", "'judge.features' was renamed to 'generation_eval.features'"),
    ("real.root=X", "'real.root' was renamed to 'generation_eval.real.root'"),
    ("label.mode=none", "'label.mode' was renamed to 'labeling.mode'"),
    ("labelers=[a,b]", "'labelers' was renamed to 'labeling.ensemble'"),
    ("sg={enabled: true, ckpt: X}", "'sg.enabled' was renamed to 'guidance.enabled'"),  # a mapping value: its leaves
])
def test_renamed_key_on_the_command_line_names_the_new_key(old, new):
    with pytest.raises(ConfigError, match="^command line: config key " + re.escape(new) + "$"):
        compose("generator/synthesize_embedded", [old])


def test_cli_prints_the_new_key_of_a_renamed_one(capsys):
    from lightning_synfer.cli import main

    assert main(["synthesize", "gen.ckpt=X"]) == 2
    assert "error: command line: config key 'gen.ckpt' was renamed to 'synthesis.generator'" in capsys.readouterr().err


@pytest.fixture
def experiments_copy(tmp_path, monkeypatch):
    """A copy of experiments/ that a test may add files to (compose reads SYNFER_EXPERIMENTS_DIR)."""
    from lightning_synfer.config.compose import experiments_dir

    root = Path(shutil.copytree(experiments_dir(), tmp_path / "experiments"))
    monkeypatch.setenv("SYNFER_EXPERIMENTS_DIR", str(root))
    return root


def test_renamed_key_in_an_experiment_file_names_the_file_and_the_new_key(experiments_copy):
    old = experiments_copy / "generator" / "old_keys.yaml"
    old.write_text("defaults:\n  - generator/synthesize_sg\nsg: {ckpt: guide.ckpt}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{old}: config key 'sg.ckpt' was renamed to 'guidance.classifier'")):
        compose("generator/old_keys")
    # A parent experiment's old key is reported too, naming the parent's file.
    child = experiments_copy / "generator" / "child.yaml"
    child.write_text("defaults:\n  - generator/old_keys\nnotes: child\n")
    with pytest.raises(ConfigError, match=re.escape(f"{old}: config key 'sg.ckpt'")):
        compose("generator/child")
    old.write_text("defaults:\n  - generator/synthesize_sg\nguidance: {classifier: guide.ckpt}\n")
    assert compose("generator/child").guidance.classifier == "guide.ckpt"


def test_renamed_keys_point_from_outside_the_schema_into_it():
    """Every old key is gone from the schema (else it could not fail) and every new one is in it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    from lightning_synfer.config import Config
    from lightning_synfer.config.compose import RENAMED_KEYS

    schema = OmegaConf.structured(Config)

    def in_schema(key: str) -> bool:
        try:
            OmegaConf.merge(schema, OmegaConf.from_dotlist([f"{key}=null"]))
        except (ConfigKeyError, ConfigAttributeError):
            return False
        except ValidationError:  # a key that exists but takes no null
            pass
        return True

    for old, new in RENAMED_KEYS.items():
        assert not in_schema(old), old
        for key in (new,) if isinstance(new, str) else new:
            assert in_schema(key), (old, key)


# -- choices: Enum-typed fields, refused at merge time -------------------------------------------------------

def test_bad_choice_from_the_command_line_names_key_value_and_choices():
    with pytest.raises(ConfigError, match=r"^command line: config key 'optim.name' = 'adam': expected adamw, sgd or lars$"):
        compose("supervised/embedded", ["optim.name=adam"])
    with pytest.raises(ConfigError, match=r"config key 'generator.frozen_dtype' = 'int8': expected fp32, bf16 or fp16"):
        compose("generator/embedded", ["generator.frozen_dtype=int8"])


def test_bad_choice_in_an_experiment_file_names_the_file(experiments_copy):
    bad = experiments_copy / "supervised" / "bad_choice.yaml"
    bad.write_text("defaults:\n  - supervised/embedded\ndata:\n  augment: {preset: heavy}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: config key 'data.augment.preset' = 'heavy': "
                                                    f"expected fer, light or none")):
        compose("supervised/bad_choice")


def test_choices_compare_as_strings_and_reach_modules_as_plain_strings():
    from lightning_synfer.config import to_container

    cfg = compose("supervised/embedded", ["optim.name=sgd", "data.on_bad_image=error"])
    assert cfg.optim.name == "sgd" and cfg.data.on_bad_image == "error" and f"{cfg.optim.name}" == "sgd"
    assert {"sgd": 1}[cfg.optim.name] == 1
    plain = to_container(cfg)
    assert type(plain["optim"]["name"]) is str and plain["optim"]["name"] == "sgd"
    assert type(plain["data"]["on_bad_image"]) is str


def test_composed_config_pickles():
    # Lightning keeps `config` in a module's hparams only when it pickles; PathsConfig is built by make_dataclass.
    import pickle

    cfg = compose("supervised/embedded")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
