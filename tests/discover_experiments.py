"""Experiments found by what they configure, not by name, so a new method's YAML is run without listing it."""
from __future__ import annotations

from functools import lru_cache

from lightning_synfer.config import compose, list_experiments

DATA_SOURCES = ("train", "val", "test", "synthetic")


@lru_cache(maxsize=None)
def ssl_pretraining_on_embedded_data() -> tuple[str, ...]:
    """Every `ssl` task experiment that reads only the embedded faces (each runs fast_dev_run in test_ssl.py).
    Only experiments/ssl/ is composed: composing all 70+ configs takes ~40 s on a small CPU."""
    found = []
    for name in list_experiments():
        if not name.startswith("ssl/"):
            continue
        cfg = compose(name, validate_values=False)
        if cfg.task == "ssl" and all(cfg.data.get(s) is None or cfg.data[s].format == "embedded" for s in DATA_SOURCES):
            found.append(name)
    return tuple(found)
