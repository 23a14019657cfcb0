"""Contract tests for the real/synthetic mixing sampler and its checkpointable DataLoader."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.mixing import (
    REAL_DOMAIN,
    SYNTHETIC_DOMAIN,
    MixingBatchSampler,
    ResumableDataLoader,
    domain_of,
)

NUM_REAL, NUM_SYNTHETIC = 103, 61


def make_sampler(**overrides) -> MixingBatchSampler:
    config = dict(num_real=NUM_REAL, num_synthetic=NUM_SYNTHETIC, global_batch_size=16, synthetic_ratio=0.5, seed=7)
    config.update(overrides)
    return MixingBatchSampler(config.pop("num_real"), config.pop("num_synthetic"), **config)


def all_global_batches(sampler: MixingBatchSampler) -> list[list[int]]:
    return [sampler.global_batch(step) for step in range(len(sampler))]


def rank_batches(world_size: int, epoch: int = 0, **overrides) -> list[list[list[int]]]:
    """[rank][step] -> shard, from one sampler per rank as each DDP process would build it."""
    shards = []
    for rank in range(world_size):
        sampler = make_sampler(world_size=world_size, rank=rank, **overrides)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    return shards


def count_synthetic(indices: list[int], num_real: int = NUM_REAL) -> int:
    return sum(domain_of(index, num_real) == SYNTHETIC_DOMAIN for index in indices)


# ---------------------------------------------------------------- ratio and epoch length

@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.33, 1.0])
def test_every_global_batch_has_the_exact_synthetic_share(ratio):
    batch_size = 12
    sampler = make_sampler(synthetic_ratio=ratio, global_batch_size=batch_size)
    expected_synthetic = round(ratio * batch_size)  # 0.33 * 12 = 3.96 -> 4
    assert sampler.synthetic_per_batch == expected_synthetic
    for batch in all_global_batches(sampler):
        assert len(batch) == batch_size
        assert count_synthetic(batch) == expected_synthetic


def test_epoch_is_one_pass_over_the_real_set():
    sampler = make_sampler(synthetic_ratio=0.25, global_batch_size=16)  # 12 real per batch
    assert len(sampler) == NUM_REAL // 12
    assert len(make_sampler(synthetic_ratio=0.25, global_batch_size=16, drop_last=False)) == -(-NUM_REAL // 12)


def test_drop_last_false_covers_every_real_sample_and_keeps_the_ratio_in_the_last_batch():
    sampler = make_sampler(synthetic_ratio=0.25, global_batch_size=16, drop_last=False)
    batches = all_global_batches(sampler)
    real = [index for batch in batches for index in batch if index < NUM_REAL]
    assert sorted(real) == list(range(NUM_REAL))
    leftover_real = NUM_REAL % 12
    assert len(batches[-1]) - count_synthetic(batches[-1]) == leftover_real
    assert count_synthetic(batches[-1]) == round(leftover_real * 0.25 / 0.75)


def test_synthetic_stream_uses_every_sample_before_repeating_across_epochs():
    sampler = make_sampler(synthetic_ratio=0.5, global_batch_size=16)  # 8 synthetic per step, 12 steps
    drawn = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn += [index for batch in all_global_batches(sampler) for index in batch if index >= NUM_REAL]
    for start in range(0, len(drawn) - NUM_SYNTHETIC + 1, NUM_SYNTHETIC):
        assert sorted(drawn[start:start + NUM_SYNTHETIC]) == list(range(NUM_REAL, NUM_REAL + NUM_SYNTHETIC))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_synthetic_only_epoch_length_scales_with_the_real_set(scale):
    sampler = make_sampler(synthetic_ratio=1.0, synthetic_scale=scale, global_batch_size=8)
    assert len(sampler) == round(scale * NUM_REAL) // 8
    counts = Counter(index for batch in all_global_batches(sampler) for index in batch)
    assert all(index >= NUM_REAL for index in counts)
    # Draws run through whole permutations, so counts differ by at most one between samples.
    assert max(counts.values()) - min(counts.values()) <= 1


def test_synthetic_only_without_real_set_scales_with_the_synthetic_set():
    sampler = make_sampler(num_real=0, synthetic_ratio=1.0, synthetic_scale=2.0, global_batch_size=8)
    assert len(sampler) == round(2.0 * NUM_SYNTHETIC) // 8
    assert all(0 <= index < NUM_SYNTHETIC for batch in all_global_batches(sampler) for index in batch)


# ---------------------------------------------------------------- sharding and world-size invariance

@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_rank_shards_are_disjoint_and_make_up_the_global_batch(world_size, ratio):
    shards = rank_batches(world_size, synthetic_ratio=ratio)
    reference = make_sampler(synthetic_ratio=ratio)
    assert all(len(rank_shards) == len(reference) for rank_shards in shards)
    for step in range(len(reference)):
        step_shards = [shards[rank][step] for rank in range(world_size)]
        assert all(len(shard) == 16 // world_size for shard in step_shards)
        combined = [index for shard in step_shards for index in shard]
        assert len(set(combined)) == len(combined)
        assert sorted(combined) == sorted(reference.global_batch(step))
    if ratio < 1:
        real = [index for rank_shards in shards for shard in rank_shards for index in shard if index < NUM_REAL]
        assert len(real) == len(set(real)) == (NUM_REAL // reference.real_per_batch) * reference.real_per_batch


@pytest.mark.parametrize("world_size", [2, 4])
def test_partial_last_batch_is_padded_so_every_rank_gets_a_share(world_size):
    shards = rank_batches(world_size, synthetic_ratio=0.25, drop_last=False)
    reference = make_sampler(synthetic_ratio=0.25, drop_last=False)
    real = {index for rank_shards in shards for shard in rank_shards for index in shard if index < NUM_REAL}
    assert real == set(range(NUM_REAL))
    last = [shards[rank][-1] for rank in range(world_size)]
    assert len({len(shard) for shard in last}) == 1 and last[0]
    assert {index for shard in last for index in shard} == set(reference.global_batch(len(reference) - 1))


def test_global_batches_do_not_depend_on_world_size():
    per_world = {}
    for world_size in (1, 2, 4):
        shards = rank_batches(world_size, epoch=3, synthetic_ratio=0.33)
        steps = len(shards[0])
        per_world[world_size] = [Counter(i for rank in range(world_size) for i in shards[rank][step])
                                 for step in range(steps)]
    assert per_world[1] == per_world[2] == per_world[4]


def test_each_rank_gets_the_batch_ratio_to_within_one_sample():
    world_size = 4
    shards = rank_batches(world_size, synthetic_ratio=0.25, global_batch_size=32)
    expected = 0.25 * 32 / world_size
    for rank_shards in shards:
        for shard in rank_shards:
            assert abs(count_synthetic(shard) - expected) <= 1


# ---------------------------------------------------------------- determinism and resume

def test_same_seed_and_epoch_give_same_batches_and_set_epoch_reshuffles():
    first, second = make_sampler(), make_sampler()
    assert all_global_batches(first) == all_global_batches(second)
    first.set_epoch(1)
    assert all_global_batches(first) != all_global_batches(second)
    second.set_epoch(1)
    assert all_global_batches(first) == all_global_batches(second)
    assert all_global_batches(make_sampler(seed=8)) != all_global_batches(make_sampler(seed=7))


def test_sampler_ignores_global_rng():
    torch.manual_seed(0)
    before = all_global_batches(make_sampler())
    torch.manual_seed(1234)
    torch.rand(10)
    assert all_global_batches(make_sampler()) == before


def test_shuffle_false_keeps_dataset_order():
    sampler = make_sampler(shuffle=False, synthetic_ratio=0.0)
    assert sampler.global_batch(0) == list(range(16))


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(world_size):
    for rank in range(world_size):
        original = make_sampler(world_size=world_size, rank=rank)
        original.set_epoch(2)
        full_epoch = list(original)
        iterator = iter(original)
        consumed = [next(iterator) for _ in range(5)]
        state = original.state_dict()
        assert state["epoch"] == 2 and state["batches_done"] == 5

        resumed = make_sampler(world_size=world_size, rank=rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # what Lightning does at the start of the resumed epoch: must not drop the skip
        assert consumed + list(resumed) == full_epoch
        assert list(resumed) == full_epoch  # the skip applies to one pass only


def test_resume_on_another_world_size_continues_the_same_global_batches():
    original = make_sampler(world_size=1)
    batches = list(original)
    state = make_sampler(world_size=1).state_dict() | {"batches_done": 4}
    remaining = []
    for rank in range(2):
        resumed = make_sampler(world_size=2, rank=rank)
        resumed.load_state_dict(state)
        remaining.append(list(resumed))
    for step, batch in enumerate(batches[4:]):
        assert sorted(remaining[0][step] + remaining[1][step]) == sorted(batch)


def test_load_state_dict_rejects_a_different_data_setup():
    state = make_sampler(synthetic_ratio=0.5).state_dict()
    with pytest.raises(ValueError, match="synthetic_ratio"):
        make_sampler(synthetic_ratio=0.25).load_state_dict(state)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio_names_the_config_key_and_range(ratio):
    with pytest.raises(ValueError, match=r"data\.mix\.synthetic_ratio=.*\[0, 1\]"):
        make_sampler(synthetic_ratio=ratio)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_bad_scale_names_the_config_key(scale):
    with pytest.raises(ValueError, match=r"data\.mix\.synthetic_scale"):
        make_sampler(synthetic_ratio=1.0, synthetic_scale=scale)


def test_batch_not_divisible_by_world_size_names_both():
    with pytest.raises(ValueError, match=r"global_batch_size=18.*world_size=4"):
        make_sampler(global_batch_size=18, world_size=4)


def test_missing_domain_is_named():
    with pytest.raises(ValueError, match="synthetic dataset is empty"):
        make_sampler(num_synthetic=0, synthetic_ratio=0.5)
    with pytest.raises(ValueError, match="real dataset is empty"):
        make_sampler(num_real=0, synthetic_ratio=0.5)
    assert len(make_sampler(num_synthetic=0, synthetic_ratio=0.0)) == NUM_REAL // 16


def test_ratio_that_rounds_to_a_single_domain_is_rejected():
    with pytest.raises(ValueError, match="rounds to 0 synthetic"):
        make_sampler(synthetic_ratio=0.01, global_batch_size=16)
    with pytest.raises(ValueError, match="rounds to 0 real"):
        make_sampler(synthetic_ratio=0.99, global_batch_size=16)


def test_epoch_without_a_single_full_batch_is_rejected():
    with pytest.raises(ValueError, match="no batches"):
        make_sampler(num_real=5, global_batch_size=16)
    assert len(make_sampler(num_real=5, global_batch_size=16, drop_last=False)) == 1


def test_domain_of():
    assert domain_of(0, 5) == REAL_DOMAIN and domain_of(4, 5) == REAL_DOMAIN
    assert domain_of(5, 5) == SYNTHETIC_DOMAIN
    with pytest.raises(ValueError):
        domain_of(-1, 5)


# ---------------------------------------------------------------- DataLoader integration

class IndexDataset(Dataset):
    """Returns its own index so batches reveal exactly which samples were drawn."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


