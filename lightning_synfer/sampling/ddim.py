"""DDIM sampling with compositional classifier-free guidance over text and AUs.

    eps = eps_u + s_text (eps_text - eps_u) + s_au (eps_text+au - eps_text)

eps_u: caption "" and the all-zero AU vector (what caption/AU dropout trains), eps_text: caption and zero
AUs, eps_text+au: both. The passes that a pair of scales needs go through ONE UNet call (batch 3B, 2B or B).
The same combination applies to v-predictions (it is linear), so the scheduler's step handles both types.

Determinism: x_T and the per-step noise (eta > 0) come from one CPU generator per sample, seeded by
the sample's seed, so an image depends on its spec and seed only, not on the batch it is drawn in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import DDIMScheduler


@dataclass
class SamplerSettings:
    steps: int = 50
    eta: float = 0.0
    text_scale: float = 5.0
    au_scale: float = 2.0
    clip_sample: bool = True
    use_ema: bool = True
    cfg_start: float = 0.0  # fraction of the first (noisiest) steps sampled without CFG: the conditional pass only

    @classmethod
    def from_config(cls, sampling: Any) -> "SamplerSettings":
        return cls(steps=int(sampling.steps), eta=float(sampling.eta), text_scale=float(sampling.text_scale),
                   au_scale=float(sampling.au_scale_cfg), clip_sample=bool(sampling.clip_sample),
                   use_ema=bool(sampling.use_ema), cfg_start=float(sampling.cfg_start))


def make_scheduler(gen: Any, clip_sample: bool) -> DDIMScheduler:
    return DDIMScheduler.from_config(gen.noise_scheduler.config, clip_sample=clip_sample,
                                     prediction_type=gen.prediction_type)


def split_prediction(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a UNet output at noise level alpha_bar (a scalar or per-sample tensor)."""
    a = alpha_bar.to(x_t.dtype) if torch.is_tensor(alpha_bar) else torch.tensor(alpha_bar, dtype=x_t.dtype)
    a = a.to(x_t.device).reshape(-1, *([1] * (x_t.dim() - 1))) if a.dim() else a.to(x_t.device)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - s1a * eps) / sa
    elif prediction_type == "v_prediction":
        x0 = sa * x_t - s1a * output
        eps = sa * output + s1a * x_t
    else:
        raise ValueError(f"prediction_type={prediction_type!r}: expected epsilon or v_prediction")
    return x0, eps


def sample_shape(gen: Any, batch_size: int) -> tuple[int, ...]:
    return tuple(int(s) for s in gen.sample_shape(batch_size))


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]


