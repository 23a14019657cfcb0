"""Tests compose the real experiment configs and shrink them (lightning-hydra-template style)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# trainer.precision: auto picks bf16 on CPUs with AMX and fp32 elsewhere; CI lands on either kind of box, so the
# suite's numbers must not depend on it: its runs see a CPU without native bf16 (test_hardware.py fakes both).
os.environ.setdefault("SYNFER_CPU_BF16", "0")

import torch  # noqa: E402

# Tiny models run fastest on one thread, and `make test` runs two pytest workers (one per core).
torch.set_num_threads(1)

# Shrinks any experiment to seconds on CPU: tiny embedded splits, tiny batches, no workers.
TINY = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.image_size=32",
]
TINY_EMBEDDED = TINY + [
    "data.train.num_images=64",
    "data.val.num_images=32",
    "data.test.num_images=32",
]


def tiny_overrides(tmp_path: Path, *extra: str, embedded: bool = True) -> list[str]:
    base = TINY_EMBEDDED if embedded else TINY
    return [*base, f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.fixture
def tiny(tmp_path):
    """tiny(*overrides) -> list of overrides that shrink a config into tmp_path."""
    return lambda *extra, embedded=True: tiny_overrides(tmp_path, *extra, embedded=embedded)
