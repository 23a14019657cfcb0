"""A Stable Diffusion generator export in the stock diffusers ecosystem (lightning_synfer/models/diffusers_interop.py):
StableDiffusionPipeline.from_pretrained(export) draws the generator's images (same scheduler, seeds and steps, AU
scale 0), pipe.load_lora_weights(export) on the base model gives the same pipeline, and the FAU adapter file has
the documented key layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from datamodules.labels import CANONICAL_8
from fixtures import make_tiny_sd
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.models.au_adapter import cross_attention_layers, set_au_scale
from lightning_synfer.modules.generator import GeneratorModule
from lightning_synfer.sampling import DDIMSampler, SamplerSettings

CAPTIONS = ["a photo of a happy face", "a photo of a sad face"]
SEEDS = [3, 11]
STEPS, TEXT_SCALE = 4, 4.0


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny-SD generator with LoRA (rank 2, B perturbed so that it changes the images) and the FAU adapter."""
    root = tmp_path_factory.mktemp("interop")
    sd = make_tiny_sd(root / "sd")
    cfg = compose("generator/tiny_test", ["generator.profile=sd", f"generator.pretrained_path={sd}",
                                          "generator.text_encoder=clip", "generator.text_max_length=16",
                                          "generator.lora_rank=2", "generator.beta_schedule=scaled_linear",
                                          "generator.frozen_dtype=fp32", "generator.ema=false", "data.channels=3",
                                          "data.image_size=32", f"paths.runs_dir={root / 'runs'}"])
    torch.manual_seed(0)
    module = GeneratorModule(config=to_container(cfg), label_names=list(CANONICAL_8))
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn_like(p))
    return sd, module.save_pretrained(root / "export")


def _stock(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # as sampling/ddim.py
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_images(pipe) -> torch.Tensor:
    out = pipe(CAPTIONS, height=32, width=32, num_inference_steps=STEPS, guidance_scale=TEXT_SCALE, eta=0.0,
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt")
    return out.images.float()  # [0, 1]


def test_stock_pipeline_draws_the_generators_images_at_au_scale_0(export):
    _, folder = export
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    gen = GeneratorModule.load(folder)
    set_au_scale(gen.unet, 0.0)
    sampler = DDIMSampler(gen, SamplerSettings(steps=STEPS, eta=0.0, text_scale=TEXT_SCALE, au_scale=2.0,
                                               clip_sample=False, use_ema=False))
    aus = torch.rand(len(CAPTIONS), len(gen.au_names))  # any AUs: at scale 0 the adapter adds nothing
    ours = (sampler.sample(CAPTIONS, aus, SEEDS) + 1) / 2
    stock = _stock_images(_stock(folder))
    assert ours.shape == stock.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, stock, atol=1e-4), (ours - stock).abs().max()
    set_au_scale(gen.unet, 1.0)  # the adapter does change the images, so the match above is not vacuous
    assert not torch.allclose((sampler.sample(CAPTIONS, aus, SEEDS) + 1) / 2, stock, atol=1e-3)


def test_lora_weights_load_on_the_base_model(export):
    sd, folder = export
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    merged = _stock_images(_stock(folder))
    base = _stock(sd)
    assert not torch.allclose(_stock_images(base), merged, atol=1e-3)  # the LoRA matters
    base.load_lora_weights(str(folder))
    assert torch.allclose(_stock_images(base), merged, atol=1e-4)


def test_au_adapter_safetensors_key_layout(export):
    _, folder = export
    gen = GeneratorModule.load(folder)
    layers = {name.replace(".", "__") for name in cross_attention_layers(gen.unet)}  # diffusers processor names
    with safe_open(str(folder / "au_adapter.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    expected = {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {"norm.weight", "norm.bias"}
    expected |= {f"processors.{layer}.{w}.weight" for layer in layers for w in ("to_k_au", "to_v_au")}
    assert keys == expected
    assert json.loads(meta["au_names"]) == gen.au_names and int(meta["num_tokens"]) == gen.au_adapter.num_tokens
