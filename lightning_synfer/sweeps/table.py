"""Result tables from run dirs: metrics.json + config.yaml of many runs -> Markdown, CSV and plots.

Rows are the distinct values of the config keys that vary between the runs (seed excluded: it is what
the mean and std run over), or of the keys given with `group_by`. Each metric cell is the mean ± sample
standard deviation (n - 1) over the row's runs; a row of one run shows the value alone.
Accuracy-like metrics (fractions in metrics.json) are shown in percent in Markdown; CSV keeps raw values.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from datamodules.atomic import atomic_path, atomic_write_text

# Config keys that never define a row: bookkeeping, paths, loader plumbing.
IGNORED_KEYS = ("seed", "run_dir", "resume", "overwrite", "notes", "ckpt")
IGNORED_PREFIXES = ("paths.", "logger.", "sweep.", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                    "trainer.checkpoint_every_n_steps", "data.num_workers", "data.persistent_workers",
                    "data.pin_memory", "data.eval_batch_size", "data.verify_images")
# metrics.json leaves that are results (the last dotted component), not bookkeeping.
METRIC_NAME = re.compile(r"(^|_)(acc|accuracy|macro_f1|f1|mean_class_recall|fid|kid|mae|rmse)$")
# per_domain: the real/synthetic split of test figures (metrics.json test.per_domain) repeats the overall
# columns whenever the test set is one domain, as it is in every table of the paper.
METRIC_EXCLUDE = ("per_class_recall", "confusion", "_std", "num_", "wall_time", "peak_", "per_domain")
# Preferred column order; the first one present is the plotted metric.
PRIMARY = ("test.accuracy", "accuracy", "linear.accuracy", "fer_accuracy", "best_val_acc", "val_knn_acc",
           "best_val_knn_acc", "val_linear_acc")
PLOT_AXES = ("data.mix.synthetic_ratio", "data.mix.synthetic_scale", "data.train.shots")
MISSING = "—"


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened dotted keys
    metrics: dict[str, float]  # flattened numeric result leaves


@dataclass
class Row:
    key: tuple  # group values, in group_keys order
    runs: list[Run]
    stats: dict[str, tuple[float, Optional[float], int]]  # metric -> (mean, std or None for n = 1, n)

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed") for r in self.runs]


@dataclass
class Tables:
    runs: list[Run]
    group_keys: list[str]
    metrics: list[str]
    rows: list[Row]
    markdown: str
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- gathering

def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            full = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                out.update(flatten(value, f"{full}."))
            else:
                out[full] = value
    return out


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run dir (has metrics.json) or a folder searched recursively for run dirs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"table: {path} does not exist; expected a run dir or a folder of run dirs")
        if (path / "metrics.json").is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(p.parent for p in path.rglob("metrics.json"))
            if not hits:
                raise FileNotFoundError(f"table: no metrics.json under {path}; expected finished run dirs")
            found.extend(hits)
        else:
            raise FileNotFoundError(f"table: {path} is neither a run dir nor a folder")
    unique, seen = [], set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _is_metric(key: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if any(part in key for part in METRIC_EXCLUDE):
        return False
    return bool(METRIC_NAME.search(key.split(".")[-1]))


def load_run(path: Path) -> Run:
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"table: cannot read {path / 'metrics.json'} ({exc})") from exc
    config: dict[str, Any] = {}
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            config = flatten(yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError as exc:
            raise ValueError(f"table: cannot parse {cfg_path} ({exc})") from exc
    flat = flatten(metrics)
    return Run(path=path, config=config, metrics={k: float(v) for k, v in flat.items() if _is_metric(k, v)})


# ----------------------------------------------------------------------------------------- grouping

def _token(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or any(key == p.rstrip(".") or key.startswith(p) for p in IGNORED_PREFIXES)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.config if k not in keys)
    return [k for k in keys if not _ignored(k) and len({_token(r.config.get(k)) for r in runs}) > 1]


def order_metrics(names: Iterable[str]) -> list[str]:
    """The PRIMARY metrics present, each followed by its macro-F1 sibling, then the rest by name."""
    names = set(names)
    ranked: list[str] = []
    for m in PRIMARY:
        if m in names and m not in ranked:
            ranked.append(m)
            f1 = m.rsplit(".", 1)[0] + ".macro_f1" if "." in m else "macro_f1"
            if f1 in names and f1 not in ranked:
                ranked.append(f1)
    return ranked + sorted(names - set(ranked))


def _sort_key(values: tuple) -> tuple:
    # Numbers before strings, numbers by value: 0.25 before 1.0 before "abc".
    return tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, _token(v))
                 for v in values)


def group(runs: Sequence[Run], group_keys: Sequence[str], metrics: Sequence[str]) -> list[Row]:
    buckets: dict[str, list[Run]] = {}
    values: dict[str, tuple] = {}
    for run in runs:
        key = tuple(run.config.get(k) for k in group_keys)
        token = _token(key)
        buckets.setdefault(token, []).append(run)
        values[token] = key
    rows = []
    for token, members in buckets.items():
        members.sort(key=lambda r: (_sort_key((r.config.get("seed"),)), str(r.path)))
        stats = {}
        for m in metrics:
            xs = [r.metrics[m] for r in members if m in r.metrics]
            if xs:
                stats[m] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))
        rows.append(Row(key=values[token], runs=members, stats=stats))
    rows.sort(key=lambda r: _sort_key(r.key))
    return rows


# ----------------------------------------------------------------------------------------- output

def _percent(metric: str) -> bool:
    return bool(re.search(r"(acc|accuracy|f1|recall)$", metric.split(".")[-1]))


def format_cell(metric: str, stat: Optional[tuple]) -> str:
    if stat is None:
        return MISSING
    mean, std, _ = stat
    if _percent(metric):
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def _show(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def markdown_table(rows: Sequence[Row], group_keys: Sequence[str], metrics: Sequence[str]) -> str:
    header = [*group_keys, "runs", "seeds"] + [f"{m} (%)" if _percent(m) else m for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = ",".join(_show(s) for s in row.seeds)
        cells = [*(_show(v) for v in row.key), str(len(row.runs)), seeds,
                 *(format_cell(m, row.stats.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], group_keys: Sequence[str], metrics: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*group_keys, "runs", "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n"))])
    for row in rows:
        cells: list[Any] = [*(_show(v) for v in row.key), len(row.runs), " ".join(_show(s) for s in row.seeds)]
        for m in metrics:
            mean, std, n = row.stats.get(m, (None, None, 0))
            cells += [repr(mean) if mean is not None else "", repr(std) if std is not None else "", n]
        writer.writerow(cells)
    return buf.getvalue()


def runs_csv(runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_dir", *keys, "seed", *metrics])
    for run in sorted(runs, key=lambda r: str(r.path)):
        writer.writerow([str(run.path), *(_show(run.config.get(k)) for k in keys), _show(run.config.get("seed")),
                         *(repr(run.metrics[m]) if m in run.metrics else "" for m in metrics)])
    return buf.getvalue()


def plot_against(rows: Sequence[Row], group_keys: Sequence[str], axis: str, metric: str, path: Path) -> Path:
    """`metric` (mean ± std) against `axis`, one line per combination of the other group keys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    i = list(group_keys).index(axis)
    others = [k for k in group_keys if k != axis]
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        stat = row.stats.get(metric)
        x = row.key[i]
        if stat is None or not isinstance(x, (int, float)):
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_show(v)}" for k, v in zip(group_keys, row.key) if k != axis)
        scale = 100.0 if _percent(metric) else 1.0
        lines.setdefault(label, []).append((float(x), scale * stat[0], scale * (stat[1] or 0.0)))
    fig = Figure(figsize=(5.5, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in sorted(lines.items()):
        pts.sort()
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label or None)
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{metric} (%)" if _percent(metric) else metric)
    ax.grid(alpha=0.3)
    if others and len(lines) > 1:
        ax.legend(fontsize=7)
    ax.set_title(f"{metric} vs {axis.split('.')[-1]} (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def build_tables(paths: Iterable[str | Path], *, out: Optional[str | Path] = None,
                 group_by: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
                 plots: bool = True) -> Tables:
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        raise FileNotFoundError("table: no run dirs given")
    all_keys = sorted({k for r in runs for k in r.config})
    if group_by:
        for key in group_by:
            if key not in all_keys:
                close = difflib.get_close_matches(key, all_keys, n=3)
                raise ValueError(f"table --group-by {key}: no run's config.yaml has this key"
                                 + (f"; did you mean {', '.join(close)}?" if close else "; expected a dotted key "
                                    "like data.mix.synthetic_ratio"))
        group_keys = list(group_by)
    else:
        group_keys = varying_keys(runs)
    available = {m for r in runs for m in r.metrics}
    if metrics:
        missing = [m for m in metrics if m not in available]
        if missing:
            raise ValueError(f"table --metrics {' '.join(missing)}: not in any metrics.json; "
                             f"available: {', '.join(order_metrics(available)) or 'none'}")
        metric_names = list(metrics)
    else:
        metric_names = order_metrics(available)
    rows = group(runs, group_keys, metric_names)
    text = markdown_table(rows, group_keys, metric_names)
    tables = Tables(runs=runs, group_keys=group_keys, metrics=metric_names, rows=rows, markdown=text)
    if out is None:
        return tables
    out = Path(out)
    tables.files["markdown"] = atomic_write_text(out / "table.md", text)
    tables.files["csv"] = atomic_write_text(out / "table.csv", csv_table(rows, group_keys, metric_names))
    tables.files["runs"] = atomic_write_text(out / "runs.csv", runs_csv(runs, group_keys, metric_names))
    if plots and metric_names:
        primary = metric_names[0]
        for axis in PLOT_AXES:
            if axis in group_keys and len({r.key[group_keys.index(axis)] for r in rows}) > 1:
                name = f"{primary.split('.')[-1]}_vs_{axis.split('.')[-1]}.png"
                tables.files[f"plot:{axis}"] = plot_against(rows, group_keys, axis, primary, out / name)
    return tables
