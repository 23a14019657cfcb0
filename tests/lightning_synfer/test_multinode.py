"""A 2-node x 1-process DDP job on localhost (gloo, CPU) trains to the same weights as one process.

Two `python run.py fit` processes get torchrun's environment (TORCHELASTIC_RUN_ID, RANK, GROUP_RANK = node
rank, LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR/PORT), so Lightning picks TorchElasticEnvironment
and checks devices x num_nodes against WORLD_SIZE, as on a real cluster. data.batch_size is the GLOBAL batch:
the MixingBatchSampler gives each rank the half of every global batch (real and synthetic, ratio 0.5, via the
embedded synthetic stand-in). With equal per-rank batches, DDP's average of the ranks' mean-loss gradients is
the gradient of the global mean loss, so after a few SGD steps the weights must match the single-process
run's. The backbone (timm test_vit) has LayerNorm only, no batch statistics; no dropout, no augmentation;
float64 so the tolerance is about the algorithm, not summation order.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_synfer.config import compose
from lightning_synfer.modules import module_class
from lightning_synfer.tasks import fit
from lightning_synfer.tasks.common import module_kwargs

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4  # 16 real / (8 * 0.5 real per global batch)


def _overrides(tmp: Path) -> list[str]:
    return [
        "experiment=supervised/embedded", "trainer=cpu", "trainer.max_epochs=1", "trainer.deterministic=true",
        "trainer.precision=64-true", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "logger.tensorboard=false", "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=8",
        "data.image_size=32", "data.augment.preset=none", "data.train.num_images=16", "data.val.num_images=8",
        "data.test=null", "data.synthetic={format: embedded, split: train, seed: 1000, num_images: 16}",
        "data.mix.synthetic_ratio=0.5", "model.backbone=test_vit", "model.drop_rate=0", "model.drop_path_rate=0",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=0", "optim.scheduler=constant",
        f"paths.runs_dir={tmp / 'runs'}", f"paths.cache_dir={tmp / 'cache'}",
    ]


# `run.py fit` with a callback that records which samples each rank trains on (what DDP sharding did).
DRIVER = """
import sys
sys.path.insert(0, sys.argv.pop(1))
sys.path.insert(0, sys.argv.pop(1))
import lightning_synfer.tasks.fit as fit
from test_multinode import recording
fit.build_trainer = recording(fit.build_trainer)
from lightning_synfer.cli import main
sys.exit(main())
"""


class RecordBatches(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pairs = [[int(d), int(i)] for d, i in zip(batch["domain"], batch["index"])]
        with open(os.environ["SYNFER_TEST_BATCHES"] + f".rank{trainer.global_rank}", "a") as fh:
            fh.write(json.dumps(pairs) + "\n")


def recording(build_trainer):
    def wrapped(*args, callbacks=(), **kwargs):
        return build_trainer(*args, callbacks=[*callbacks, RecordBatches()], **kwargs)
    return wrapped


def _batches(prefix: Path, rank: int) -> list[list[list[int]]]:
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.ddp
def test_two_nodes_match_one_process(tmp_path, monkeypatch):
    # The single-process reference first: it also renders the embedded splits into the shared cache.
    single = tmp_path / "single"
    monkeypatch.setenv("SYNFER_TEST_BATCHES", str(tmp_path / "single_batches"))
    monkeypatch.setattr(fit, "build_trainer", recording(fit.build_trainer))
    cfg = compose(None, [*_overrides(tmp_path), f"run_dir={single}"])
    assert fit.run(cfg)["global_step"] == STEPS

    ddp = tmp_path / "ddp"
    port = _free_port()
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_")) and k not in (
                 "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "SYNFER_RUN_STAMP")}
    procs = []
    for node in range(2):
        env = {**clean, "TORCHELASTIC_RUN_ID": "synfer-test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(node), "GROUP_RANK": str(node), "NODE_RANK": str(node),
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
               "SYNFER_TEST_BATCHES": str(tmp_path / "ddp_batches")}
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(ROOT), str(Path(__file__).parent), "fit", *_overrides(tmp_path),
             f"run_dir={ddp}",
             "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = "\n".join(f"--- node {i}\n" + (tmp_path / f"node{i}.log").read_text()[-3000:] for i in range(2))
    assert [p.returncode for p, _ in procs] == [0, 0], logs
    assert json.loads((ddp / "metrics.json").read_text())["global_step"] == STEPS, logs

    # every global batch: rank 0 took its first half, rank 1 the second, each with 2 real + 2 synthetic
    whole, rank0, rank1 = (_batches(tmp_path / "single_batches", 0), _batches(tmp_path / "ddp_batches", 0),
                           _batches(tmp_path / "ddp_batches", 1))
    assert len(whole) == len(rank0) == len(rank1) == STEPS
    for batch, first, second in zip(whole, rank0, rank1):
        assert first + second == batch
        assert sorted(d for d, _ in first) == sorted(d for d, _ in second) == [0, 0, 1, 1]

    ref, got = _weights(single), _weights(ddp)
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # not vacuous: training moved the weights far beyond the tolerance
    L.seed_everything(cfg.seed, verbose=False)
    start = module_class("supervised")(**module_kwargs(cfg, [str(i) for i in range(cfg.data.num_classes)]))
    moved = max((ref[k] - v.to(ref[k])).abs().max().item() for k, v in start.state_dict().items() if k in ref)
    assert moved > 1e-2
