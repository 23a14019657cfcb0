"""SSL pre-training throughput: our LightningModule under the Lightning Trainer vs a plain PyTorch loop that
computes the same loss (the module's `compute_loss`: SSL loss + online probe), takes the same optimizer and
warmup-cosine steps and the same EMA-teacher update. Target: Lightning >= 0.95x the plain loop.

Both sides read the same pre-built multi-view batches from memory, so the number isolates framework
overhead (Lightning loop, logging, metrics, hooks) from data loading. Repeats alternate between the two
sides (L, P, L, P, ...) so machine noise hits both; the medians over repeats are reported.

    python benchmarks/bench_ssl.py                                  # MoCo v3, resnet18, 48 px, CPU/GPU auto
    python benchmarks/bench_ssl.py --method dino --backbone resnet50 --image-size 112 --batch 128 --steps 60
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_synfer import optim  # noqa: E402
from lightning_synfer.config import compose, to_container  # noqa: E402
from lightning_synfer.modules.ssl import SSLModule  # noqa: E402
from lightning_synfer.trainer import build_trainer, cosine_with_warmup  # noqa: E402


def make_batches(cfg, n: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b, c, s = cfg.data.batch_size, cfg.data.channels, cfg.data.image_size
    sizes = [s, s] + [cfg.ssl.aug.local_size or max(8, round(s * 96 / 224))] * cfg.ssl.aug.local_crops
    return [{"image": [torch.randn(b, c, v, v, generator=g).to(device) for v in sizes],
             "label": torch.randint(0, cfg.data.num_classes, (b,), generator=g).to(device),
             "domain": torch.zeros(b, dtype=torch.long, device=device)} for _ in range(n)]


class _Timer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self._sync(module)
        self.end = time.perf_counter()


def new_module(cfg):
    torch.manual_seed(0)
    return SSLModule(to_container(cfg), [str(i) for i in range(cfg.data.num_classes)])


def run_lightning(cfg, batches: list[dict], warmup: int) -> float:
    module = new_module(cfg)
    timer = _Timer(warmup)
    trainer = build_trainer(cfg, None, enable_checkpointing=False, callbacks=[timer], max_steps=len(batches),
                            max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            num_sanity_val_steps=0, monitor=None)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return (len(batches) - warmup) * cfg.data.batch_size / (timer.end - timer.start)


def run_plain(cfg, batches: list[dict], warmup: int, device: str) -> float:
    module = new_module(cfg).to(device).train()
    o = cfg.optim
    main = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("probe.")]
    groups = [{"params": [p for p in main if p.ndim > 1], "weight_decay": o.weight_decay},
              {"params": [p for p in main if p.ndim <= 1], "weight_decay": 0.0}]
    if module.probe is not None:
        groups.append({"params": list(module.probe.parameters()), "weight_decay": 0.0})
    opt = optim.build_optimizer(groups, o, optim.scaled_lr(o, cfg.data.batch_size))
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, int(o.warmup_fraction * total), o.min_lr_ratio))
    autocast = cfg.trainer.precision.startswith("bf16")
    start = None
    for step, batch in enumerate(batches):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss = module.compute_loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if hasattr(module, "update_teacher"):
            module.update_teacher(module.momentum_at(step, total))
    if device == "cuda":
        torch.cuda.synchronize()
    return (total - warmup) * cfg.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mocov3", choices=["mocov3", "simclr", "byol", "dino"])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="steps per repeat (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default=None, help="32-true | bf16-mixed (default: bf16 on GPU, 32 on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16-mixed" if device == "cuda" else "32-true")
    experiment = "ssl/embedded_mocov3" if args.method == "mocov3" else f"ssl/embedded_{args.method}"
    cfg = compose(experiment, [
        f"model.backbone={args.backbone}", f"data.image_size={args.image_size}", f"data.channels={args.channels}",
        f"data.batch_size={args.batch}", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.devices=1", "trainer.strategy=auto", f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10"])
    L.seed_everything(0, verbose=False)
    batches = make_batches(cfg, args.steps, device)
    lightning, plain = [], []
    for r in range(args.repeats):
        lightning.append(run_lightning(cfg, batches, args.warmup))
        plain.append(run_plain(cfg, batches, args.warmup, device))
        print(f"repeat {r}: lightning {lightning[-1]:.1f} img/s, plain {plain[-1]:.1f} img/s", flush=True)
    result = {"method": args.method, "backbone": args.backbone, "image_size": args.image_size, "batch": args.batch,
              "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "precision": precision, "steps_timed": args.steps - args.warmup, "repeats": args.repeats,
              "lightning_img_s": statistics.median(lightning), "plain_img_s": statistics.median(plain),
              "lightning_runs": lightning, "plain_runs": plain}
    result["ratio"] = result["lightning_img_s"] / result["plain_img_s"]
    print(json.dumps(result, indent=2))
    print(f"Lightning / plain = {result['ratio']:.3f} (target >= 0.95)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