def loader_batches(loader) -> list[list[int]]:
    return [batch.flatten().long().tolist() for batch in loader]


def test_worker_processes_give_the_same_batches_as_the_main_process():
    dataset = IndexDataset(NUM_REAL + NUM_SYNTHETIC)
    in_process = DataLoader(dataset, batch_sampler=make_sampler(world_size=2, rank=1), num_workers=0)
    with_workers = DataLoader(dataset, batch_sampler=make_sampler(world_size=2, rank=1), num_workers=2)
    assert loader_batches(in_process) == loader_batches(with_workers)


def test_stateful_loader_counts_consumed_not_prefetched_batches():
    dataset = IndexDataset(NUM_REAL + NUM_SYNTHETIC)
    loader = ResumableDataLoader(dataset, batch_sampler=make_sampler(), num_workers=2, prefetch_factor=2)
    full_epoch = loader_batches(loader)
    iterator = iter(loader)
    consumed = [next(iterator).flatten().long().tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["batches_done"] == 3
    assert loader.mixing_sampler.state_dict()["batches_done"] > 3  # workers were fed ahead
    del iterator

    resumed = ResumableDataLoader(dataset, batch_sampler=make_sampler(), num_workers=0)
    resumed.load_state_dict(state)
    assert consumed + loader_batches(resumed) == full_epoch


def test_stateful_loader_requires_the_mixing_sampler():
    with pytest.raises(TypeError, match="MixingBatchSampler"):
        ResumableDataLoader(IndexDataset(4), batch_size=2)


# ---------------------------------------------------------------- Lightning checkpoint/resume

lightning = pytest.importorskip("lightning")


class RecordingModule(lightning.LightningModule):
    """Smallest trainable module; remembers every batch it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.flatten().long().tolist())
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


LIGHTNING_DATA = dict(num_real=40, num_synthetic=23, global_batch_size=8)  # 4 real per step -> 10 steps/epoch


def fit(tmp_path, max_steps, ckpt_path=None, callbacks=(), num_workers=0):
    sampler = make_sampler(**LIGHTNING_DATA)
    loader = ResumableDataLoader(IndexDataset(40 + 23), batch_sampler=sampler, num_workers=num_workers)
    model = RecordingModule()
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return model.seen, trainer


def expected_lightning_batches(epochs: int) -> list[list[int]]:
    reference = make_sampler(**LIGHTNING_DATA)
    batches = []
    for epoch in range(epochs):
        reference.set_epoch(epoch)
        batches += all_global_batches(reference)
    return batches


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_from_mid_epoch_checkpoint_sees_exactly_the_remaining_batches(tmp_path, num_workers):
    steps_per_epoch = len(make_sampler(**LIGHTNING_DATA))
    expected = expected_lightning_batches(2)

    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    seen_before, _ = fit(tmp_path, max_steps=3, callbacks=[checkpoint], num_workers=num_workers)
    assert seen_before == expected[:3]

    # Resume into the next epoch too: that only reshuffles if Lightning's set_epoch reaches the sampler.
    total_steps = steps_per_epoch + 2
    seen_after, trainer = fit(tmp_path, max_steps=total_steps, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt",
                              num_workers=num_workers)
    assert seen_after == expected[3:total_steps]
    assert trainer.global_step == total_steps


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_from_last_batch_checkpoint_starts_the_next_epoch(tmp_path):
    steps_per_epoch = len(make_sampler(**LIGHTNING_DATA))
    expected = expected_lightning_batches(2)
    checkpoint = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=steps_per_epoch, save_top_k=-1, filename="{step}")
    fit(tmp_path, max_steps=steps_per_epoch, callbacks=[checkpoint])

    seen_after, trainer = fit(tmp_path, max_steps=steps_per_epoch + 3,
                              ckpt_path=tmp_path / "ckpt" / f"step={steps_per_epoch}.ckpt")
    assert seen_after == expected[steps_per_epoch:steps_per_epoch + 3]
    assert trainer.global_step == steps_per_epoch + 3
