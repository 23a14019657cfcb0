"""Training-step speed of GeneratorModule (inside a Lightning Trainer) vs a plain diffusers-style loop.

Both run the same work on the same batch: noise + timesteps, add_noise, text projection of cached caption
embeddings, AU adapter, UNet with the AU processors, MSE (+ min-SNR), backward, AdamW step, EMA step. They are
interleaved step by step inside one process (one Trainer step, then one plain step, ...), so machine load hits
both alike. Prints medians and ours/plain throughput ratio (target >= 0.95x).

    python benchmarks/bench_generator_train.py                      # tiny profile, 32 px gray, batch 64 (CPU)
    python benchmarks/bench_generator_train.py --steps 40 --device cuda --precision bf16-mixed
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from lightning_synfer.config import compose  # noqa: E402
from lightning_synfer.config.compose import to_container  # noqa: E402
from lightning_synfer.modules.generator import GeneratorModule  # noqa: E402

LABELS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]


class PlainLoop:
    """What a hand-written diffusers training script does with the same parts."""

    def __init__(self, module: GeneratorModule, lr: float, device: torch.device, autocast: bool) -> None:
        self.unet = copy.deepcopy(module.unet).to(device).train()
        self.adapter = copy.deepcopy(module.au_adapter).to(device) if module.au_adapter is not None else None
        self.proj = copy.deepcopy(module.text_proj).to(device)
        self.sched = module.noise_scheduler
        self.ac = module.noise_scheduler.alphas_cumprod.to(device)
        self.gamma = module.gcfg.snr_gamma
        self.params = [p for p in list(self.unet.parameters()) + list(self.proj.parameters())
                       if p.requires_grad]
        if self.adapter is not None:  # the processors are already in the UNet: add only the MLP + norm
            self.params += [p for n, p in self.adapter.named_parameters() if not n.startswith("processors.")]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.ema = EMAModel(self.params, decay=0.999, foreach=True)
        self.ema.to(device=device)
        self.device, self.autocast = device, autocast

    def step(self, batch: dict, text_emb: torch.Tensor) -> float:
        x0 = batch["image"]
        b = x0.shape[0]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            cond = self.proj(text_emb)
            if self.adapter is not None:
                cond = torch.cat([cond, self.adapter(batch["aus"])], dim=1)
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.sched.config.num_train_timesteps, (b,), device=self.device)
            x_t = self.sched.add_noise(x0, noise, t)
            pred = self.unet(x_t, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            if self.gamma:
                snr = self.ac[t] / (1 - self.ac[t])
                loss = loss * torch.clamp(snr, max=self.gamma) / snr
            loss = loss.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.params)
        return float(loss)


class Interleave(L.Callback):
    def __init__(self, plain: PlainLoop, batch: dict, text_emb: torch.Tensor, warmup: int) -> None:
        self.plain, self.batch, self.text_emb, self.warmup = plain, batch, text_emb, warmup
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self.prev = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.prev is not None and batch_idx > self.warmup:
            self.ours.append(now - self.prev)
        if self.plain.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.plain.step(self.batch, self.text_emb)
        if self.plain.device.type == "cuda":
            torch.cuda.synchronize()
        if batch_idx > self.warmup:
            self.theirs.append(time.perf_counter() - t0)
        self.prev = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="generator/embedded")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--text-encoder", default="minilm", help="minilm | tiny (tiny skips loading MiniLM)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = compose(args.experiment, [f"generator.text_encoder={args.text_encoder}", "generator.sample_every_n_steps=0",
                                    f"data.batch_size={args.batch}", "optim.scheduler=constant", *args.overrides])
    module = GeneratorModule(to_container(cfg), LABELS[: cfg.data.num_classes])
    device = torch.device(args.device)
    c, s = cfg.data.channels, cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    captions = [f"a photo of a face looking {LABELS[i % len(LABELS)]}" for i in range(args.batch)]
    batch = {"image": (torch.rand(args.batch, c, s, s, generator=g) * 2 - 1).to(device), "caption": captions,
             "aus": torch.rand(args.batch, len(module.au_names), generator=g).to(device),
             "has_aus": torch.ones(args.batch, dtype=torch.bool, device=device),
             "label": torch.zeros(args.batch, dtype=torch.long, device=device)}
    # The plain loop gets the encoder output precomputed (our module reads the same from its caption cache).
    text_emb = module.text_encoder.to(device).encode(captions).to(device)
    # Same dropout as ours would differ per step; switch it off in both for a like-for-like comparison.
    module.gcfg.caption_dropout = 0.0
    module.gcfg.au_dropout = 0.0
    plain = PlainLoop(module, cfg.optim.lr, device, autocast=args.precision.startswith("bf16"))
    cb = Interleave(plain, batch, text_emb, args.warmup)
    loader = [batch] * (args.steps + args.warmup + 1)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=len(loader), precision=args.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    ours, theirs = statistics.median(cb.ours), statistics.median(cb.theirs)
    params = sum(p.numel() for p in module.unet.parameters()) / 1e6
    print(f"device={device} precision={args.precision} experiment={args.experiment} batch={args.batch} "
          f"size={s} channels={c} unet_params={params:.2f}M threads={torch.get_num_threads()} steps={len(cb.ours)}")
    print(f"GeneratorModule in Trainer: {ours:.3f} s/step (median; mean {statistics.mean(cb.ours):.3f})")
    print(f"plain diffusers loop:       {theirs:.3f} s/step (median; mean {statistics.mean(cb.theirs):.3f})")
    print(f"throughput ratio ours/plain: {theirs / ours:.3f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
