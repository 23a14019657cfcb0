"""The few-shot configs run (fast_dev_run) and the few-shot sweep gives a table and an accuracy-against-K plot, one
line per synthetic ratio, mean ± std over episodes (seeds)."""
from __future__ import annotations

import json

import pytest

from lightning_synfer.config import compose
from lightning_synfer.tasks import load, sweep

SMALL = ["data.train.num_images=96", "data.synthetic.num_images=32", "data.train.repeat=2"]


@pytest.mark.parametrize("name", ["fewshot/embedded", "fewshot/embedded_synthetic", "fewshot/embedded_synthetic_pretrain"])
def test_fast_dev_run_fewshot_configs(name, tiny):
    cfg = compose(name, [*tiny("trainer.fast_dev_run=true", *SMALL), "data.val=null"])
    assert cfg.data.val is None and cfg.data.train.shots == (0 if name.endswith("pretrain") else 5)
    metrics = load("fit")(cfg, ["fit", f"experiment={name}"])
    assert metrics["global_step"] == 1 and 0.0 <= metrics["test"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_fewshot_sweep_table_and_plot(tiny, tmp_path):
    """sweeps/fewshot_embedded, shrunk: K in {1, 2} x ratio {0, 0.5} x seeds {0, 1}, fast_dev_run=true points."""
    argv = ["experiment=sweeps/fewshot_embedded", *tiny("trainer.fast_dev_run=true", *SMALL),
            "sweep.grid.data.train.shots=[1,2]", "sweep.grid.seed=[0,1]", f"sweep.out={tmp_path / 'sweep'}"]
    summary = sweep.run(compose(None, argv), ["sweep", *argv], log=lambda msg: None)
    assert len(summary["done"]) == 8 and not summary["failed"]
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "data.train.shots" in table.splitlines()[0] and "data.mix.synthetic_ratio" in table.splitlines()[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 4 and all(" | 2 | 0,1 | " in r for r in rows)  # two episodes a row
    assert (tmp_path / "sweep" / "accuracy_vs_shots.png").stat().st_size > 0
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]
    got = {(p["values"]["data.train.shots"], p["values"]["data.mix.synthetic_ratio"], p["values"]["seed"])
           for p in points}
    assert got == {(k, r, s) for k in (1, 2) for r in (0.0, 0.5) for s in (0, 1)}
