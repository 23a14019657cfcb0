"""Self-supervised methods, one file each on `SSLBase` / `MomentumSSL`, registered by name for `ssl.method`.

A method file registers its class and the dataclass of its own settings (solo-learn's `method_kwargs`):

    @dataclass
    class DINOSettings:
        teacher_temp: float = 0.04
        ...

    @register_method("dino", DINOSettings)
    class DINO(MomentumSSL): ...          # reads self.settings.teacher_temp

and the config sets them under `ssl.methods.<name>` (`ssl.methods.dino.teacher_temp=0.07`). `METHODS` finds
every module of this package, and the modules named in SYNFER_SSL_METHODS, on its first lookup: it is the only
list of method names. This file imports neither torch nor lightning_synfer.config, so that config validation
(lightning_synfer/config/ssl.py) can read the registry without an import cycle.

The `ssl` task family (MODULES["ssl"]) is `SSLModule`: constructing it builds the method the config names,
so `fit` and `checkpoints.load_module` rebuild any method from (config, label_names, normalization).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from datamodules.registry import Registry


@dataclass
class NoSettings:
    """A method without settings of its own."""


@dataclass(frozen=True)
class Method:
    name: str
    cls: type  # an SSLBase subclass
    settings: type  # its settings dataclass; an optional `validate(self, key)` checks ranges (config/ssl.py)


METHODS: Registry[Method] = Registry("SSL method", "lightning_synfer.modules.ssl", "SYNFER_SSL_METHODS")


def register_method(name: str, settings: type = NoSettings) -> Callable[[type], type]:
    """Class decorator: register an SSLBase subclass as ssl.method=`name` with its settings dataclass."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"register_method({name!r}): settings must be a dataclass, got {settings!r}")

    def wrap(cls: type) -> type:
        METHODS.register(name, Method(name, cls, settings))
        return cls
    return wrap


def method_class(name: str) -> type:
    return METHODS.get(name, key="ssl.method").cls


class SSLModule:
    """Factory for the `ssl` family: SSLModule(config, label_names) is an instance of the ssl.method's class."""

    task_name = "ssl"

    @staticmethod
    def build_datamodule(cfg, module, run_dir: str):
        return type(module).build_datamodule(cfg, module, run_dir)

    @staticmethod
    def trainer_overrides(cfg) -> dict:
        return method_class(cfg.ssl.method).trainer_overrides(cfg)  # the method's own needs (SyncBatchNorm)

    def __new__(cls, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None):
        return method_class(config["ssl"]["method"])(config, label_names, normalization)


__all__ = ["METHODS", "Method", "NoSettings", "SSLModule", "method_class", "register_method"]
