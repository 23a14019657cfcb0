"""Paper-shaped Markdown tables and plots from a finished pipeline's stage records (metrics.json only).

Tables by stage task: downstream classifiers (fit of a supervised family), generation quality
(evaluate-generation), label rectification (label), SSL linear probes (linear / knn).
Plots: accuracy against synthetic ratio, confusion matrices, real against generated faces per class (real from the
render stage's cache or the real train split, generated from the first synthetic set), a sample grid per class of
the synthetic set, the AU sweep of an `au-sweep` stage, and accuracy against synthetic set size when
synthetic-only stages read sets of several sizes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import re

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
                     "real_images": _get(cfg, "data.train.num_images") or 0,
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
    scaling = scaling_points(rows, stages)
    if len({p["set_size"] for p in scaling}) >= 2:
        lines += _table("Scaling: synthetic only, accuracy against synthetic set size",
                        ("stage", "set size", "synthetic labels", "accuracy", "seeds"),
                        [(title(stages[p["stage"]]), p["set_size"], p["synthetic_labels"], _mean_std(p["accs"]),
                          len(p["accs"])) for p in scaling],
                        intro="Synthetic-only rows (ratio 1.00), tested on the real test split; "
                              "mean ± std over the stage's seed copies.")
        _plot_scaling(scaling, _real_reference(rows), out_dir / "accuracy_vs_set_size.png")
        lines += ["![accuracy vs set size](accuracy_vs_set_size.png)", ""]
    lines += _real_vs_generated_section(stages, out_dir, title)
    lines += _au_sweep_section(stages, out_dir, title)
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


# -- real against generated faces -----------------------------------------------------------------------------

REAL_VS_GENERATED = "real_vs_generated.png"


def _by_class(names: Sequence[str], pairs: Any, per_class: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {n: [] for n in names}
    for label, item in pairs:
        if 0 <= int(label) < len(names) and len(out[names[int(label)]]) < per_class:
            out[names[int(label)]].append(item)
    return out


def real_faces(stages: dict[str, dict], per_class: int = 6) -> Optional[dict[str, list[Any]]]:
    """Real training faces per class name: the first render stage's train cache, else the real train split of the
    first fit stage (its config's data.train: an embedded cache file, or a dataset folder). Arrays HxW[xC] uint8 or
    image paths; None when no stage names real faces that are still there."""
    import numpy as np

    for rec in stages.values():
        m = rec.get("metrics") or {}
        cache = _get(m, "splits.train.cache")
        if rec["task"] == "render" and cache and Path(cache).is_file() and m.get("label_names"):
            with np.load(cache, allow_pickle=False) as data:
                labels = data["labels"]
                keep = _first_per_class(labels, len(m["label_names"]), per_class)
                images = data["images"][keep]
            return _by_class(m["label_names"], zip(labels[keep], images), per_class)
    for rec in stages.values():
        if rec["task"] != "fit":
            continue
        try:
            found = _train_split_faces(_cfg(rec), per_class)
        except Exception:  # noqa: BLE001 - a report draws what it can; the tables do not depend on this grid
            found = None
        if found:
            return found
    return None


def _first_per_class(labels: Any, num_classes: int, per_class: int) -> list[int]:
    counts, keep = [0] * num_classes, []
    for i, y in enumerate(labels):
        if 0 <= int(y) < num_classes and counts[int(y)] < per_class:
            counts[int(y)] += 1
            keep.append(i)
    return keep


def _train_split_faces(cfg: dict[str, Any], per_class: int) -> Optional[dict[str, list[Any]]]:
    import numpy as np
    from omegaconf import OmegaConf

    from datamodules.labels import LabelSpace

    train = _get(cfg, "data.train")
    if not train or train.get("format") == "synthetic":
        return None
    space = LabelSpace.from_num_classes(int(_get(cfg, "data.num_classes", 7)))
    if train.get("format") == "embedded":
        from datamodules.datamodule import embedded_split_args
        from datamodules.procedural.dataset import cache_file

        conf = OmegaConf.create(cfg)
        path = cache_file(**embedded_split_args(conf, conf.data.train))
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            labels = data["labels"]
            keep = _first_per_class(labels, len(space.names), per_class)
            return _by_class(list(space.names), zip(labels[keep], data["images"][keep]), per_class)
    from datamodules.adapters import load_records

    records = load_records(train["format"], train.get("root"), train.get("split", "train"), space)
    return _by_class(list(space.names), ((r.label, r.array if r.array is not None else r.image) for r in records),
                     per_class)


def generated_faces(root: Path, per_class: int = 6) -> Optional[dict[str, list[Any]]]:
    from datamodules.synthetic import read_manifest

    try:
        header, records = read_manifest(str(root))
    except (FileNotFoundError, ValueError):
        return None
    return _by_class(header["label_names"], ((r["label"], str(root / r["image"])) for r in records), per_class)


def _face_image(face: Any, cell: int):
    from PIL import Image

    img = Image.fromarray(face[..., 0] if face.ndim == 3 and face.shape[-1] == 1 else face) \
        if not isinstance(face, (str, Path)) else Image.open(face)
    with img:
        return img.convert("RGB").resize((cell, cell), Image.NEAREST)


def real_vs_generated_grid(real: dict[str, list[Any]], generated: dict[str, list[Any]], path: Path,
                           per_class: int = 6, cell: int = 48) -> bool:
    """One row per class of the generated set: its name, `per_class` real faces, a gap, `per_class` generated ones."""
    from PIL import Image, ImageDraw

    norm = {n.lower(): faces for n, faces in real.items()}
    names = [n for n, faces in generated.items() if faces]
    if not names:
        return False
    pad, margin, header, gap = 2, 70, 16, 14
    half = per_class * (cell + pad)
    grid = Image.new("RGB", (margin + 2 * half + gap, header + len(names) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((margin, 2), "real", fill="black")
    draw.text((margin + half + gap, 2), "generated", fill="black")
    for i, name in enumerate(names):
        y = header + i * (cell + pad)
        draw.text((2, y + cell // 2 - 5), name, fill="black")
        for side, faces in ((0, norm.get(name.lower(), [])), (half + gap, generated[name])):
            for j, face in enumerate(faces[:per_class]):
                grid.paste(_face_image(face, cell), (margin + side + j * (cell + pad), y))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return True


def _real_vs_generated_section(stages: dict[str, dict], out_dir: Path, title: Callable[[dict], str]) -> list[str]:
    synth = [r for r in stages.values() if r["task"] == "synthesize" and "dir" in r.get("artifacts", {})]
    synth = synth or [r for r in stages.values() if "dir" in r.get("artifacts", {})]
    if not synth:
        return []
    generated = generated_faces(Path(synth[0]["artifacts"]["dir"]))
    real = real_faces(stages)
    if not generated or not real or not real_vs_generated_grid(real, generated, out_dir / REAL_VS_GENERATED):
        return []
    return ["## Real against generated faces (one row per class)", "",
            f"Left: real training faces; right: generated by {title(synth[0])}.", "",
            f"![real vs generated]({REAL_VS_GENERATED})", ""]


# -- the AU sweep ----------------------------------------------------------------------------------------------


def _au_sweep_section(stages: dict[str, dict], out_dir: Path, title: Callable[[dict], str]) -> list[str]:
    """The image of every `au-sweep` stage, copied beside the report (the first as au_sweep.png), with the mean
    absolute pixel change of each AU value against AU = 0."""
    import shutil

    lines: list[str] = []
    sweeps = [r for r in stages.values() if r["task"] == "au-sweep"]
    for n, rec in enumerate(sweeps):
        m = rec.get("metrics") or {}
        src = Path(rec.get("artifacts", {}).get("image") or m.get("image") or Path(rec["run_dir"]) / "au_sweep.png")
        if not src.is_file():
            continue
        name = "au_sweep.png" if n == 0 else f"au_sweep_{re.sub(r'[^A-Za-z0-9_.-]', '_', rec['stage'])}.png"
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(src, tmp)
        values = m.get("values") or []
        if not lines:
            lines += ["## AU sweep: one face, one AU raised per row (the FAU adapter's fine-grained control)", ""]
        lines += [f"{title(rec)}: seed {m.get('seed', '–')}, caption “{m.get('caption', '–')}”, "
                  "every other AU 0.", "",
                  f"![AU sweep]({name})", ""]
        rows = [(au, *(_fmt(c) for c in row.get("mean_abs_change", []))) for au, row in (m.get("aus") or {}).items()]
        if rows and values:
            lines += ["Mean absolute pixel change against AU = 0 (pixels in [0, 1]):", "",
                      "| AU | " + " | ".join(f"{float(v):.2f}" for v in values) + " |",
                      "|" + "---|" * (len(values) + 1)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
    return lines


# -- scaling: accuracy against synthetic set size ---------------------------------------------------------------

_SEED_COPY = re.compile(r"^(.*)_seed\d+$")


def base_stage(name: str) -> str:
    """A seed copy `<stage>_seed<N>` (pipeline.repeat) counts as its stage."""
    match = _SEED_COPY.match(name)
    return match.group(1) if match else name


def set_size(record: dict[str, Any], stages: dict[str, dict]) -> Optional[int]:
    """How many synthetic images a fit stage read: its data.synthetic.num_images when it takes a subset, else the
    size of the set at data.synthetic.root (the records of the stage that wrote it, that stage's
    synthesis.num_images, or the set's manifest)."""
    cfg = _cfg(record)
    subset = _get(cfg, "data.synthetic.num_images") or 0
    if subset:
        return int(subset)
    root = _get(cfg, "data.synthetic.root")
    if not root:
        return None
    for rec in stages.values():
        if Path(rec.get("artifacts", {}).get("dir", "")) != Path(root) or rec["task"] != "synthesize":
            continue
        m = rec.get("metrics") or {}
        if isinstance(m.get("num_records"), int):
            return int(m["num_records"])
        num = _get(_cfg(rec), "synthesis.num_images")
        if num:
            return int(num)
    try:
        from datamodules.synthetic import read_manifest

        return len(read_manifest(str(root))[1])
    except (FileNotFoundError, ValueError):
        return None


def scaling_points(rows: list[dict[str, Any]], stages: dict[str, dict]) -> list[dict[str, Any]]:
    """Synthetic-only rows (ratio 1) with their set size, one point per stage (seed copies pooled), by size."""
    points: dict[tuple[str, Optional[int], str], dict[str, Any]] = {}
    for r in rows:
        if r["ratio"] != 1:
            continue
        size = set_size(stages[r["stage"]], stages)
        if size is None:
            continue
        key = (base_stage(r["stage"]), size, r["synthetic_labels"])
        point = points.setdefault(key, {"stage": key[0] if key[0] in stages else r["stage"], "set_size": size,
                                        "synthetic_labels": r["synthetic_labels"], "accs": []})
        point["accs"].append(r["acc"])
    return sorted(points.values(), key=lambda p: (p["set_size"], p["synthetic_labels"], p["stage"]))


def _real_reference(rows: list[dict[str, Any]]) -> Optional[float]:
    """Mean accuracy of the real-only rows with the most real faces (the rows the synthetic sets are sized by)."""
    real = [r for r in rows if r["ratio"] == 0]
    if not real:
        return None
    big = max(r["real_images"] for r in real)
    accs = [r["acc"] for r in real if r["real_images"] == big]
    return sum(accs) / len(accs)


def _mean_std(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return _pct(mean)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{_pct(mean)} ± {100 * std:.2f}"


def _plot_scaling(points: list[dict[str, Any]], real: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for kind in sorted({p["synthetic_labels"].split(" ")[0] for p in points}):
        pts = [p for p in points if p["synthetic_labels"].startswith(kind)]
        means = [100 * float(np.mean(p["accs"])) for p in pts]
        stds = [100 * float(np.std(p["accs"], ddof=1)) if len(p["accs"]) > 1 else 0.0 for p in pts]
        ax.errorbar([p["set_size"] for p in pts], means, yerr=stds, fmt="o-", capsize=3,
                    label=f"synthetic only, {kind} labels")
    if real is not None:
        ax.axhline(100 * real, ls="--", color="gray", label="real only")
    sizes = [p["set_size"] for p in points]
    if max(sizes) >= 4 * min(sizes):
        ax.set_xscale("log")
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("synthetic images")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)
