"""`run.py table` on hand-written run dirs: grouping by the varying keys, mean ± std over seeds (exact
values), CSV, plots against the synthetic ratio, explicit --group-by, errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from lightning_synfer.cli import main
from lightning_synfer.sweeps.table import build_tables

# ratio -> per-seed (test accuracy, test macro-F1); chosen so means and sample stds are exact in binary
RESULTS = {0.0: [(0.5, 0.25), (0.75, 0.5), (1.0, 0.75)],
           0.5: [(0.625, 0.5), (0.625, 0.5), (0.625, 0.5)],
           1.0: [(0.25, 0.125)]}


def _run(root: Path, name: str, config: dict, metrics: dict) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _fixture_runs(root: Path) -> None:
    for ratio, seeds in RESULTS.items():
        for seed, (acc, f1) in enumerate(seeds):
            config = {"seed": seed, "experiment": "sweeps/embedded_ratio", "run_dir": f"x/{ratio}-{seed}",
                      "paths": {"runs_dir": f"/tmp/{seed}"}, "data": {"mix": {"synthetic_ratio": ratio,
                                                                              "synthetic_scale": 1.0},
                                                                      "num_workers": seed},
                      "optim": {"lr": 0.002}}
            metrics = {"task": "fit", "seed": seed, "global_step": 10 + seed, "train_wall_time_s": 3.0 + seed,
                       "best_val_acc": acc, "test": {"accuracy": acc, "macro_f1": f1, "num_images": 32,
                                                     "per_class_recall": {"happy": 1.0},
                                                     "confusion_matrix": [[1, 0], [0, 1]],
                                                     # as fit writes it: a one-domain test set repeats the totals
                                                     "per_domain": {"real": {"accuracy": acc, "macro_f1": f1}}}}
            _run(root / "sweep", f"r{ratio}-s{seed}", config, metrics)


def test_table_mean_std_over_seeds(tmp_path):
    _fixture_runs(tmp_path)
    out = tmp_path / "out"
    tables = build_tables([tmp_path / "sweep"], out=out)
    # only the ratio varies once seed, paths, run_dir and loader settings are set aside
    assert tables.group_keys == ["data.mix.synthetic_ratio"]
    assert tables.metrics == ["test.accuracy", "test.macro_f1", "best_val_acc"]
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == ("| data.mix.synthetic_ratio | runs | seeds | test.accuracy (%) | test.macro_f1 (%) "
                     "| best_val_acc (%) |")
    assert md[2] == "| 0.0 | 3 | 0,1,2 | 75.00 ± 25.00 | 50.00 ± 25.00 | 75.00 ± 25.00 |"
    assert md[3] == "| 0.5 | 3 | 0,1,2 | 62.50 ± 0.00 | 50.00 ± 0.00 | 62.50 ± 0.00 |"
    assert md[4] == "| 1.0 | 1 | 0 | 25.00 | 12.50 | 25.00 |"  # one run: no std
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["data.mix.synthetic_ratio"] for r in rows] == ["0.0", "0.5", "1.0"]
    assert float(rows[0]["test.accuracy_mean"]) == 0.75 and float(rows[0]["test.accuracy_std"]) == 0.25
    assert rows[0]["test.accuracy_n"] == "3" and rows[2]["test.accuracy_std"] == ""
    assert float(rows[1]["test.macro_f1_mean"]) == 0.5 and float(rows[1]["test.macro_f1_std"]) == 0.0
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 7
    png = out / "accuracy_vs_synthetic_ratio.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "accuracy_vs_synthetic_scale.png").exists()  # the scale did not vary
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_table_cli_group_by_and_errors(tmp_path, capsys):
    _fixture_runs(tmp_path)
    # one more experiment with another lr; the linear probe format (accuracy at the top level)
    for seed, acc in enumerate((0.5, 0.25)):
        _run(tmp_path / "probe", f"s{seed}", {"seed": seed, "optim": {"lr": 0.1},
                                              "data": {"mix": {"synthetic_ratio": 0.0}}},
             {"task": "linear", "accuracy": acc, "macro_f1": acc})
    single = tmp_path / "sweep" / "r0.5-s0"
    assert main(["table", str(tmp_path / "sweep"), str(tmp_path / "probe"), str(single), "--out",
                 str(tmp_path / "o"), "--group-by", "optim.lr", "--metrics", "test.accuracy", "accuracy"]) == 0
    text = (tmp_path / "o" / "table.md").read_text().splitlines()
    assert text[0] == "| optim.lr | runs | seeds | test.accuracy (%) | accuracy (%) |"
    assert text[2] == "| 0.002 | 7 | 0,0,0,1,1,2,2 | 62.50 ± 22.82 | — |"  # r0.5-s0 counted once
    assert text[3] == "| 0.1 | 2 | 0,1 | — | 37.50 ± 17.68 |"
    assert "9 runs in 2 rows; grouped by optim.lr" in capsys.readouterr().out
    assert not list((tmp_path / "o").glob("*.png"))  # the ratio is not a row key here

    assert main(["table", str(tmp_path / "sweep"), "--group-by", "data.mix.synthetic_rato"]) == 2
    assert "did you mean data.mix.synthetic_ratio" in capsys.readouterr().err
    assert main(["table", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(ValueError, match="--metrics fid: not in any metrics.json; available: test.accuracy"):
        build_tables([tmp_path / "sweep"], metrics=["fid"])


# synthetic-only accuracy at 1x, 3x and 5x the real set (the paper's scale table); per-seed test accuracy
SCALES = {1.0: (0.5, 0.75), 3.0: (0.625, 0.875), 5.0: (0.75, 1.0)}


def test_table_and_plot_against_scale(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    for scale, accs in SCALES.items():
        for seed, acc in enumerate(accs):
            config = {"seed": seed, "experiment": "paper/synthetic_only/affectnet_resnet50",
                      "data": {"mix": {"synthetic_ratio": 1.0, "synthetic_scale": scale}}}
            _run(tmp_path / "sweep", f"scale{scale}-s{seed}", config,
                 {"task": "fit", "seed": seed, "test": {"accuracy": acc, "macro_f1": acc / 2}})
    plotted = []
    errorbar = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda ax, x, y, yerr=None, **kw: (
        plotted.append((list(x), list(y), list(yerr))), errorbar(ax, x, y, yerr=yerr, **kw))[1])

    out = tmp_path / "out"
    assert main(["table", str(tmp_path / "sweep"), "--out", str(out)]) == 0
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "| data.mix.synthetic_scale | runs | seeds | test.accuracy (%) | test.macro_f1 (%) |"
    assert md[2:] == ["| 1.0 | 2 | 0,1 | 62.50 ± 17.68 | 31.25 ± 8.84 |",
                      "| 3.0 | 2 | 0,1 | 75.00 ± 17.68 | 37.50 ± 8.84 |",
                      "| 5.0 | 2 | 0,1 | 87.50 ± 17.68 | 43.75 ± 8.84 |"]
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["data.mix.synthetic_scale"] for r in rows] == ["1.0", "3.0", "5.0"]
    assert [float(r["test.accuracy_mean"]) for r in rows] == [0.625, 0.75, 0.875]
    png = out / "accuracy_vs_synthetic_scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not (out / "accuracy_vs_synthetic_ratio.png").exists()  # the ratio did not vary
    # one line: accuracy (%) against the scale, error bars the std over seeds
    assert len(plotted) == 1
    xs, ys, es = plotted[0]
    assert xs == [1.0, 3.0, 5.0] and ys == pytest.approx([62.5, 75.0, 87.5])
    assert es == pytest.approx([100 * 0.125 * 2 ** 0.5] * 3)
