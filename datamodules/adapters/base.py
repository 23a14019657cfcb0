"""What every dataset adapter shares: the record list it returns, its errors, and the registry of formats.

An adapter module registers its loader with `@register_format(name, codes=..., roots=...)`:

    @register_format("rafdb", codes=RAFDB_CODES, roots={"rafdb": DatasetRoot("SYNFER_RAFDB", "/data/RAF-DB/basic")})
    def load_rafdb(root: str, split: str, label_space: LabelSpace) -> RecordList: ...

`FORMATS` is then the only list of formats (`data.*.format`, `check-dataset --format`, the synthesis image
sources) and of dataset roots (`paths.<name>`, each overridable by its environment variable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

from datamodules.labels import CANONICAL_8
from datamodules.records import Record
from datamodules.registry import Registry

Adapter = Callable[..., "RecordList"]  # (root, split, label_space[, version]) -> RecordList


class RecordList(list):
    """A list of Records that also remembers what was left out and why.

    `skipped` holds one human-readable message per skipped item (file, row or line), so
    `len(records.skipped)` is the number of items dropped while listing the dataset.
    """

    def __init__(self, records: Iterable[Record] = (), skipped: Optional[Iterable[str]] = None) -> None:
        super().__init__(records)
        self.skipped: list[str] = list(skipped or [])

    def extend_from(self, other: "RecordList") -> None:
        self.extend(other)
        self.skipped.extend(getattr(other, "skipped", []))


class DatasetLayoutError(ValueError):
    """The files under a dataset root do not match the layout the adapter expects."""


@dataclass(frozen=True)
class DatasetRoot:
    """A dataset's default folder: `paths.<name>` is ${oc.env:<env>,<default>}."""

    env: str
    default: str


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    load: Adapter
    codes: Mapping[int, str] = field(default_factory=dict)  # the format's numeric label codes -> canonical names
    roots: Mapping[str, DatasetRoot] = field(default_factory=dict)  # paths.<name> of datasets in this format
    versioned: bool = False  # load takes a manifest `version` (synthetic sets)


FORMATS: Registry[DatasetFormat] = Registry("dataset format", "datamodules.adapters", "SYNFER_ADAPTERS")


def register_format(name: str, *, codes: Optional[Mapping[int, str]] = None,
                    roots: Optional[Mapping[str, DatasetRoot]] = None, versioned: bool = False) -> Callable:
    """Decorator: register the adapter function it wraps as dataset format `name`."""
    codes = dict(codes or {})
    bad = {code: label for code, label in codes.items() if label not in CANONICAL_8}
    if bad:
        raise ValueError(f"dataset format {name!r}: label codes {bad} are not canonical names {CANONICAL_8}")

    def wrap(load: Adapter) -> Adapter:
        FORMATS.register(name, DatasetFormat(name, load, codes, dict(roots or {}), versioned))
        return load
    return wrap


def dataset_roots() -> dict[str, DatasetRoot]:
    """paths.<name> -> its default folder and environment variable, over every registered format."""
    out: dict[str, DatasetRoot] = {}
    for fmt_name, fmt in FORMATS.items():
        for name, root in fmt.roots.items():
            if name in out and out[name] != root:
                raise ValueError(f"paths.{name}: declared twice with different defaults (format {fmt_name!r}: "
                                 f"{root}; before: {out[name]})")
            out[name] = root
    return out


__all__ = ["Adapter", "DatasetFormat", "DatasetLayoutError", "DatasetRoot", "FORMATS", "RecordList", "dataset_roots",
           "register_format"]
