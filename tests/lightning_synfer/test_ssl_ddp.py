"""DDP gradient equivalence of every SSL method: 2 gloo processes on CPU, each with half of a global batch,
give the same (all-reduced, averaged, as DDP does) gradients as one process on the whole batch.

What this checks: losses with negatives or batch statistics gather across ranks with correct gradients
(NTXentLoss, MoCoV3Loss key gathering, DINO's all-reduced centre), the kNN metric votes over every rank's
bank and queries, and BatchNorm in the heads sees the global batch once synchronised. torch's SyncBatchNorm only
runs on GPUs, so the 2-process run converts every BatchNorm to `GatherBatchNorm`, a CPU equivalent built on
lightly's differentiable all-gather (on GPUs the Trainer factory converts them to nn.SyncBatchNorm, because the
methods declare `needs_sync_batchnorm`; the last test checks that conversion). The backbone is timm's `test_vit`
(LayerNorm: no batch statistics). Float64, so the 1e-5 tolerance has plenty of margin.
"""
from __future__ import annotations

import json
import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from lightly.utils import dist as lightly_dist

from lightning_synfer.config import compose, to_container
from lightning_synfer.metrics.knn import WeightedKNN
from lightning_synfer.modules.ssl import METHODS as REGISTRY
from lightning_synfer.modules.ssl import SSLModule

METHODS = tuple(REGISTRY.names())  # every registered method, each with its experiments/ssl/embedded_<method>.yaml
GLOBAL_BATCH = 8
WORLD = 2


class GatherBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the samples of every rank (CPU stand-in for nn.SyncBatchNorm; training mode only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        full = torch.cat(lightly_dist.gather(x), 0) if lightly_dist.world_size() > 1 else x
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean, var = full.mean(dims).view(shape), full.var(dims, unbiased=False).view(shape)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new = new.to(next(child.buffers()).dtype)  # before loading: no float32 round trip
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
            else:
                cls.convert(child)
        return module


def _config(method: str, tmp: str) -> dict:
    multi_crop = REGISTRY.get(method).cls.uses_local_crops
    cfg = compose(f"ssl/embedded_{method}", [
        "model.backbone=test_vit", "data.image_size=32", f"paths.runs_dir={tmp}", f"paths.cache_dir={tmp}",
        "ssl.proj_hidden_dim=32", "ssl.pred_hidden_dim=32", "ssl.proj_output_dim=16",
        "ssl.methods.dino.output_dim=64", "ssl.methods.dino.bottleneck_dim=16",
        "ssl.aug.local_crops=" + ("2" if multi_crop else "0"), "ssl.aug.local_size=16"])
    return to_container(cfg)


def _batch(method: str) -> dict:
    g = torch.Generator().manual_seed(1)
    sizes = [32, 32] + ([16, 16] if REGISTRY.get(method).cls.uses_local_crops else [])
    return {"image": [torch.randn(GLOBAL_BATCH, 1, s, s, generator=g, dtype=torch.float64) for s in sizes],
            "label": torch.randint(0, 8, (GLOBAL_BATCH,), generator=g),
            "domain": torch.zeros(GLOBAL_BATCH, dtype=torch.long)}


def _build(method: str, tmp: str, state: dict | None = None) -> nn.Module:
    torch.manual_seed(0)
    module = SSLModule(_config(method, tmp), [str(i) for i in range(8)]).double().train()
    if state is not None:
        module.load_state_dict(state)
    return module


def _grads(module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module.compute_loss(batch)["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, tmp: str, states: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        per = GLOBAL_BATCH // WORLD
        for method in METHODS:
            module = GatherBatchNorm.convert(_build(method, tmp, states[method]))
            batch = _batch(method)
            shard = {"image": [v[rank * per:(rank + 1) * per] for v in batch["image"]],
                     "label": batch["label"][rank * per:(rank + 1) * per],
                     "domain": batch["domain"][rank * per:(rank + 1) * per]}
            grads = _grads(module, shard)
            for g in grads.values():  # what DDP's reducer does: average over ranks
                dist.all_reduce(g)
                g /= WORLD
            out[method] = grads
        # The kNN metric gathers bank and queries from every rank before voting.
        knn = WeightedKNN(num_classes=3, k=5)
        (bank, bank_y), (test, test_y) = _knn_data()
        knn.update(train_features=bank[rank::WORLD], train_targets=bank_y[rank::WORLD])
        knn.update(test_features=test[rank::WORLD], test_targets=test_y[rank::WORLD])
        out["knn_acc"] = knn.compute()
        if rank == 0:
            torch.save(out, os.path.join(tmp, "ddp_grads.pt"))
    finally:
        dist.destroy_process_group()


def _knn_data():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 6, generator=g)
    def sample(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + 0.8 * torch.randn(n, 6, generator=g), y
    return sample(40), sample(20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_gradients_equal_single_process(tmp_path):
    tmp = str(tmp_path)
    states, reference = {}, {}
    for method in METHODS:
        module = _build(method, tmp)
        states[method] = {k: v.clone() for k, v in module.state_dict().items()}
        reference[method] = _grads(module, _batch(method))
    mp.spawn(_worker, args=(_free_port(), tmp, states), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    knn = WeightedKNN(num_classes=3, k=5)
    (bank, bank_y), (test, test_y) = _knn_data()
    knn.update(train_features=bank, train_targets=bank_y)
    knn.update(test_features=test, test_targets=test_y)
    assert ddp["knn_acc"].item() == pytest.approx(knn.compute().item())
    for method in METHODS:
        ref, got = reference[method], ddp[method]
        assert set(ref) == set(got), method
        assert any(k.startswith("projector.") for k in ref), method  # heads (with BN) are covered
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{method} {name}: {m}")


class RecordNorms(L.Callback):
    """Counts the module's BatchNorm layers on every rank once the DDP strategy has set the model up."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, trainer, pl_module) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        counts = {"sync": sum(isinstance(m, nn.SyncBatchNorm) for m in layers), "all": len(layers),
                  "world": trainer.world_size}
        name = f"{type(pl_module).__name__}.rank{trainer.global_rank}.json"
        with open(os.path.join(self.folder, name), "w") as fh:
            json.dump(counts, fh)


@pytest.mark.ddp
def test_factory_gives_sync_batchnorm_to_the_ssl_method_on_two_processes(tmp_path, monkeypatch):
    """Two gloo processes (ddp_fork) through `fit` and the Trainer factory, with trainer.sync_batchnorm left at null:
    MoCo v3 (ResNet-18 backbone + BN heads) trains with nn.SyncBatchNorm only, supervised FER keeps plain BatchNorm.
    torch runs SyncBatchNorm on GPUs only (a CPU forward raises, and DDP refuses to wrap such a CPU module), so the
    factory is told the accelerator can, training is skipped (limit_train_batches=0) and the DDP wrapper is left out:
    what this checks is the conversion that the DDP strategy's setup does with the factory's choice."""
    from lightning.pytorch.strategies.ddp import DDPStrategy

    from lightning_synfer import trainer as factory
    from lightning_synfer.tasks import fit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(factory, "sync_batchnorm_supported", lambda accelerator: True)  # as on GPUs
    monkeypatch.setattr(DDPStrategy, "_setup_model", lambda self, model: model)  # no DistributedDataParallel
    record = RecordNorms(str(tmp_path))
    build = fit.build_trainer
    monkeypatch.setattr(fit, "build_trainer",
                        lambda *a, callbacks=(), **k: build(*a, callbacks=[*callbacks, record], **k))
    common = ["trainer=cpu", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_fork",
              "trainer.limit_train_batches=0", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
              "logger.tensorboard=false", "data.num_workers=0", "data.batch_size=8", "data.image_size=32",
              "data.train.num_images=16", "data.val.num_images=16", "data.test=null", "model.backbone=resnet18",
              f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    for experiment in ("ssl/embedded_mocov3", "supervised/embedded"):
        cfg = compose(experiment, common)
        assert cfg.trainer.sync_batchnorm is None
        fit.run(cfg)
    for rank in range(WORLD):
        moco = json.loads((tmp_path / f"MoCoV3.rank{rank}.json").read_text())
        sup = json.loads((tmp_path / f"SupervisedFER.rank{rank}.json").read_text())
        # ResNet-18 has 20 BatchNorm layers (student + EMA teacher), the heads 5 + 2 + the teacher's projector 3
        assert moco["world"] == sup["world"] == WORLD
        assert moco["all"] > 20 and moco["sync"] == moco["all"], moco
        assert sup["all"] == 20 and sup["sync"] == 0, sup