def per_sample_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device: Any,
                     dtype: torch.dtype) -> torch.Tensor:
    """One draw per sample from its own generator (on CPU, so the same on any device)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]).to(
        device=device, dtype=dtype)


class Conditioner:
    """Text/AU conditioning of a batch, and the hidden states of the CFG passes it needs."""

    def __init__(self, gen: Any, captions: Sequence[str], aus: Optional[torch.Tensor], text_scale: float,
                 au_scale: float) -> None:
        self.gen = gen
        n = len(captions)
        self.n = n
        # Encoded together so that padded lengths agree between the captions and "".
        emb = gen.encode_text(list(captions) + [""])
        self.text_emb, self.null_text = emb[:n], emb[n:].expand(n, *emb.shape[1:])
        self.au_tokens = self.null_au = None
        if aus is not None and getattr(gen, "au_adapter", None) is not None:
            aus = aus.to(device=emb.device, dtype=torch.float32)
            tokens = gen.encode_aus(torch.cat([aus, torch.zeros_like(aus[:1])]))
            if tokens is not None:
                self.au_tokens, self.null_au = tokens[:n], tokens[n:].expand(n, *tokens.shape[1:])
        self.text_scale, self.au_scale = float(text_scale), float(au_scale)
        has_au = self.au_tokens is not None
        # Which passes the scales need (1 = no push along that direction).
        if not has_au:
            self.passes = ("full",) if self.text_scale == 1 else ("uncond", "full")
        elif self.text_scale == 1 and self.au_scale == 1:
            self.passes = ("full",)
        elif self.text_scale == 1:
            self.passes = ("text", "full")
        elif self.text_scale == self.au_scale:
            # u + s(t - u) + s(f - t) = u + s(f - u): the text-only pass cancels, one UNet pass fewer per step.
            self.passes = ("uncond", "full")
        else:
            self.passes = ("uncond", "text", "full")
        self._static = {}
        if "uncond" in self.passes:
            self._static["uncond"] = gen.conditioning(self.null_text, self.null_au)

    def hidden(self, kind: str, text_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        text_emb = self.text_emb if text_emb is None else text_emb
        if kind == "uncond":
            return self._static["uncond"]
        if kind == "text":
            return self.gen.conditioning(text_emb, self.null_au)
        return self.gen.conditioning(text_emb, self.au_tokens)

    def batched(self, text_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([self.hidden(k, text_emb) for k in self.passes])

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(self.passes, out.chunk(len(self.passes))))
        full = parts["full"]
        if len(self.passes) == 1:
            return full
        if self.au_tokens is None or "text" not in parts:
            return parts["uncond"] + self.text_scale * (full - parts["uncond"])
        text = parts["text"]
        base = text if "uncond" not in parts else parts["uncond"] + self.text_scale * (text - parts["uncond"])
        return base + self.au_scale * (full - text)


class DDIMSampler:
    """DDIM over a GeneratorModule; `guidance` (e.g. SemanticGuidance) may update the text embedding."""

    def __init__(self, gen: Any, settings: Optional[SamplerSettings] = None, guidance: Any = None) -> None:
        self.gen = gen
        self.settings = settings or SamplerSettings()
        self.guidance = guidance
        self.scheduler = make_scheduler(gen, self.settings.clip_sample)
        self.scheduler.set_timesteps(self.settings.steps)
        self.last_stats: dict[str, float] = {}

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def _ema(self):
        ema = getattr(self.gen, "ema_weights", None)
        return ema() if self.settings.use_ema and ema is not None else contextlib.nullcontext()

    def alpha_bar(self, t: int) -> torch.Tensor:
        return self.scheduler.alphas_cumprod[int(t)]

    def initial_noise(self, seeds: Sequence[int], device: Any, dtype: torch.dtype = torch.float32):
        gens = seeded_generators(seeds)
        shape = sample_shape(self.gen, len(seeds))
        return per_sample_noise(shape[1:], gens, device, dtype), gens

    @torch.no_grad()
    def sample(self, captions: Sequence[str], aus: Optional[torch.Tensor], seeds: Sequence[int], *,
               labels: Optional[torch.Tensor] = None, x_start: Optional[torch.Tensor] = None, start_index: int = 0,
               decode: bool = True) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) (model-space samples with decode=False).

        x_start/start_index: begin at timesteps[start_index] from a given x (layout start, inversion).
        """
        if len(captions) != len(seeds):
            raise ValueError(f"sample: {len(captions)} captions but {len(seeds)} seeds; expected one seed per sample")
        s = self.settings
        # The UNet's own device/dtype: frozen parts (text encoder, VAE) may live in another dtype.
        unet_param = next(self.gen.unet.parameters())
        device, dtype = unet_param.device, unet_param.dtype
        with self._ema():
            cond = Conditioner(self.gen, captions, aus, s.text_scale, s.au_scale)
            x, gens = self.initial_noise(seeds, device, dtype)
            if x_start is not None:
                x = x_start.to(device=device, dtype=dtype)
            text_emb = cond.text_emb
            hidden = cond.batched(text_emb)
            timesteps = self.timesteps
            n = len(timesteps)
            guided = 0
            # Guidance in a limited interval (Kynkaanniemi et al., 2024): CFG at the highest noise levels pulls
            # every sample's global layout (brightness, contrast, hair) toward the class mean; skipping it there
            # keeps that diversity, and the expression is still pushed in the later steps. One UNet pass there.
            unguided = int(round(s.cfg_start * n))
            for i in range(start_index, n):
                t = timesteps[i]
                if self.guidance is not None and labels is not None and self.guidance.active(i, n):
                    text_emb = self.guidance.update(text_emb, labels, self._x0_images_fn(cond, x, t))
                    hidden = cond.batched(text_emb)
                    guided += 1
                if i < unguided:
                    out = self._model(x, t, cond.hidden("full", text_emb), 1)
                else:
                    out = cond.combine(self._model(x, t, hidden, len(cond.passes)))
                noise = None
                if s.eta > 0:
                    noise = per_sample_noise(x.shape[1:], gens, device, x.dtype)
                x = self.scheduler.step(out, t, x, eta=s.eta, variance_noise=noise, return_dict=False)[0]
            self.last_stats = {"guided_steps": float(guided)}
            if not decode:
                return x
            return self.gen.model_space_to_images(x).clamp(-1, 1)

    def _model(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, repeats: int) -> torch.Tensor:
        xin = x if repeats == 1 else torch.cat([x] * repeats)
        hidden = hidden.to(x.dtype)
        tt = t.to(x.device).expand(xin.shape[0]) if torch.is_tensor(t) else torch.full((xin.shape[0],), int(t),
                                                                                        device=x.device)
        # EMA weights are swapped in by _ema() (UNet and AU adapter alike), so denoise uses the live ones.
        return self.gen.denoise(xin, tt, hidden, use_ema=False)

    def _x0_images_fn(self, cond: Conditioner, x: torch.Tensor,
                      t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """text_emb -> predicted clean images in [0, 1] (differentiable in text_emb): the fully conditional
        pass only, since the unconditional one does not depend on the text embedding."""
        def fn(text_emb: torch.Tensor) -> torch.Tensor:
            out = self._model(x, t, cond.hidden("full", text_emb), 1)
            x0, _ = split_prediction(out, x, self.alpha_bar(t), self.gen.prediction_type)
            if self.settings.clip_sample:
                x0 = x0.clamp(-1, 1)
            images = self.gen.model_space_to_images(x0)
            return ((images + 1) / 2).clamp(0, 1)
        return fn

