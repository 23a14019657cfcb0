"""What to generate: one spec per image {id, index, label, aus, caption, seed}.

Specs are a pure function of the config (synthesis.seed, counts, AU source, captions), so a resumed run and
every DDP rank see the same list. Each spec draws its AUs and caption from its own RNG
(SeedSequence([seed, index])), so spec i does not depend on how many specs there are.

AUs: for the target class, a training face's AU vector (empirical) or a draw from the class mean/cov
(gaussian), from the records of `data.train`; EMFACS prototypes with `sample_aus` where the data has none.
Captions (`synthesis.captions`): the procedural templates (AU phrases + expression), lines of
`synthesis.captions_file`, or the generator's own training captions (sampling/prompts.py); `llm` enriches one of
these per image at predict time. A training set whose AU list lacks one of the generator's AUs is an error.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datamodules.au_vocabulary import AUAligner, AUVocabularyError, au_difference, canonical_au
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
    caption_source: str = "templates"  # templates | file | training_set; `llm` rewrites it in the predict step

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


def reorder_prototype(vec: Sequence[float], source: Sequence[str], target: Sequence[str]) -> Optional[list[float]]:
    """Move an EMFACS prototype (or any vector that lists the ACTIVE AUs) from `source` order into `target` order:
    an AU the prototype does not name is inactive, so it becomes 0; None if the lists share no AU. Measured AU
    vectors go through datamodules.au_vocabulary.AUAligner instead, which refuses missing AUs."""
    where = {canonical_au(n): i for i, n in enumerate(source)}
    if not any(canonical_au(n) in where for n in target):
        return None
    return [float(vec[where[canonical_au(n)]]) if canonical_au(n) in where else 0.0 for n in target]


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
                captions: Optional[tuple[list[str], dict[str, list[str]]]] = None,
                training_captions: Optional[tuple[dict[str, list[str]], list[str]]] = None) -> list[Spec]:
    """The full, deterministic spec list. au_names=() makes AU-free specs. Captions: lines of a caption file
    (`captions`), else the generator's training captions (`training_captions`, expression words swapped to the
    target), else (and for a class neither has) the procedural templates."""
    from lightning_synfer.sampling.prompts import pick_training_caption

    prior = au_stats.class_frequencies(label_names) if au_stats else None
    counts = class_counts(num_images, label_names, per_class, class_balanced, prior)
    labels = np.repeat(np.arange(len(label_names)), counts)
    # Shuffled once so that every prefix and every rank's shard is close to the class mix.
    labels = labels[np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(len(labels))]
    if au_names and use_emfacs and not au_stats:
        _announce_prototype_gaps(au_names)
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
        aus = reorder_prototype(vec, order, au_names) if vec is not None else None
        canon_vec = None
        if vec is not None:
            cv = reorder_prototype(vec, order, AU_NAMES)
            canon_vec = np.asarray(cv) if cv is not None else None
        caption, source = None, "templates"
        if captions is not None:
            free, pinned = captions
            pool = pinned.get(name) or free
            caption, source = pool[int(rng.integers(len(pool)))].replace("{expression}", _expression_word(name)), "file"
        elif training_captions is not None:
            caption, source = pick_training_caption(training_captions, name, rng), "training_set"
        if caption is None:
            caption, source = template_caption(name, canon_vec, rng), "templates"
        specs.append(Spec(id=spec_id(seed, index), index=index, label=int(label),
                          aus=tuple(round(float(a), 6) for a in aus) if aus is not None else None,
                          caption=caption, seed=spec_seed(seed, index), caption_source=source))
    return specs


def _announce_prototype_gaps(au_names: Sequence[str]) -> None:
    """EMFACS prototypes are written in the renderer's AUs; say which prototype AUs the generator cannot take."""
    from datamodules.procedural.aus import EMFACS_PROTOTYPES

    used = {canonical_au(a) for proto in EMFACS_PROTOTYPES.values() for a in proto}
    missing = sorted(used - {canonical_au(n) for n in au_names})
    if missing:
        log.warning("EMFACS prototypes use AUs %s that the generator's AU list %s lacks; those parts of the "
                    "prototypes are left out of the specs", missing, list(au_names))


