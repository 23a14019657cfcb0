"""`au-sweep`: one face, one AU raised per row, on the real (tiny) GeneratorModule; the error for an AU the
generator does not take."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from datamodules.labels import CANONICAL_8
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.tasks import TASKS, au_sweep, load


@pytest.fixture(scope="module")
def gen_export(tmp_path_factory):
    """A randomly initialised tiny generator with its FAU adapter (the real module), exported like `fit` does."""
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/tiny_test", ["data.image_size=16"])
    torch.manual_seed(0)
    gen = GeneratorModule(config=to_container(cfg), label_names=list(CANONICAL_8))
    return gen.save_pretrained(tmp_path_factory.mktemp("gen") / "export")


def _overrides(tmp_path, export, *extra):
    return ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.precision=32-true",
            f"paths.runs_dir={tmp_path / 'runs'}", f"run_dir={tmp_path / 'run'}", f"synthesis.generator={export}",
            "sampling.steps=2", "sampling.text_scale=4.0", "sampling.au_scale_cfg=4.0", "au_sweep.cell_size=32", *extra]


def test_au_sweep_rows_change_the_face_and_zero_is_the_no_au_image(tmp_path, gen_export):
    assert load("au-sweep") is au_sweep.run and TASKS["au-sweep"][1] == "generator/au_sweep"
    # AU04 / au_12: any spelling of the generator's AUs; values 0 .. 1 across the row
    cfg = compose("generator/au_sweep", _overrides(tmp_path, gen_export, "au_sweep.aus=[au_12,AU04]",
                                                   "au_sweep.values=[0,0.5,1]"))
    metrics = au_sweep.run(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["aus"] == metrics["aus"]
    assert list(metrics["aus"]) == ["AU12", "AU4"]
    for name, row in metrics["aus"].items():
        assert row["values"] == [0.0, 0.5, 1.0] and metrics["au_names"][row["index"]] == name
        change = row["mean_abs_change"]
        assert change[0] <= 1 / 255  # the row's value 0 is the all-zero AU vector's image
        assert change[2] > 0.001, (name, change)  # raising the AU changes the face
    # with every AU at 0, the image is the one sampled with no AU condition at all
    assert metrics["zero_vs_no_au"]["max_abs_diff"] <= 1 / 255
    with Image.open(tmp_path / "run" / "au_sweep.png") as img:  # label margin + 3 columns, header + 2 rows
        assert img.size == (150 + 3 * (32 + 4), 18 + 2 * (32 + 4))


def test_au_sweep_names_the_unknown_au_and_the_generators_list(tmp_path, gen_export):
    cfg = compose("generator/au_sweep", _overrides(tmp_path, gen_export, "au_sweep.aus=[AU12,AU27]"))
    with pytest.raises(ConfigError, match=r"'AU27' \(AU27\) is not an AU of the generator .*\['AU1', 'AU2', 'AU4'"):
        au_sweep.run(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()  # refused before anything ran


def test_au_sweep_values_are_checked_when_composed():
    with pytest.raises(ConfigError, match="au_sweep.values"):
        compose("generator/au_sweep", ["au_sweep.values=[0,1.5]"])
    with pytest.raises(ConfigError, match="au_sweep.aus"):
        compose("generator/au_sweep", ["au_sweep.aus=[]"])
