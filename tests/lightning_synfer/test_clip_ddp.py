"""DDP gradient equivalence of the `clip` task's contrastive loss, as test_ssl_ddp.py checks the SSL losses: 2 gloo
processes on CPU, each with half of a global batch of image-caption pairs, give the same (all-reduced, averaged, as
DDP does) gradients as one process on the whole batch, for every parameter of both towers and the temperature.

The loss gathers image and text embeddings with lightly's differentiable all-gather (losses/clip.py). Without the
gather each rank would contrast its pairs with its own half only, which the last assertion shows differs. Towers:
timm's `test_vit` (LayerNorm, no batch statistics) and the tiny BERT text tower, in eval mode (no dropout), float64.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_synfer.config import compose, to_container

GLOBAL_BATCH = 8
WORLD = 2
CAPTIONS = [f"a photo of a {age} {who} looking {mood}" for age, who, mood in zip(
    ["young", "old", "young", "middle-aged", "old", "young", "old", "young"],
    ["man", "woman", "woman", "man", "man", "person", "woman", "man"],
    ["happy", "sad", "angry", "surprised", "scared", "disgusted", "calm", "contemptuous"])]


def _build(tmp: str, state: dict | None = None):
    from lightning_synfer.modules.clip import CLIPModule

    cfg = compose("zeroshot/embedded_tiny", [
        "clip.image_tower=test_vit", "data.image_size=32", "clip.text_dim=16", "clip.text_layers=1",
        "clip.text_vocab_size=128", "clip.embed_dim=8", f"paths.runs_dir={tmp}", f"paths.cache_dir={tmp}"])
    torch.manual_seed(0)
    module = CLIPModule(to_container(cfg), [str(i) for i in range(8)]).double().eval()
    if state is not None:
        module.load_state_dict(state)
    return module


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(GLOBAL_BATCH, 1, 32, 32, generator=g, dtype=torch.float64), "caption": CAPTIONS}


def _grads(module, batch: dict) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module.compute_loss(batch).backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, tmp: str, state: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        module = _build(tmp, state)
        per = GLOBAL_BATCH // WORLD
        batch = _batch()
        shard = {"image": batch["image"][rank * per:(rank + 1) * per],
                 "caption": batch["caption"][rank * per:(rank + 1) * per]}
        for gather in (True, False):
            module.loss.gather_distributed = gather
            grads = _grads(module, shard)
            for g in grads.values():  # what DDP's reducer does: average over ranks
                dist.all_reduce(g)
                g /= WORLD
            if rank == 0:
                torch.save(grads, os.path.join(tmp, f"ddp_grads_{gather}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_gradients_equal_single_process(tmp_path):
    tmp = str(tmp_path)
    module = _build(tmp)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    reference = _grads(module, _batch())
    assert any(k.startswith("encoder.image_tower.") for k in reference)
    assert any(k.startswith("encoder.text_tower.") for k in reference) and "encoder.logit_scale" in reference
    mp.spawn(_worker, args=(_free_port(), tmp, state), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp_grads_True.pt", weights_only=True)
    assert set(ddp) == set(reference)
    for name in reference:
        torch.testing.assert_close(ddp[name], reference[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    local = torch.load(tmp_path / "ddp_grads_False.pt", weights_only=True)
    assert not torch.allclose(local["encoder.logit_scale"], reference["encoder.logit_scale"], rtol=1e-3)
