"""Real/synthetic mixing: a world-size-invariant, resumable batch sampler plus a loader that tracks consumption.

The training set is ``ConcatDataset([real, synthetic])``: indices ``0..num_real-1`` are real images and
``num_real..num_real+num_synthetic-1`` are synthetic ones. :class:`MixingBatchSampler` decides, for every optimizer
step, which samples form the *global* batch (all ranks together) and hands each rank its slice of it.
:class:`ResumableDataLoader` wraps a ``DataLoader`` around it so Lightning checkpoints can resume mid-epoch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

REAL_DOMAIN = 0
SYNTHETIC_DOMAIN = 1

# Seeds are derived as seed * _SEED_STRIDE + counter, so every (seed, epoch) and every (seed, synthetic pass)
# gets its own generator state; the salt keeps the synthetic stream independent of the real one.
_SEED_STRIDE = 1_000_003
_SYNTHETIC_STREAM_SALT = 0x5EED_0000_0000
_SEED_MODULUS = 2**63
# A handful of synthetic-pass permutations is enough: a step reads at most two consecutive passes.
_MAX_CACHED_PASSES = 4


class SeededBatch(list):
    """A batch of dataset indices (a plain list to every consumer) that also carries one augmentation seed per
    item in ``seeds``. A dataset with ``__getitems__`` (the DataModule's training set) draws each item's random
    augmentation from its own seed instead of the global RNG stream; it pickles to loader workers as it is."""

    def __init__(self, indices: Any = (), seeds: Any = None) -> None:
        super().__init__(indices)
        self.seeds = list(seeds) if seeds is not None else None


_MASK64 = (1 << 64) - 1
_AUGMENT_SALT = 0xA06_0000_0000


def augment_seed(seed: int, counter: int) -> int:
    """A well-mixed 63-bit seed for sample number ``counter`` of the augmentation stream (splitmix64)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + _AUGMENT_SALT + int(counter) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & (_SEED_MODULUS - 1)


def domain_of(index: int, num_real: int) -> int:
    """Domain of a ConcatDataset index: ``REAL_DOMAIN`` (0) for real samples, ``SYNTHETIC_DOMAIN`` (1) otherwise."""
    if index < 0:
        raise ValueError(f"index={index} is negative; ConcatDataset indices start at 0")
    return REAL_DOMAIN if index < num_real else SYNTHETIC_DOMAIN


def _derived_seed(seed: int, counter: int, salt: int = 0) -> int:
    return (seed * _SEED_STRIDE + salt + counter) % _SEED_MODULUS


def _spread_positions(batch_len: int, num_synthetic: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of synthetic and real items when ``num_synthetic`` of ``batch_len`` are spread evenly.

    Even spreading (Bresenham-style) makes every contiguous slice of the batch carry the batch's ratio to within
    one sample, so each rank's shard gets a fair real/synthetic mix for any world size without extra shuffling.
    """
    is_synthetic = torch.zeros(batch_len, dtype=torch.bool)
    if num_synthetic:
        synthetic_positions = ((torch.arange(num_synthetic, dtype=torch.float64) + 0.5) * batch_len / num_synthetic)
        is_synthetic[synthetic_positions.floor().long()] = True
    return is_synthetic.nonzero().flatten(), (~is_synthetic).nonzero().flatten()


class MixingBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of global batches that mix real and synthetic samples at a fixed ratio.

    Ratio: every global batch of ``B = global_batch_size`` samples holds exactly ``k = round(synthetic_ratio * B)``
    synthetic and ``B - k`` real samples (Python ``round``; available as :attr:`synthetic_per_batch`).

    Epoch length:

    * ``synthetic_ratio < 1``: an epoch is one pass over the real set, i.e. ``num_real // (B - k)`` steps with
      ``drop_last`` (``ceil`` otherwise). Synthetic samples come from an endless stream of per-pass permutations of
      the synthetic set that continues across epochs, so no synthetic sample repeats before all were used.
    * ``synthetic_ratio == 1`` (synthetic-only): an epoch draws ``round(synthetic_scale * num_reference)``
      synthetic samples, ``num_reference`` being ``num_real`` when a real set is given and ``num_synthetic``
      otherwise -- the paper's "1x ... 5x the real set's size" training budgets.

    With ``drop_last=False`` the last step is a partial batch: the leftover real samples plus
    ``round(leftover * r / (1 - r))`` synthetic ones (keeping the ratio); for ``r == 1`` the leftover draws. When
    ``world_size > 1`` that partial batch is padded to a multiple of ``world_size`` by repeating its own first items
    (as ``DistributedSampler`` does), so every rank gets an equal, non-empty shard; :meth:`global_batch` returns it
    unpadded.

    Determinism and sharding: all randomness comes from ``torch.Generator`` objects seeded from ``(seed, epoch)``
    (real order) and ``(seed, synthetic pass)`` (synthetic order), never from global RNG. The global batch at a step
    does not depend on ``world_size``; rank ``rank`` takes the contiguous slice ``[rank * B/W, (rank + 1) * B/W)``.
    Real and synthetic items are spread evenly inside the batch, so every rank gets the batch ratio to within one
    sample.

    Resuming: :meth:`state_dict` records ``epoch`` and ``batches_done`` (global steps, identical on every rank, so
    a run can resume on a different world size); after :meth:`load_state_dict` the next :meth:`__iter__` of that
    epoch skips the finished steps. The sampler counts batches as it *yields* them, which with ``num_workers > 0``
    runs ahead of training; :class:`ResumableDataLoader` counts *consumed* batches and is what should be checkpointed.
    """

    def __init__(
        self,
        num_real: int,
        num_synthetic: int,
        *,
        global_batch_size: int,
        synthetic_ratio: float,
        synthetic_scale: float = 1.0,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        _validate_config(num_real, num_synthetic, global_batch_size, synthetic_ratio, synthetic_scale,
                         world_size, rank)
        self.num_real = int(num_real)
        self.num_synthetic = int(num_synthetic)
        self.global_batch_size = int(global_batch_size)
        self.synthetic_ratio = float(synthetic_ratio)
        self.synthetic_scale = float(synthetic_scale)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)

        self.synthetic_per_batch = round(self.synthetic_ratio * self.global_batch_size)
        self.real_per_batch = self.global_batch_size - self.synthetic_per_batch
        _validate_rounding(self.synthetic_ratio, self.global_batch_size, self.synthetic_per_batch)

        self._step_counts = self._plan_step_counts()  # (real, synthetic) per step; identical every epoch
        self._synthetic_per_epoch = sum(synthetic for _, synthetic in self._step_counts)

        self.epoch = 0
        self._resume_from = 0  # steps of `self.epoch` to skip on the next __iter__ (set by load_state_dict)
        self._batches_done = 0  # steps of `self.epoch` yielded so far (or restored)
        self._real_order_cache: tuple[int, torch.Tensor] | None = None
        self._synthetic_pass_cache: dict[int, torch.Tensor] = {}
        self._layout_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # Lightning only calls ``set_epoch`` on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``
    # (lightning.fabric.utilities.data._set_sampler_epoch), never on the batch sampler itself; pointing
    # ``sampler`` at ourselves makes Lightning reshuffle us every epoch.
    @property
    def sampler(self) -> MixingBatchSampler:
        return self

    # ------------------------------------------------------------------ epoch plan

    def _plan_step_counts(self) -> list[tuple[int, int]]:
        full_batch = (self.real_per_batch, self.synthetic_per_batch)
        if self.real_per_batch == 0:  # synthetic-only
            num_reference = self.num_real if self.num_real > 0 else self.num_synthetic
            draws = round(self.synthetic_scale * num_reference)
            full_steps, leftover = divmod(draws, self.global_batch_size)
            partial = (0, leftover)
        else:
            full_steps, leftover = divmod(self.num_real, self.real_per_batch)
            ratio = self.synthetic_ratio
            partial = (leftover, round(leftover * ratio / (1.0 - ratio)))
        steps = [full_batch] * full_steps
        if not self.drop_last and sum(partial) > 0:
            steps.append(partial)
        if not steps:
            raise ValueError(
                f"An epoch would have no batches: global_batch_size={self.global_batch_size} (data.batch_size) "
                f"needs {self.real_per_batch} real and {self.synthetic_per_batch} synthetic samples per step, "
                f"but the epoch only has {self._epoch_budget_description()} with drop_last=True; "
                "use a smaller global batch, more data or drop_last=False"
            )
        return steps

    def _epoch_budget_description(self) -> str:
        if self.real_per_batch == 0:
            num_reference = self.num_real if self.num_real > 0 else self.num_synthetic
            draws = round(self.synthetic_scale * num_reference)
            return f"{draws} synthetic draws (data.mix.synthetic_scale={self.synthetic_scale} x {num_reference})"
        return f"{self.num_real} real samples"

    def _real_order(self) -> torch.Tensor:
        if self._real_order_cache is None or self._real_order_cache[0] != self.epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch))
                order = torch.randperm(self.num_real, generator=generator)
            else:
                order = torch.arange(self.num_real)
            self._real_order_cache = (self.epoch, order)
        return self._real_order_cache[1]

    def _synthetic_pass(self, pass_index: int) -> torch.Tensor:
        order = self._synthetic_pass_cache.get(pass_index)
        if order is None:
            if self.shuffle:
                seed = _derived_seed(self.seed, pass_index, salt=_SYNTHETIC_STREAM_SALT)
                order = torch.randperm(self.num_synthetic, generator=torch.Generator().manual_seed(seed))
            else:
                order = torch.arange(self.num_synthetic)
            if len(self._synthetic_pass_cache) >= _MAX_CACHED_PASSES:
                self._synthetic_pass_cache.pop(min(self._synthetic_pass_cache))
            self._synthetic_pass_cache[pass_index] = order
        return order

    def _synthetic_stream(self, start: int, count: int) -> torch.Tensor:
        """Positions ``start..start+count`` of the endless synthetic stream, as synthetic-set indices."""
        pieces = []
        while count > 0:
            pass_index, offset = divmod(start, self.num_synthetic)
            take = min(count, self.num_synthetic - offset)
            pieces.append(self._synthetic_pass(pass_index)[offset:offset + take])
            start += take
            count -= take
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)

    def _layout(self, num_real: int, num_synthetic: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (num_real, num_synthetic)
        if key not in self._layout_cache:
            self._layout_cache[key] = _spread_positions(num_real + num_synthetic, num_synthetic)
        return self._layout_cache[key]

    # ------------------------------------------------------------------ public API

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``__iter__`` yields; a new epoch clears any pending resume."""
        if epoch != self.epoch:
            self._resume_from = 0
            self._batches_done = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._step_counts)

    def global_batch(self, step: int) -> list[int]:
        """ConcatDataset indices of the whole global batch (all ranks) at ``step`` of the current epoch."""
        if not 0 <= step < len(self):
            raise IndexError(f"step={step} is outside the epoch's {len(self)} steps")
        return self._global_batch_tensor(step).tolist()

    def _global_batch_tensor(self, step: int) -> torch.Tensor:
        num_real, num_synthetic = self._step_counts[step]
        # Every step but a partial last one is full, so earlier steps used exactly real/synthetic_per_batch each.
        real_start = step * self.real_per_batch
        synthetic_start = self.epoch * self._synthetic_per_epoch + step * self.synthetic_per_batch

        synthetic_positions, real_positions = self._layout(num_real, num_synthetic)
        batch = torch.empty(num_real + num_synthetic, dtype=torch.long)
        batch[real_positions] = self._real_order()[real_start:real_start + num_real]
        if num_synthetic:
            batch[synthetic_positions] = self._synthetic_stream(synthetic_start, num_synthetic) + self.num_real
        return batch

    def _rank_shard(self, step: int) -> list[int]:
        batch = self._global_batch_tensor(step)
        if len(batch) % self.world_size:
            # Only a partial last batch gets here: pad by cycling its own items so every rank gets a share.
            padded_len = math.ceil(len(batch) / self.world_size) * self.world_size
            batch = batch[torch.arange(padded_len) % len(batch)]
        shard_size = len(batch) // self.world_size
        return batch[self.rank * shard_size:(self.rank + 1) * shard_size].tolist()

    @property
    def resume_offset(self) -> int:
        """Steps of the current epoch the next ``__iter__`` will skip (non-zero only right after a resume)."""
        return self._resume_from

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_from = self._resume_from, 0
        self._batches_done = start
        for step in range(start, len(self)):
            shard = self._rank_shard(step)
            self._batches_done = step + 1
            yield SeededBatch(shard, self._sample_seeds(step, len(shard)))

    def _sample_seeds(self, step: int, shard_len: int) -> list[int]:
        """One augmentation seed per item of this rank's shard, from (seed, epoch, step, position in the global
        batch): the same sample at the same step gets the same augmentation on any world size, with any number
        of loader workers, and after a mid-epoch resume."""
        first = self.rank * shard_len
        base = (self.epoch * len(self) + step) * self.global_batch_size
        return [augment_seed(self.seed, base + first + j) for j in range(shard_len)]

    def _fingerprint(self) -> dict[str, Any]:
        # world_size/rank are deliberately absent: global batches do not depend on them, so resuming on a
        # different number of devices is valid.
        return {
            "num_real": self.num_real,
            "num_synthetic": self.num_synthetic,
            "global_batch_size": self.global_batch_size,
            "synthetic_ratio": self.synthetic_ratio,
            "synthetic_scale": self.synthetic_scale,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self._batches_done, "config": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_config = state.get("config", {})
        current_config = self._fingerprint()
        changed = {key: (saved_config[key], value) for key, value in current_config.items()
                   if key in saved_config and saved_config[key] != value}
        if changed:
            details = ", ".join(f"{key}: checkpoint={old!r} now={new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                "Cannot resume the mixing sampler: the checkpoint was written with a different data setup "
                f"({details}). Resume with the original data/mix settings or start a fresh run."
            )
        batches_done = int(state["batches_done"])
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done={batches_done} in the checkpoint is outside the epoch's {len(self)} steps")
        self.epoch = int(state["epoch"])
        self._resume_from = batches_done
        self._batches_done = batches_done


def _validate_config(num_real: int, num_synthetic: int, global_batch_size: int, synthetic_ratio: float,
                     synthetic_scale: float, world_size: int, rank: int) -> None:
    if num_real < 0 or num_synthetic < 0:
        raise ValueError(f"Dataset sizes must be >= 0, got num_real={num_real}, num_synthetic={num_synthetic}")
    if not 0.0 <= synthetic_ratio <= 1.0:  # also rejects NaN
        raise ValueError(f"data.mix.synthetic_ratio={synthetic_ratio} is outside the expected range [0, 1]")
    if not synthetic_scale > 0.0 or math.isinf(synthetic_scale):
        raise ValueError(f"data.mix.synthetic_scale={synthetic_scale} must be a finite number > 0 "
                         "(epoch size as a multiple of the real set's size)")
    if synthetic_ratio > 0 and num_synthetic == 0:
        raise ValueError(f"data.mix.synthetic_ratio={synthetic_ratio} asks for synthetic samples, but the synthetic "
                         "dataset is empty (num_synthetic=0); generate/point to synthetic data or set the ratio to 0")
    if synthetic_ratio < 1 and num_real == 0:
        raise ValueError(f"data.mix.synthetic_ratio={synthetic_ratio} asks for real samples, but the real dataset is "
                         "empty (num_real=0); provide real data or set the ratio to 1 (synthetic-only)")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} (data.batch_size) must be >= 1")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} (data.batch_size) must be divisible by "
                         f"world_size={world_size} so every rank gets an equal share of each global batch")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")


def _validate_rounding(synthetic_ratio: float, global_batch_size: int, synthetic_per_batch: int) -> None:
    # A ratio that rounds to a pure batch would silently train on one domain only.
    if 0 < synthetic_ratio and synthetic_per_batch == 0:
        raise ValueError(f"data.mix.synthetic_ratio={synthetic_ratio} with global_batch_size={global_batch_size} "
                         "(data.batch_size) rounds to 0 synthetic samples per batch; "
                         "use a larger batch or a ratio of 0")
    if synthetic_ratio < 1 and synthetic_per_batch == global_batch_size:
        raise ValueError(f"data.mix.synthetic_ratio={synthetic_ratio} with global_batch_size={global_batch_size} "
                         "(data.batch_size) rounds to 0 real samples per batch; "
                         "use a larger batch or a ratio of 1 (synthetic-only)")


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`MixingBatchSampler` whose checkpoint state counts *consumed* batches.

    Lightning 2.x stores ``state_dict()`` of every train dataloader that has ``state_dict``/``load_state_dict``
    in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and calls ``load_state_dict`` when resuming
    from ``ckpt_path``, before it iterates the loader again. Counting here rather than in the sampler matters with
    ``num_workers > 0``: the sampler runs ahead by the prefetched batches, the caller does not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, MixingBatchSampler):
            raise TypeError(f"ResumableDataLoader needs batch_sampler=MixingBatchSampler(...), "
                            f"got {type(self.batch_sampler).__name__}")
        self._consumed_epoch: int | None = None  # epoch of the iteration being counted; None before any
        self._consumed = 0

    @property
    def mixing_sampler(self) -> MixingBatchSampler:
        assert isinstance(self.batch_sampler, MixingBatchSampler)
        return self.batch_sampler

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the sampler's epoch is read on the first next(): Lightning calls iter() on the loader
        # before it calls set_epoch for the epoch.
        sampler = self.mixing_sampler
        self._consumed_epoch = sampler.epoch
        self._consumed = sampler.resume_offset
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state = self.mixing_sampler.state_dict()
        if self._consumed_epoch is not None and self._consumed_epoch == state["epoch"]:
            state["batches_done"] = self._consumed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixing_sampler.load_state_dict(state_dict)
        self._consumed_epoch = None
        self._consumed = 0
