#!/usr/bin/env python
"""Training-step throughput of ResNet-18 at 48 px grayscale: fp32 against bf16 autocast (+ channels_last), with and
without the stem max-pool (model.small_input). Variants run in one process, one after another, so the ratios compare
like with like. bf16 pays off on CPUs with AMX / AVX512-BF16 (recent Xeons) and on GPUs; elsewhere it is emulated and
many times slower. The first lines say what `trainer.precision=auto` picks on this machine (lightning_synfer/hardware.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_precision.py [--batch 64] [--steps 8] [--threads 1]
        [--model synfer_cnn_s --size 32] [--no-bf16]   # the main job's small CNN; fp32 layouts only
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F

from lightning_synfer.models import small_cnn  # noqa: F401  (registers synfer_cnn_* with timm)
from lightning_synfer import hardware


def images_per_s(model: torch.nn.Module, batch: int, steps: int, bf16: bool, channels_last: bool,
                 size: int = 48) -> float:
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 7, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    warm = sorted(times[2:])  # the first steps pick kernels
    return batch / warm[len(warm) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="resnet18", help="a timm name (synfer_cnn_s: the main job's classifier)")
    ap.add_argument("--size", type=int, default=48, help="input size in px")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 layouts only (bf16 is slow where emulated)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = hardware.describe({"accelerator": "cpu", "precision": "auto"}, {"channels_last": "auto"})
    print(f"CPU: {info['cpu_model']} (torch capability {info['cpu_capability']}, {args.threads} thread(s))")
    print(f"trainer.precision=auto picks {info['precision']}: {info['precision_reason']}; "
          f"model.channels_last=auto picks {info['channels_last']}\n")
    variants = [(False, False), (False, True)] + ([] if args.no_bf16 else [(True, False), (True, True)])
    heads = ["fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last"][:len(variants)]
    print(f"| {args.model} {args.size} px | " + " | ".join(f"{h} img/s" for h in heads) + " | best / fp32 |")
    print("|---" * (len(heads) + 2) + "|")
    for small_input in ((False, True) if args.model == "resnet18" else (False,)):
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=7, in_chans=1)
        if small_input:
            model.maxpool = torch.nn.Identity()  # what model.small_input=true does
        rates = [images_per_s(model, args.batch, args.steps, bf16, cl, args.size) for bf16, cl in variants]
        name = ("no max-pool (small_input)" if small_input else "max-pool (timm default)") \
            if args.model == "resnet18" else "as registered"
        print(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {max(rates[1:]) / rates[0]:.2f}x |")


if __name__ == "__main__":
    main()
