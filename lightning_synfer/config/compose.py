"""Compose a run's config: schema <- defaults groups <- experiment file <- command-line overrides.

    experiments/<group>/<name>.yaml      config groups (trainer, data, model, logger, paths)
    experiments/<family>/<name>.yaml     experiments; `defaults:` lists group choices and may name
                                         another experiment to inherit from ("supervised/base").

Errors name the file or key and suggest the closest valid names. YAML is parsed with safe loaders
only; no config string is ever evaluated as code.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import io
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from datamodules.adapters import FORMATS
from lightning_synfer.config.annotate import validate_annotate
from lightning_synfer.config.choices import choice_names
from lightning_synfer.config.clip import validate_clip, validate_shots
from lightning_synfer.config.errors import ConfigError, check
from lightning_synfer.config.generator import validate_generator
from lightning_synfer.config.labeler import validate_labeler
from lightning_synfer.config.schema import Config
from lightning_synfer.config.ssl import validate_ssl
from lightning_synfer.config.sweep import validate_sweep
from lightning_synfer.config.synthesis import validate_synthesis

DEFAULT_GROUPS = ("paths", "trainer", "logger", "data", "model")
# Config keys that were renamed: old dotted prefix -> new (a tuple where the new key depends on the task). The only
# list: every experiment body and the command line are checked against it before they are merged.
RENAMED_KEYS: dict[str, str | tuple[str, ...]] = {
    "sg.ckpt": "guidance.classifier",
    "sg": "guidance",
    "gen.ckpt": "synthesis.generator",
    "gen": "synthesis.generator",
    "synth.dir": ("generation_eval.dataset", "labeling.dataset"),  # evaluate-generation, label
    "synth": "synthesis",
    "layout": "synthesis.layout",
    "judge.ckpt": "generation_eval.judge",
    "judge": "generation_eval",
    "real": "generation_eval.real",
    "label": "labeling",
    "labelers": "labeling.ensemble",
    # the SSL methods' own settings (lightning_synfer/modules/ssl/<method>.py) left the flat ssl section
    "ssl.temperature": ("ssl.methods.mocov3.temperature", "ssl.methods.simclr.temperature"),
    **{f"ssl.dino_{name}": f"ssl.methods.dino.{name}" for name in (
        "bottleneck_dim", "output_dim", "batch_norm", "norm_last_layer", "freeze_last_layer_epochs", "student_temp",
        "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "center_momentum")},
    "sweep.slurm.submit": "sweep.slurm.script_only",  # submitit submits; script_only=true writes the script instead
}
# Group choices every experiment starts from unless its `defaults:` says otherwise.
BASE_DEFAULTS = {"paths": "default", "trainer": "default", "logger": "tensorboard", "data": "embedded",
                 "model": "resnet18"}


def experiments_dir() -> Path:
    env = os.environ.get("SYNFER_EXPERIMENTS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "experiments"


def list_experiments() -> list[str]:
    root = experiments_dir()
    names = []
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).with_suffix("").as_posix()
        if rel.split("/")[0] not in DEFAULT_GROUPS:
            names.append(rel)
    return names


def list_group(group: str) -> list[str]:
    return sorted(p.stem for p in (experiments_dir() / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot parse YAML ({exc})") from exc
    cfg = _parse_yaml(str(path), text)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return copy.deepcopy(cfg)  # the cached parse stays untouched by the caller's merges


@functools.lru_cache(maxsize=1024)
def _parse_yaml(path: str, text: str) -> Any:
    """One parse per file content (keyed by the text itself, so an edited file is parsed again): a pipeline
    composes every stage, and each compose reads the same group and experiment files."""
    try:
        return OmegaConf.load(io.StringIO(text))
    except Exception as exc:  # yaml.YAMLError
        raise ConfigError(f"{path}: cannot parse YAML ({exc})") from exc


@functools.lru_cache(maxsize=1)
def _schema_template() -> DictConfig:
    return OmegaConf.structured(Config)


def schema_config() -> DictConfig:
    """The schema's structured config with every default, unresolved (env interpolations stay live): a copy of
    one built once, which is ~7x cheaper than OmegaConf.structured(Config) each time."""
    return copy.deepcopy(_schema_template())


def _experiment_path(name: str) -> Path:
    path = experiments_dir() / f"{name}.yaml"
    if not path.is_file():
        known = list_experiments()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"experiment={name}: no file {path}.{hint} Known experiments: {', '.join(known)}")
    return path


def _group_path(group: str, name: str, source: str) -> Path:
    path = experiments_dir() / group / f"{name}.yaml"
    if not path.is_file():
        known = list_group(group)
        raise ConfigError(f"{source}: {group}={name} has no file {path}. Known {group} configs: {', '.join(known)}")
    return path


def _split_defaults(cfg: DictConfig, source: str) -> tuple[dict[str, str], list[str], DictConfig]:
    """Return (group choices, parent experiments, body without `defaults`)."""
    groups: dict[str, str] = {}
    parents: list[str] = []
    defaults = cfg.get("defaults", None)
    if defaults is not None:
        if not isinstance(defaults, ListConfig):
            raise ConfigError(f"{source}: `defaults` must be a list like [trainer: cpu, data: embedded]")
        for item in defaults:
            if isinstance(item, str):
                parents.append(item)
            elif isinstance(item, DictConfig) and len(item) == 1:
                (group, name), = item.items()
                if group not in DEFAULT_GROUPS:
                    raise ConfigError(f"{source}: unknown defaults group '{group}'; expected one of {DEFAULT_GROUPS}")
                groups[str(group)] = str(name)
            else:
                raise ConfigError(f"{source}: bad defaults entry {item!r}; expected 'group: name' or 'family/experiment'")
    body = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "defaults"]) if "defaults" in cfg else cfg
    return groups, parents, body


def _collect(name: str, seen: tuple[str, ...] = ()) -> tuple[dict[str, str], list[tuple[str, DictConfig]]]:
    """Resolve an experiment and its parents into group choices and ordered bodies."""
    if name in seen:
        raise ConfigError(f"experiment={name}: inheritance cycle {' -> '.join(seen + (name,))}")
    path = _experiment_path(name)
    groups, parents, body = _split_defaults(_load_yaml(path), str(path))
    all_groups: dict[str, str] = {}
    bodies: list[tuple[str, DictConfig]] = []
    for parent in parents:
        pg, pb = _collect(parent, seen + (name,))
        all_groups.update(pg)
        bodies.extend(pb)
    all_groups.update(groups)
    bodies.append((str(path), body))
    return all_groups, bodies


def _schema_node(key_path: list[str]) -> Any:
    """The dataclass type at a dotted path of the schema (for suggestions), or None."""
    node: Any = Config
    for part in key_path:
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) is typing.Union and len(args) == 1:  # Optional[X] -> X
            node = args[0]
    return node


def _valid_keys(parent_path: list[str]) -> list[str]:
    node = _schema_node(parent_path)
    if node is not None and dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    full_key = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
    parts = [p for p in full_key.split(".") if p]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and parts:
        valid = _valid_keys(parts[:-1])
        close = difflib.get_close_matches(parts[-1], valid, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join('.'.join(parts[:-1] + [c]) for c in close)}?" if close else ""
        listing = f" Valid keys here: {', '.join(valid)}." if valid else ""
        return ConfigError(f"{source}: unknown config key '{full_key}'.{hint}{listing}")
    if isinstance(exc, ValidationError):
        node = _schema_node(parts[:-1])
        expected = ""
        value = getattr(exc, "value", None)
        if node is not None and dataclasses.is_dataclass(node):
            field_type = typing.get_type_hints(node).get(parts[-1], "?")
            if isinstance(field_type, type) and issubclass(field_type, enum.Enum):  # a Choice of the schema
                return ConfigError(f"{source}: config key '{full_key}' = {value!r}: "
                                   f"expected {choice_names(field_type)}")
            expected = f" Expected type: {field_type}."
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: bad value {value!r} for '{full_key}' ({msg}).{expected}")
    return ConfigError(f"{source}: {exc}")


def _leaf_keys(node: Any, prefix: str = "") -> Iterable[str]:
    """Dotted keys of every leaf of a (nested) mapping; an empty mapping counts as a leaf."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_keys(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1]


