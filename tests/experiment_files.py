"""What an experiment file sets, compared with what `compose` makes of it (for test_config.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_synfer.config import compose

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MISSING = object()


def _mismatches(expected: Any, got: Any, where: tuple = ()) -> list[tuple]:
    """Key paths where `expected` (what a file sets) is not part of `got` (the composed config)."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return [where]
        return [m for k, v in expected.items() for m in _mismatches(v, got.get(k, MISSING), (*where, k))]
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return [where]
        return [m for i, (e, g) in enumerate(zip(expected, got)) for m in _mismatches(e, g, (*where, i))]
    if isinstance(expected, str) and "${" in expected:  # an interpolation: its literal parts must be there
        pattern = ".*".join(re.escape(part) for part in re.split(r"\$\{[^}]*\}", expected))
        return [] if isinstance(got, str) and re.fullmatch(pattern, got) else [where]
    return [] if expected == got else [where]


def _value_at(tree: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, (dict, list)) or (isinstance(tree, dict) and key not in tree):
            return MISSING
        tree = tree[key]
    return tree


def _load(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def experiment_file_mismatches(name: str) -> list[tuple]:
    """Key paths where compose(name) lost what experiments/<name>.yaml sets: its own keys, its group choices
    (unless a parent experiment, merged after the groups, or the file itself sets the key), and for a file with only
    parent experiments, everything of those parents."""
    own = _load(EXPERIMENTS / f"{name}.yaml")
    defaults = own.pop("defaults", [])
    cfg = OmegaConf.to_container(compose(name), resolve=True)
    wrong = _mismatches(own, cfg)
    parents = [OmegaConf.to_container(compose(p), resolve=True) for p in defaults if isinstance(p, str)]
    for entry in (d for d in defaults if isinstance(d, dict)):
        ((group, choice),) = entry.items()
        for path in _mismatches(_load(EXPERIMENTS / group / f"{choice}.yaml"), cfg[group], (group,)):
            if _value_at(own, path) is MISSING and all(_value_at(p, path) != _value_at(cfg, path) for p in parents):
                wrong.append(path)
    if not own and all(isinstance(d, str) for d in defaults):
        wrong += [(k,) for p in parents for k in set(p) | set(cfg) if k != "experiment" and p.get(k) != cfg.get(k)]
    return wrong
