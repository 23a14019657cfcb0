"""Self-supervised methods, one short file each on `SSLBase` / `MomentumSSL`, registered by `ssl.method`.

The `ssl` task family (MODULES["ssl"]) is `SSLModule`: constructing it builds the method the config names,
so `fit` and `checkpoints.load_module` rebuild any method from (config, label_names, normalization).
"""
from __future__ import annotations

from typing import Optional, Sequence

from lightning_synfer.modules.ssl.base import SSLBase, SSLDataModule, multi_view_transform
from lightning_synfer.modules.ssl.byol import BYOL
from lightning_synfer.modules.ssl.dino import DINO
from lightning_synfer.modules.ssl.mocov3 import MoCoV3
from lightning_synfer.modules.ssl.momentum import MomentumSSL
from lightning_synfer.modules.ssl.simclr import SimCLR

METHODS: dict[str, type[SSLBase]] = {"mocov3": MoCoV3, "simclr": SimCLR, "byol": BYOL, "dino": DINO}


def method_class(name: str) -> type[SSLBase]:
    if name not in METHODS:
        raise ValueError(f"ssl.method={name!r}: unknown method; expected one of {sorted(METHODS)}")
    return METHODS[name]


class SSLModule:
    """Factory for the `ssl` family: SSLModule(config, label_names) is an instance of METHODS[ssl.method]."""

    task_name = "ssl"
    build_datamodule = staticmethod(SSLBase.build_datamodule)

    @staticmethod
    def trainer_overrides(cfg) -> dict:
        return method_class(cfg.ssl.method).trainer_overrides(cfg)  # the method's own needs (SyncBatchNorm)

    def __new__(cls, config: dict, label_names: Sequence[str], normalization: Optional[dict] = None) -> SSLBase:
        return method_class(config["ssl"]["method"])(config, label_names, normalization)


__all__ = ["BYOL", "DINO", "METHODS", "MoCoV3", "MomentumSSL", "SSLBase", "SSLDataModule", "SSLModule", "SimCLR",
           "method_class", "multi_view_transform"]