def training_au_stats(cfg: Any, au_names: Sequence[str]) -> Optional[AUStats]:
    """Class-conditional AU vectors of cfg.data.train in the generator's AU order (None when it has no AUs).
    A training set whose AU list lacks one of the generator's AUs is an AUVocabularyError naming both lists."""
    from datamodules.datamodule import FERDataModule, dataset_au_names

    if cfg.data.train is None:
        return None
    declared = dataset_au_names(cfg.data.train)
    if declared is None:
        return None
    missing, _ = au_difference(declared[0], au_names)
    if missing:  # before any record is read: the error names the set's own list, not a shrunk vocabulary
        AUAligner(declared[0], au_names, source_name=f"data.train ({declared[1]})",
                  target_name="the generator's AU list")
    dm = FERDataModule(_train_only(cfg))  # the statistics speak data.train's own AU list, whatever val/test hold
    records = dm.load_records(cfg.data.train, "data.train")
    stats = AUStats.from_records(records, dm.label_space.names, dm.au_names)
    if not stats:
        return None
    align = AUAligner(dm.au_names, au_names, source_name=f"data.train ({declared[1]}, as the run's vocabulary)",
                      target_name="the generator's AU list")
    stats_target = {k: np.asarray([align(list(r)) for r in v]) for k, v in stats.per_class.items()}
    return AUStats(stats_target, au_names)


def _train_only(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    only = OmegaConf.create(OmegaConf.to_container(cfg))
    only.data.val = only.data.test = only.data.synthetic = only.data.au_names = None
    return only


def specs_from_config(cfg: Any, label_names: Sequence[str], au_names: Sequence[str],
                      generator_cfg: Any = None) -> list[Spec]:
    """`generator_cfg`: the generator's own stored config (synthesis.captions=training_set reads its data.train)."""
    y = cfg.synthesis
    stats = None
    if au_names and y.au_source in ("auto", "data"):
        try:
            stats = training_au_stats(cfg, au_names)
        except AUVocabularyError:
            raise  # a set and a model with different AUs: never a silent fallback to prototypes
        except (FileNotFoundError, ValueError) as exc:
            if y.au_source == "data":
                raise
            log.warning("synthesis.au_source=auto: data.train unreadable (%s); using EMFACS prototypes", exc)
        if stats is None and y.au_source == "data":
            raise ValueError("synthesis.au_source=data: data.train has no AU annotations; "
                             "use synthesis.au_source=emfacs")
    mode = caption_mode(y)
    captions = read_captions_file(y.captions_file, label_names) if mode == "file" else None
    training_captions = None
    if mode == "training_set":
        if generator_cfg is None:
            raise ValueError("synthesis.captions=training_set needs the generator's own config (its training set)")
        from lightning_synfer.sampling.prompts import training_set_captions

        training_captions = training_set_captions(generator_cfg)
    per_class = y.per_class
    if per_class is not None and hasattr(per_class, "items"):
        per_class = dict(per_class.items())
    elif per_class is not None:
        per_class = list(per_class)
    return build_specs(int(y.num_images), label_names, au_names, seed=int(y.seed), per_class=per_class,
                       class_balanced=bool(y.class_balanced), au_stats=stats, au_sampling=y.au_sampling,
                       captions=captions, training_captions=training_captions)


def caption_mode(y: Any) -> str:
    """Where the specs' (coarse) captions come from: synthesis.captions, with `auto` = the file when one is given,
    and `llm` = its `synthesis.llm.coarse` description (the LLM rewrites it later, per image)."""
    mode = str(y.captions)
    if mode == "llm":
        mode = str(y.llm.coarse)
    if mode == "auto":
        mode = "file" if y.captions_file else "templates"
    return mode
