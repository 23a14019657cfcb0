"""Config choices as str-valued Enums: a schema field typed with one makes OmegaConf refuse any other value at
merge time (compose._explain turns that into a one-line error naming the key, the value and the choices)."""
from __future__ import annotations

import enum
from typing import Any


# The value of every setting resolved from the hardware at run time (trainer.precision, model.channels_last,
# pipeline.parallel, sweep.parallel; lightning_synfer/hardware.py).
AUTO = "auto"


class Choice(str, enum.Enum):
    """One config choice. Members are named like their values (OmegaConf converts YAML strings by name), compare
    equal to them (`cfg.optim.name == "sgd"` holds), and print as them."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:  # config errors show the value as the user wrote it
        return repr(self.value)


def choice_names(enum_type: Any) -> str:
    """'a, b or c' for an Enum type's members."""
    names = [str(m.value) for m in enum_type]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class FrozenDtype(Choice):
    """dtype of frozen weights (the generator's VAE and text encoder, the labeler's UNet)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
