"""Paper-shaped Markdown tables and plots from a finished pipeline's stage records (metrics.json only).

Tables by stage task: downstream classifiers (fit of a supervised family), generation quality
(evaluate-generation), label rectification (label), SSL linear probes (linear / knn).
Plots: accuracy against synthetic ratio, a sample grid per class of the synthetic set, confusion matrices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from datamodules.atomic import atomic_path, atomic_write_text
from datamodules.synthetic import newest_version


def _cfg(record: dict[str, Any]) -> dict[str, Any]:
    path = Path(record["run_dir"]) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _labels_used(root: Optional[str], version: Optional[int]) -> str:
    """Which synthetic labels a stage trained on: manifest v1 holds the intended labels, later versions the
    rectified ones. version=None read the newest manifest, which is the newest one now (the report runs last)."""
    if not root:
        return "–"
    version = version if version is not None else newest_version(root)
    return f"intended (v{version})" if version == 1 else f"rectified (v{version})"


def downstream_rows(stages: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for rec in stages.values():
        m = rec.get("metrics") or {}
        if rec["task"] != "fit" or m.get("family") not in ("supervised",) or "test" not in m:
            continue
        cfg = _cfg(rec)
        ratio = _get(cfg, "data.mix.synthetic_ratio", 0.0)
        rows.append({"stage": rec["stage"], "ratio": ratio, "acc": m["test"]["accuracy"],
                     "macro_f1": m["test"]["macro_f1"], "confusion": m["test"]["confusion_matrix"],
                     "labels": m["test"]["label_names"], "synthetic": _get(cfg, "data.synthetic.root"),
                     "synthetic_labels": _labels_used(_get(cfg, "data.synthetic.root") if ratio > 0 else None,
                                                      _get(cfg, "data.synthetic.version"))})
    return rows


def build_report(stages: dict[str, dict], out_dir: Path, titles: dict[str, str], tables: Sequence[Any] = (),
                 heading: str = "SynFER pipeline report (embedded miniature)") -> str:
    out_dir.mkdir(parents=True, exist_ok=True)

    def title(record: dict) -> str:
        return titles.get(record["stage"], record["stage"])

    lines = [f"# {heading}", ""]
    for table in tables:
        lines += paper_table(table, stages)
    rows = downstream_rows(stages)
    if rows:
        lines += _table("Supervised FER: real, synthetic and mixed training data",
                        ("stage", "training data", "synthetic ratio", "synthetic labels", "accuracy", "macro-F1"),
                        [(title(r), _training_data(r["ratio"]), f"{r['ratio']:.2f}",
                          r["synthetic_labels"], _pct(r["acc"]), _pct(r["macro_f1"])) for r in rows],
                        intro="Test split of the embedded real faces (unseen identities).")
        _plot_ratio(rows, out_dir / "accuracy_vs_ratio.png")
        _plot_confusions(rows, out_dir / "confusion_matrices.png", titles)
        lines += ["![accuracy vs ratio](accuracy_vs_ratio.png)", "", "![confusion](confusion_matrices.png)", ""]
    lines += _table("Generation quality", ("stage", "FER accuracy", "AU MAE", "AU acc@0.5", "FID", "KID"),
                    [(title(r), _pct(_get(m, "fer_accuracy")), _fmt(_get(m, "au.mae")), _pct(_get(m, "au.accuracy")),
                      _fmt(_get(m, "fid")), _fmt(_get(m, "kid"))) for r, m in _stages_of(stages, "evaluate-generation")])
    lines += _table("Pseudo-label rectification", ("stage", "records", "agreement", "changed", "dropped"),
                    [(title(r), _get(m, "num_records", "–"), _pct(_get(m, "agreement_rate")),
                      _get(m, "num_changed", "–"), _get(m, "num_dropped", "–")) for r, m in _stages_of(stages, "label")])
    lines += _table("Self-supervised pre-training → probe on real data", ("stage", "probe", "accuracy", "macro-F1"),
                    [(title(r), r["task"], _pct(_get(m, "accuracy")), _pct(_get(m, "macro_f1")))
                     for r, m in _stages_of(stages, "linear", "knn")])
    synth_dirs = [r["artifacts"]["dir"] for r in stages.values() if "dir" in r.get("artifacts", {})]
    if synth_dirs:
        grid = out_dir / "synthetic_samples.png"
        if _sample_grid(Path(synth_dirs[-1]), grid):
            lines += ["## Synthetic samples (one row per class)", "", "![samples](synthetic_samples.png)", ""]
    lines += _table("Stages", ("#", "stage", "task", "wall time (s)", "run dir"),
                    [(i, title(r), r["task"], f"{r['wall_time_s']:.0f}", f"`{r['run_dir']}`")
                     for i, r in enumerate(stages.values(), 1)])
    text = "\n".join(lines)
    atomic_write_text(out_dir / "report.md", text)
    return text


def paper_table(table: Any, stages: dict[str, dict]) -> list[str]:
    """One `pipeline.tables` entry: every cell `ours (paper)`, ours from the named stage's metrics.json."""
    def cell(c: Any) -> str:
        value = _get(stages[c.stage].get("metrics") or {}, c.metric)
        ours = "–" if not isinstance(value, (int, float)) else _pct(value) if c.percent else _fmt(value)
        paper = "–" if c.paper is None else f"{c.paper:.2f}"
        return f"{ours} ({paper})"

    rows = [(row.name, *[cell(c) for c in row.cells]) for row in table.rows]
    intro = "Each cell: ours (the paper's)." + (f" {table.note}" if table.note else "")
    return _table(table.title, ("row", *table.columns), rows, intro=intro)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], intro: str = "") -> list[str]:
    """A Markdown section with one table (nothing when there are no rows), ending with an empty line."""
    if not rows:
        return []
    lines = [f"## {title}", ""] + ([intro, ""] if intro else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def _stages_of(stages: dict[str, dict], *tasks: str) -> list[tuple[dict, dict]]:
    """(stage record, its metrics) of the stages that ran one of `tasks`, in stage order."""
    return [(r, r.get("metrics") or {}) for r in stages.values() if r["task"] in tasks]


def _training_data(ratio: float) -> str:
    return "real only" if ratio == 0 else "synthetic only" if ratio == 1 else "real + synthetic"


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_ratio(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One line over the rows that trained on the newest labels; rows on the intended (v1) labels as crosses,
    # so the effect of rectification reads off at the same ratio.
    intended = [r for r in rows if r["synthetic_labels"].startswith("intended")]
    pts = sorted((r["ratio"], r["acc"]) for r in rows if r not in intended)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label="real / newest synthetic labels")
    if intended:
        ax.plot([r["ratio"] for r in intended], [100 * r["acc"] for r in intended], "x", ms=8,
                label="intended synthetic labels")
        ax.legend(fontsize=7)
    ax.set_xlabel("synthetic ratio per batch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)


def _plot_confusions(rows: list[dict], path: Path, titles: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        cm = np.asarray(r["confusion"], dtype=float)
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(titles.get(r["stage"], r["stage"]), fontsize=8)
        ax.set_xticks(range(len(r["labels"])), [n[:3] for n in r["labels"]], fontsize=6, rotation=90)
        ax.set_yticks(range(len(r["labels"])), [n[:3] for n in r["labels"]], fontsize=6)
    fig.tight_layout()
    _savefig(fig, path)


def _sample_grid(root: Path, path: Path, per_class: int = 8) -> bool:
    from PIL import Image

    from datamodules.synthetic import read_manifest

    try:
        header, records = read_manifest(str(root))
    except (FileNotFoundError, ValueError):
        return False
    names = header["label_names"]
    by_class: dict[int, list[str]] = {}
    for rec in records:
        by_class.setdefault(rec["label"], []).append(rec["image"])
    if not by_class:
        return False
    size = int(header.get("image_size") or 32)
    grid = Image.new("L", (size * per_class, size * len(names)))
    for row, _ in enumerate(names):
        for col, rel in enumerate(by_class.get(row, [])[:per_class]):
            with Image.open(root / rel) as img:
                grid.paste(img.convert("L").resize((size, size)), (col * size, row * size))
    scale = max(1, 96 // size)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return True
