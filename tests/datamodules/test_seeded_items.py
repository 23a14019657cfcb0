"""SeededConcatDataset seeds each training item's augmentation on the CPU generator only."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from datamodules.datamodule import SeededConcatDataset
from datamodules.mixing import SeededBatch


class _RandomItems(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(())


def test_item_seeds_reach_only_the_cpu_generator(monkeypatch):
    # torch.manual_seed also seeds every CUDA/XPU device (without CUDA it queues the call with a formatted stack
    # trace, ~1.7 ms an item, as slow as a small CNN's training step) and fork_rng(devices=[]) does not restore them.
    def no_device_seeding(seed):
        raise AssertionError("SeededConcatDataset seeded an accelerator RNG")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_device_seeding)
    monkeypatch.setattr(torch.xpu, "manual_seed_all", no_device_seeding, raising=False)
    dataset = SeededConcatDataset([_RandomItems()])
    before = torch.get_rng_state()
    first = dataset.__getitems__(SeededBatch([0, 1], [7, 8]))
    again = dataset.__getitems__(SeededBatch([1, 0], [8, 7]))
    assert [float(x) for x in first] == [float(x) for x in reversed(again)]  # an item's draw follows its seed
    assert float(first[0]) != float(first[1])
    assert torch.equal(torch.get_rng_state(), before)  # the global CPU stream is left as it was
