"""Grid expansion: `sweep.grid` -> ordered points, each a list of overrides for one ordinary run.

Order is deterministic: the cartesian product in the grid's key order (the first key varies slowest),
values in the order given. A point's name comes from its values only (not its index), so growing a grid
(one more seed) keeps the names, and run dirs, of the points that already ran.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_synfer.config.compose import DEFAULT_GROUPS, ConfigError, compose

# Keys a grid must not set: the sweep decides them per point.
RESERVED = ("run_dir", "resume", "overwrite", "sweep")
_NAME_MAX = 120  # characters of a point name before it is shortened with a hash


@dataclass
class Point:
    index: int
    name: str
    values: dict[str, Any]  # dotted key -> value, in grid order
    overrides: list[str]  # the point's own overrides (grid values only)

    def label(self) -> str:
        return ", ".join(f"{k}={format_value(v)}" for k, v in self.values.items())


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def flatten_grid(grid: Any, prefix: str = "") -> dict[str, list[Any]]:
    """Nested dicts (`sweep.grid.data.mix.synthetic_ratio=[...]` on the command line) -> dotted keys.

    A dict is walked into until a list is reached; that list holds the point values (a value may itself be a
    list or a dict, e.g. `data.augment.crop_scale: [[0.8, 1.0], [0.5, 1.0]]`).
    """
    grid = _plain(grid) or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"sweep.grid: expected a mapping of config keys to value lists, got {grid!r}")
    out: dict[str, list[Any]] = {}
    for key, value in grid.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not value:
                raise ConfigError(f"sweep.grid.{full}: empty mapping; expected a list of values like [0, 0.5, 1]")
            out.update(flatten_grid(value, prefix=f"{full}."))
        elif isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"sweep.grid.{full}: empty list; expected at least one value")
            out[full] = list(value)
        else:
            raise ConfigError(f"sweep.grid.{full} = {value!r}: expected a list of values, "
                              f"for example sweep.grid.{full}=[{format_value(value)}]")
    for key in out:
        if key.split(".")[0] in RESERVED or key == "experiment":
            raise ConfigError(f"sweep.grid.{key}: the sweep sets '{key.split('.')[0]}' itself; "
                              f"expected a config key of the runs (data..., optim..., seed, model, ...)")
    return out


def format_value(value: Any) -> str:
    """A value as override text that OmegaConf parses back to the same value (and a readable name part)."""
    if isinstance(value, str):
        # Plain strings stay plain unless the override parser would read them as something else
        # ("1e-3", "true", "null"); the check uses that parser itself.
        try:
            same = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"] == value
        except Exception:  # any parse error: quote it
            same = False
        return value if same and value and not any(c in value for c in ",[]{}'\"= ") else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def _name_part(key: str, value: Any, short: str) -> str:
    # 1 and 1.0 name the same point, so a rerun written either way finds the same run dir.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = format_value(value)
    text = re.sub(r"[^A-Za-z0-9._+\-]+", "_", text).strip("_") or "x"
    return f"{short}={text}"


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last component of each key, or more components where two keys would share a short name."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for other in keys if other == cand or other.endswith("." + cand)) == 1:
                out[key] = cand
                break
        else:
            out[key] = key
    return out


def expand(grid: Mapping[str, Sequence[Any]]) -> list[Point]:
    """The cartesian product of the grid in key order (first key slowest), as named points."""
    keys = list(grid)
    shorts = short_keys(keys)
    points = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        name = ",".join(_name_part(k, v, shorts[k]) for k, v in values.items()) or "default"
        if len(name) > _NAME_MAX:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            name = f"{name[:_NAME_MAX - 9]}-{digest}"
        overrides = [f"{k}={format_value(v)}" for k, v in values.items()]
        points.append(Point(index=index, name=name, values=values, overrides=overrides))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"sweep.grid: repeated values give identical points {dupes}; "
                          f"expected distinct values per key")
    return points


def base_overrides(argv: Sequence[str]) -> list[str]:
    """The sweep's command-line overrides minus its own `sweep.*` keys: what every point shares."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key == "sweep" or key.startswith("sweep."):
            continue
        out.append(arg)
    return out


def sweep_hash(cfg: DictConfig) -> str:
    """Hash of the base config without the `sweep` section: the same experiment + overrides -> the same folder,
    whatever the grid or launcher settings (a grown grid reuses the points that ran)."""
    from lightning_synfer.config.schema import Config
    from lightning_synfer.runs import config_hash

    base = cfg.copy()
    base.sweep = OmegaConf.structured(Config).sweep
    return config_hash(base)


def sweep_dir(cfg: DictConfig) -> Path:
    if cfg.sweep.out:
        return Path(cfg.sweep.out)
    return Path(cfg.paths.runs_dir) / Path(*cfg.experiment.split("/")) / f"sweep-{sweep_hash(cfg)}"


def point_overrides(cfg: DictConfig, argv: Sequence[str], point: Point, run_dir: Path) -> list[str]:
    """Everything one point's `fit` gets: experiment, shared overrides, grid values, its own run dir.

    resume=auto (unless given): a point cut off by preemption continues from its last.ckpt when rerun.
    """
    shared = base_overrides(argv)
    extra = [f"run_dir={run_dir}"]
    if not any(a.split("=", 1)[0] == "resume" for a in shared):
        extra.append("resume=auto")
    return [f"experiment={cfg.experiment}", *[a for a in shared if not a.startswith("experiment=")],
            *point.overrides, *extra]


def compose_point(cfg: DictConfig, argv: Sequence[str], point: Point, run_dir: Path) -> tuple[DictConfig, list[str]]:
    """Compose (= validate) a point: a misspelt grid key fails here, with compose's message and the point named."""
    overrides = point_overrides(cfg, argv, point, run_dir)
    try:
        point_cfg = compose(cfg.experiment, overrides)
    except ConfigError as exc:
        raise ConfigError(f"sweep point {point.index} ({point.label()}): {exc}") from None
    for key, value in point.values.items():
        if "." in key or key not in DEFAULT_GROUPS:
            got = _plain(OmegaConf.select(point_cfg, key, default=None))
            if isinstance(value, str) != isinstance(got, str):
                continue  # the schema converted it ("0.5" into a float field); OmegaConf checked the type
            if _comparable(got) != _comparable(value):
                raise ConfigError(f"sweep.grid.{key}: value {value!r} arrived as {got!r} in the composed config; "
                                  f"expected the same value (quote it in YAML)")
    return point_cfg, overrides


def _comparable(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "metrics.json").is_file()


def plan(cfg: DictConfig, argv: Sequence[str], *, root: Optional[Path] = None
         ) -> list[tuple[Point, Path, DictConfig, list[str]]]:
    """Expand and compose every point before anything runs: (point, run dir, config, overrides)."""
    grid = flatten_grid(cfg.sweep.grid)
    if not grid:
        raise ConfigError("sweep.grid is empty; expected for example sweep.grid.seed=[0,1,2] "
                          "or a `sweep: {grid: ...}` section in the experiment")
    root = Path(root) if root is not None else sweep_dir(cfg)
    out = []
    for point in expand(grid):
        run_dir = root / point.name
        point_cfg, overrides = compose_point(cfg, argv, point, run_dir)
        out.append((point, run_dir, point_cfg, overrides))
    return out