def renamed_key(key: str) -> Optional[str]:
    """The new name of an old dotted config key (longest matching prefix of RENAMED_KEYS), or None."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        new = RENAMED_KEYS.get(".".join(parts[:n]))
        if new is not None:
            rest = "".join(f".{p}" for p in parts[n:])
            return " or ".join(f"'{k}{rest}'" for k in ((new,) if isinstance(new, str) else new))
    return None


def check_renamed_keys(body: DictConfig, source: str) -> None:
    """Refuse keys that were renamed, naming the new key (before the merge reports them as unknown)."""
    for key in _leaf_keys(OmegaConf.to_container(body, resolve=False)):
        new = renamed_key(key)
        if new is not None:
            raise ConfigError(f"{source}: config key '{key}' was renamed to {new}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    """`other` merged INTO `base` (which compose owns): OmegaConf.merge would deep-copy the whole schema first, once
    per config file, and those copies were most of a compose (a pipeline composes every stage twice)."""
    try:
        base.merge_with(other)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None
    return base


def parse_overrides(overrides: Iterable[str]) -> tuple[dict[str, str], list[str], Optional[str]]:
    """Split CLI args into group choices (trainer=ddp), dotlist overrides and experiment=..."""
    groups: dict[str, str] = {}
    dotlist: list[str] = []
    experiment = None
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(f"override '{arg}': expected key=value (for example data.batch_size=32)")
        key, value = arg.split("=", 1)
        if key == "experiment":
            experiment = value
        elif key in DEFAULT_GROUPS and "." not in key and value and not value.startswith(("{", "[")):
            groups[key] = value
        else:
            dotlist.append(arg)
    return groups, dotlist, experiment


def compose(experiment: Optional[str] = None, overrides: Iterable[str] = (), *, validate_values: bool = True) -> DictConfig:
    """Build the validated config of one run."""
    cli_groups, dotlist, cli_experiment = parse_overrides(list(overrides))
    experiment = cli_experiment or experiment or "supervised/embedded"
    exp_groups, bodies = _collect(experiment)
    groups = {**BASE_DEFAULTS, **exp_groups, **cli_groups}

    cfg = schema_config()
    for group in DEFAULT_GROUPS:  # fixed order: paths before the groups that interpolate them
        path = _group_path(group, groups[group], f"experiment={experiment}")
        cfg = _merge(cfg, OmegaConf.create({group: _load_yaml(path)}), str(path))
    for source, body in bodies:
        check_renamed_keys(body, source)
    if dotlist:
        try:
            cli = OmegaConf.from_dotlist(dotlist)
        except Exception as exc:
            raise ConfigError(f"command line: cannot parse overrides {dotlist} ({exc})") from exc
        check_renamed_keys(cli, "command line")
    for source, body in bodies:
        cfg = _merge(cfg, body, source)
    if dotlist:
        cfg = _merge(cfg, cli, "command line")
    cfg.experiment = experiment
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, f"experiment={experiment}") from None
    if cfg.task == "pipeline":
        from lightning_synfer.config.pipeline import expand_stages

        expand_stages(cfg.pipeline)
    if validate_values:
        validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    d = cfg.data
    check(0.0 <= d.mix.synthetic_ratio <= 1.0, "data.mix.synthetic_ratio", d.mix.synthetic_ratio, "a value in [0, 1]")
    check(d.mix.synthetic_scale > 0, "data.mix.synthetic_scale", d.mix.synthetic_scale, "a value > 0")
    check(d.num_classes in (7, 8), "data.num_classes", d.num_classes, "7 or 8 (canonical label space)")
    check(d.channels in (1, 3), "data.channels", d.channels, "1 (grayscale) or 3 (RGB)")
    check(d.batch_size > 0, "data.batch_size", d.batch_size, "a positive global batch size")
    check(d.image_size >= 8, "data.image_size", d.image_size, "at least 8 pixels")
    for name in ("train", "val", "test", "synthetic"):  # embedded renders faces; the rest are registered adapters
        fmt = d[name].format if d.get(name) is not None else "embedded"
        check(fmt == "embedded" or fmt in FORMATS, f"data.{name}.format", fmt,
              f"embedded or a registered dataset format ({', '.join(FORMATS.names())})")
    if d.mix.synthetic_ratio > 0:
        check(d.synthetic is not None, "data.synthetic", None,
              "a synthetic dataset (data.synthetic.root=DIR) when data.mix.synthetic_ratio > 0")
    check(0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing", cfg.loss.label_smoothing, "a value in [0, 1)")
    for hook in VALIDATORS:
        hook(cfg)


# Range checks of the task families' own sections, run after the ones above.
VALIDATORS = [validate_annotate, validate_synthesis, validate_ssl, validate_generator, validate_sweep, validate_labeler,
              validate_clip, validate_shots]


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
