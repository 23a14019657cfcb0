"""What to generate: one spec per image {id, index, label, aus, caption, seed}.

Specs are a pure function of the config (synthesis.seed, counts, AU source, captions), so a resumed run and
every DDP rank see the same list. Each spec draws its AUs and caption from its own RNG
(SeedSequence([seed, index])), so spec i does not depend on how many specs there are.

AUs: for the target class, a training face's AU vector (empirical) or a draw from the class mean/cov
(gaussian), from the records of `data.train`; EMFACS prototypes with `sample_aus` where the data has none.
Captions: the procedural templates (AU phrases + expression), or lines of `synthesis.captions_file`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datamodules.labels import canonical_name
from datamodules.procedural import captions as cap
from datamodules.procedural.aus import AU_NAMES
from datamodules.procedural.renderer import AGES, GENDERS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Spec:
    id: str
    index: int
    label: int  # index into the generator's label_names
    aus: Optional[tuple[float, ...]]  # ordered as the generator's au_names; None without AUs
    caption: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aus"] = list(self.aus) if self.aus is not None else None
        return d


def spec_id(seed: int, index: int) -> str:
    return f"{seed}-{index:08d}"


def spec_seed(seed: int, index: int) -> int:
    """A per-image sampling seed, independent of batch, rank and total count."""
    a, b = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(a) << 31) ^ int(b)) & 0x7FFF_FFFF_FFFF_FFFF


def norm_au(name: str) -> str:
    """AU01 == AU1 == au1."""
    n = str(name).upper()
    return "AU" + n[2:].lstrip("0") if n.startswith("AU") and n[2:3] == "0" else n


def reorder_aus(vec: Sequence[float], source: Sequence[str], target: Sequence[str]) -> Optional[list[float]]:
    """Move an AU vector from `source` order into `target` order (missing AUs -> 0); None if none overlap."""
    where = {norm_au(n): i for i, n in enumerate(source)}
    if not any(norm_au(n) in where for n in target):
        return None
    return [float(vec[where[norm_au(n)]]) if norm_au(n) in where else 0.0 for n in target]


# ------------------------------------------------------------------------------------------- counts

def class_counts(total: int, label_names: Sequence[str], per_class: Any = None, class_balanced: bool = True,
                 prior: Optional[Sequence[float]] = None) -> list[int]:
    """Images per class. per_class: a list in label order or {class name: count} (missing classes: 0)."""
    k = len(label_names)
    if per_class is not None and per_class != {} and per_class != []:
        if isinstance(per_class, Mapping):
            counts = [0] * k
            canon = [canonical_name(n) for n in label_names]
            for name, count in per_class.items():
                c = canonical_name(str(name), source="synthesis.per_class")
                if c not in canon:
                    raise ValueError(f"synthesis.per_class: class '{name}' is not one of the generator's classes "
                                     f"{canon}")
                counts[canon.index(c)] = int(count)
        elif isinstance(per_class, Sequence) and not isinstance(per_class, str):
            if len(per_class) != k:
                raise ValueError(f"synthesis.per_class={list(per_class)}: expected {k} counts, one per class "
                                 f"{list(label_names)} (or a mapping {{class: count}})")
            counts = [int(c) for c in per_class]
        else:
            raise ValueError(f"synthesis.per_class={per_class!r}: expected a list of {k} counts or {{class: count}}")
        if any(c < 0 for c in counts):
            raise ValueError(f"synthesis.per_class={per_class!r}: counts must be >= 0")
        if total and sum(counts) != total:
            raise ValueError(f"synthesis.per_class sums to {sum(counts)} but synthesis.num_images={total}; "
                             f"set synthesis.num_images=0 (or to {sum(counts)})")
        return counts
    if total <= 0:
        raise ValueError("synthesis.num_images must be > 0 (or give synthesis.per_class counts)")
    weights = np.full(k, 1.0 / k) if class_balanced or prior is None else np.asarray(prior, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.full(k, 1.0 / k)
    weights = weights / weights.sum()
    # Largest remainder: exact total, deterministic, ties to the lower class index.
    raw = weights * total
    counts = np.floor(raw).astype(int)
    order = sorted(range(k), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------- AUs

class AUStats:
    """Per-class AU vectors of a training set (canonical class name -> (n, K) array, K = au_names)."""

    def __init__(self, per_class: Mapping[str, np.ndarray], au_names: Sequence[str]) -> None:
        self.per_class = {canonical_name(k): np.asarray(v, dtype=np.float64) for k, v in per_class.items() if len(v)}
        self.au_names = list(au_names)
        self._gauss: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_records(cls, records: Sequence[Any], label_names: Sequence[str], au_names: Sequence[str]) -> "AUStats":
        groups: dict[str, list] = {}
        for rec in records:
            if getattr(rec, "aus", None) is None:
                continue
            groups.setdefault(canonical_name(label_names[rec.label]), []).append(rec.aus)
        return cls({k: np.asarray(v) for k, v in groups.items()}, au_names)

    def __bool__(self) -> bool:
        return bool(self.per_class)

    def class_frequencies(self, label_names: Sequence[str]) -> list[float]:
        return [float(len(self.per_class.get(canonical_name(n), ()))) for n in label_names]

    def sample(self, label_name: str, rng: np.random.Generator, mode: str = "empirical") -> Optional[np.ndarray]:
        rows = self.per_class.get(canonical_name(label_name))
        if rows is None:
            return None
        if mode == "gaussian" and len(rows) >= 2:
            if label_name not in self._gauss:
                self._gauss[label_name] = (rows.mean(0), np.cov(rows, rowvar=False) + 1e-6 * np.eye(rows.shape[1]))
            mean, cov = self._gauss[label_name]
            return np.clip(rng.multivariate_normal(mean, cov, method="eigh"), 0.0, 1.0)
        return rows[int(rng.integers(len(rows)))].copy()


def emfacs_aus(label_name: str, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    from datamodules.procedural.aus import AU_NAMES, sample_aus

    return sample_aus(label_name, rng).astype(np.float64), list(AU_NAMES)


# ------------------------------------------------------------------------------------------ captions

def read_captions_file(path: str, label_names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(free templates, {class: captions}). A line 'label<TAB>caption' pins a caption to a class; any
    other non-empty line is a template for every class ({expression} becomes the class word)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"synthesis.captions_file={path}: no such file (one caption per line)")
    free: list[str] = []
    pinned: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError as exc:  # the codec's message names neither the file nor what was expected
        raise ValueError(f"synthesis.captions_file={path}: not UTF-8 text ({exc}); expected one caption "
                         f"per line") from exc
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")  # not strip(): 'happy<TAB>' must stay a pinned line, not become a caption
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line:
            label, text = line.split("\t", 1)
            if not text.strip():
                raise ValueError(f"synthesis.captions_file={path}:{lineno}: class {label.strip()!r} has an empty "
                                 f"caption; expected 'class<TAB>caption'")
            pinned.setdefault(canonical_name(label.strip(), source=f"{path}:{lineno}"), []).append(text.strip())
        else:
            free.append(line.strip())
    if not free and not pinned:
        raise ValueError(f"synthesis.captions_file={path}: no captions (expected one per line)")
    canon = [canonical_name(n) for n in label_names]
    missing = [n for n in canon if n not in pinned] if not free else []
    if missing:
        raise ValueError(f"synthesis.captions_file={path}: no caption for classes {missing}; add 'class<TAB>caption' "
                         f"lines or a free line with {{expression}}")
    return free, pinned


def _expression_word(name: str) -> str:
    return cap.EXPRESSION_WORDS[name][0]


def template_caption(label_name: str, aus_canonical: Optional[np.ndarray], rng: np.random.Generator) -> str:
    """The procedural caption templates (those the embedded generator learns)."""
    name = canonical_name(label_name)
    if aus_canonical is None:
        return cap.label_caption(name, rng)

    class _Person:  # make_caption reads only age and gender
        age = AGES[int(rng.integers(len(AGES)))]
        gender = GENDERS[int(rng.integers(len(GENDERS)))]

    return cap.make_caption(name, aus_canonical, _Person(), rng)


# --------------------------------------------------------------------------------------------- specs

def build_specs(num_images: int, label_names: Sequence[str], au_names: Sequence[str], *, seed: int = 0,
                per_class: Any = None, class_balanced: bool = True, au_stats: Optional[AUStats] = None,
                au_sampling: str = "empirical", use_emfacs: bool = True,
                captions: Optional[tuple[list[str], dict[str, list[str]]]] = None) -> list[Spec]:
    """The full, deterministic spec list. au_names=() makes AU-free specs."""
    prior = au_stats.class_frequencies(label_names) if au_stats else None
    counts = class_counts(num_images, label_names, per_class, class_balanced, prior)
    labels = np.repeat(np.arange(len(label_names)), counts)
    # Shuffled once so that every prefix and every rank's shard is close to the class mix.
    labels = labels[np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(len(labels))]
    specs = []
    for index, label in enumerate(labels.tolist()):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), index, 1]))
        name = canonical_name(label_names[label])
        vec, order = None, None
        if au_names:
            if au_stats:
                vec, order = au_stats.sample(name, rng, au_sampling), au_stats.au_names
            if vec is None and use_emfacs:
                vec, order = emfacs_aus(name, rng)
        aus = reorder_aus(vec, order, au_names) if vec is not None else None
        canon_vec = None
        if vec is not None:
            cv = reorder_aus(vec, order, AU_NAMES)
            canon_vec = np.asarray(cv) if cv is not None else None
        if captions is not None:
            free, pinned = captions
            pool = pinned.get(name) or free
            caption = pool[int(rng.integers(len(pool)))].replace("{expression}", _expression_word(name))
        else:
            caption = template_caption(name, canon_vec, rng)
        specs.append(Spec(id=spec_id(seed, index), index=index, label=int(label),
                          aus=tuple(round(float(a), 6) for a in aus) if aus is not None else None,
                          caption=caption, seed=spec_seed(seed, index)))
    return specs


def training_au_stats(cfg: Any, au_names: Sequence[str]) -> Optional[AUStats]:
    """Class-conditional AU vectors of cfg.data.train (None when it has no AUs or cannot be read)."""
    from datamodules.datamodule import FERDataModule

    if cfg.data.train is None:
        return None
    dm = FERDataModule(cfg)
    records = dm.load_records(cfg.data.train, "data.train")
    stats = AUStats.from_records(records, dm.label_space.names, dm.au_names)
    if not stats:
        return None
    stats_target = {k: np.asarray([reorder_aus(r, dm.au_names, au_names) for r in v])
                    for k, v in stats.per_class.items()}
    return AUStats(stats_target, au_names)


def specs_from_config(cfg: Any, label_names: Sequence[str], au_names: Sequence[str]) -> list[Spec]:
    y = cfg.synthesis
    stats = None
    if au_names and y.au_source in ("auto", "data"):
        try:
            stats = training_au_stats(cfg, au_names)
        except (FileNotFoundError, ValueError) as exc:
            if y.au_source == "data":
                raise
            log.warning("synthesis.au_source=auto: data.train unreadable (%s); using EMFACS prototypes", exc)
        if stats is None and y.au_source == "data":
            raise ValueError("synthesis.au_source=data: data.train has no AU annotations; "
                             "use synthesis.au_source=emfacs")
    captions = read_captions_file(y.captions_file, label_names) if y.captions_file else None
    per_class = y.per_class
    if per_class is not None and hasattr(per_class, "items"):
        per_class = dict(per_class.items())
    elif per_class is not None:
        per_class = list(per_class)
    return build_specs(int(y.num_images), label_names, au_names, seed=int(y.seed), per_class=per_class,
                       class_balanced=bool(y.class_balanced), au_stats=stats, au_sampling=y.au_sampling,
                       captions=captions)
