"""K-shot sets: exactly K images of every class, drawn with a seed (`data.<source>.shots`, `shots_seed`).

The few-shot protocol of the FER literature: an episode is one K-shot draw of the training split; several seeds
give several episodes, and results are reported as mean ± std over them (`run.py table` groups over `seed`, which
is the draw's seed unless `shots_seed` is set). The draw:

- considers every class of the run's label space; a class with fewer than K images (none, for a class the
  dataset lacks) is an error naming the class, its count and the key;
- within a class, picks K records uniformly without replacement with numpy's PCG64 seeded by `seed`, each class
  from its own stream (`SeedSequence([seed, class index])`), so K-shot sets of one seed are nested: the 5 shots of
  a class contain its 1 shot, and adding a class leaves the others' picks alone;
- keeps the records in their dataset order, so the result does not depend on how records were grouped.

It reads labels only (no images): it is applied after `num_images` and after the header scan, so the K shots are
readable files.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from datamodules.records import Record


class NotEnoughShotsError(ValueError):
    """A class has fewer than K images in the split a K-shot set is drawn from."""


def draw_shots(records: Sequence[Record], shots: int, seed: int, label_names: Sequence[str], *,
               key: str = "data.train.shots") -> list[Record]:
    """The K-shot subset of `records`: `shots` records of every class of `label_names`, in dataset order."""
    if shots <= 0:
        raise ValueError(f"{key}={shots}: expected K > 0 images per class")
    by_class: dict[int, list[int]] = {c: [] for c in range(len(label_names))}
    for i, rec in enumerate(records):
        if rec.label in by_class:
            by_class[rec.label].append(i)
    short = {label_names[c]: len(ix) for c, ix in by_class.items() if len(ix) < shots}
    if short:
        raise NotEnoughShotsError(
            f"{key}={shots}: the split has fewer than {shots} images of class(es) "
            + ", ".join(f"{name} ({n})" for name, n in short.items())
            + f"; expected at least {shots} of each of {list(label_names)} (lower K, or use data.num_classes "
              f"for a label space the split covers)")
    keep: list[int] = []
    for c, indices in by_class.items():
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), c]))
        order = rng.permutation(len(indices))
        # the first K of one permutation: a larger K extends a smaller one's picks (nested episodes)
        keep.extend(indices[j] for j in order[:shots])
    return [records[i] for i in sorted(keep)]
