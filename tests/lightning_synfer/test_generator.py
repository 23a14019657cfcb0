"""GeneratorModule: training step, export/load, fit + resume with EMA, the sd profile on a tiny SD folder."""
import json
from pathlib import Path

import pytest
import torch


from fixtures import make_tiny_sd
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.models.au_adapter import AUAttnProcessor
from lightning_synfer.modules.generator import GeneratorModule
from lightning_synfer.tasks import fit

LABELS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
# tiny_test is already small; these keep every fit in this file to a handful of seconds.
FAST = ["generator.sample_every_n_steps=0", "trainer.limit_val_batches=1"]


def _module(tiny, *extra, experiment="generator/tiny_test"):
    torch.manual_seed(0)
    cfg = compose(experiment, tiny(*FAST, *extra))
    return GeneratorModule(to_container(cfg), LABELS)


def _batch(module, b=4, has_aus=True):
    g = torch.Generator().manual_seed(1)
    c, s = module.cfg.data.channels, module.cfg.data.image_size
    return {"image": torch.rand(b, c, s, s, generator=g) * 2 - 1, "caption": [f"a face looking {n}" for n in LABELS[:b]],
            "aus": torch.rand(b, len(module.au_names), generator=g), "has_aus": torch.full((b,), has_aus)}


def _outputs(module, b=2):
    """Deterministic denoiser outputs through the public interface (text + AUs + EMA)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(module.sample_shape(b), generator=g)
    t = torch.tensor([50, 900][:b])
    aus = torch.rand(b, len(module.au_names), generator=g)
    with torch.no_grad():
        ehs = module.conditioning(module.encode_text(["a happy face", "a sad face"][:b]), module.encode_aus(aus))
        return module.denoise(x, t, ehs), module.denoise(x, t, ehs, use_ema=True)


def test_forward_backward_trains_adapter_and_unet(tiny):
    m = _module(tiny).train()
    loss = m.diffusion_loss(_batch(m), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.au_adapter.mlp.parameters())
    assert all(p.grad is not None for p in m.au_adapter.processors.parameters())
    assert m.unet.conv_in.weight.grad is not None
    procs = m.unet.attn_processors
    assert sum(isinstance(p, AUAttnProcessor) for p in procs.values()) == sum(n.endswith("attn2.processor")
                                                                              for n in procs)
    assert m.sample_shape(3) == (3, 1, 32, 32)
    assert m.encode_text(["x"]).shape == (1, 16, 32) and m.encode_aus(torch.zeros(1, 14)).shape == (1, 4, 32)


def test_adapter_only_freezes_the_unet(tiny):
    m = _module(tiny, "generator.train_unet=false")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("au_adapter.", "text_proj.")) or ".processor." in n for n in trainable)
    assert any(".processor.to_v_au" in n for n in trainable)  # the adapter's own cross-attention values train


def test_no_aus_in_batch_means_the_zero_condition(tiny):
    m = _module(tiny, "generator.caption_dropout=0", "generator.au_dropout=0").eval()
    batch = _batch(m, has_aus=False)
    zeros = {**batch, "aus": torch.zeros_like(batch["aus"])}
    with torch.no_grad():
        a = m.diffusion_loss(batch, torch.Generator().manual_seed(0))
        b = m.diffusion_loss(zeros, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_wrong_au_length_names_the_au_list(tiny):
    m = _module(tiny)
    with pytest.raises(ValueError, match=r"AU1', 'AU2'.*AU12_unilateral"):
        m.encode_aus(torch.zeros(2, 5))


def test_export_and_load_give_identical_outputs(tiny, tmp_path):
    m = _module(tiny, "generator.prediction_type=v_prediction").eval()
    with torch.no_grad():  # make raw and EMA weights differ, and the adapter non-trivial
        for p in m.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = _outputs(m)
    assert not torch.equal(*before)
    folder = m.save_pretrained(tmp_path / "export")
    for rel in ("unet/config.json", "unet_ema/diffusion_pytorch_model.safetensors", "au_adapter.safetensors",
                "scheduler/scheduler_config.json", "text_encoder.json", "text_encoder/model.safetensors"):
        assert (folder / rel).is_file(), rel
    meta = json.loads((folder / "generator_config.json").read_text())
    assert meta["prediction_type"] == "v_prediction" and meta["num_au_tokens"] == 4 and meta["channels"] == 1
    assert meta["label_names"] == LABELS and len(meta["au_names"]) == 14
    loaded = GeneratorModule.load(str(folder))
    after = _outputs(loaded)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"


def test_fit_fast_dev_run_embedded(tiny):
    cfg = compose("generator/embedded", tiny(
        "trainer.fast_dev_run=true", "generator.text_encoder=tiny", "generator.text_max_length=16",
        "generator.block_out_channels=[8,16]", "generator.attention_levels=[false,true]", "generator.au_hidden=32",
        "generator.cross_attention_dim=32", "generator.sample_every_n_steps=1", "generator.sample_steps=2"))
    metrics = fit.run(cfg)
    assert metrics["global_step"] == 1 and metrics["steps"] == 1 and metrics["final_loss"] > 0
    assert (Path(metrics["export_dir"]) / "generator_config.json").is_file()


def test_fit_resume_restores_ema(tiny, tmp_path):
    small = [*FAST, "data.train.num_images=16", "trainer.limit_val_batches=0",  # 2 steps per epoch, no val
             "generator.export_on_fit_end=false"]
    first = fit.run(compose("generator/tiny_test", tiny(*small, "trainer.max_epochs=1", f"run_dir={tmp_path / 'a'}")))
    ckpt_a = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert first["steps"] == 2 and ckpt_a.is_file()
    saved = torch.load(ckpt_a, map_location="cpu", weights_only=True)
    assert saved["ema"]["optimization_step"] == 2
    m = GeneratorModule.load(str(ckpt_a))  # EMA restored equal from the checkpoint
    assert all(torch.equal(a, b) for a, b in zip(m.ema.shadow_params, saved["ema"]["shadow_params"]))
    assert not all(torch.equal(a, b) for a, b in zip(m.ema.shadow_params, m.trainable_parameters()))
    fit.run(compose("generator/tiny_test", tiny(*small, "trainer.max_epochs=2", f"resume={ckpt_a}",
                                                f"run_dir={tmp_path / 'b'}")))
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["ema"]["optimization_step"] == 4  # continued, not restarted


def test_sd_profile_missing_path_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        _module(tiny, "generator.profile=sd", f"generator.pretrained_path={tmp_path / 'nope'}")
    (tmp_path / "half" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"half: missing unet/config.json"):
        _module(tiny, "generator.profile=sd", f"generator.pretrained_path={tmp_path / 'half'}")


def test_sd_profile_lora_on_tiny_sd_folder(tiny, tmp_path):
    sd = make_tiny_sd(tmp_path / "sd")
    m = _module(tiny, "generator.profile=sd", f"generator.pretrained_path={sd}", "generator.text_encoder=clip",
                "generator.lora_rank=2", "generator.beta_schedule=scaled_linear", "data.channels=3",
                "data.image_size=16", "generator.frozen_dtype=fp32").train()
    assert m.vae is not None and m.text_encoder.kind == "clip" and m.sample_shape(2) == (2, 4, 8, 8)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("au_adapter.") or ".processor." in n for n in trainable)
    loss = m.diffusion_loss(_batch(m), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # LoRA B starts at 0: give the merge something to merge
                p.add_(0.05 * torch.randn_like(p))
    m.eval()
    before = _outputs(m)
    images = m.model_space_to_images(torch.randn(m.sample_shape(1)))
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1
    folder = m.save_pretrained(tmp_path / "export")
    assert (folder / "vae" / "config.json").is_file() and (folder / "tokenizer").is_dir()
    loaded = GeneratorModule.load(str(folder))
    assert loaded.text_encoder.kind == "clip" and not any("lora_" in n for n, _ in loaded.named_parameters())
    after = _outputs(loaded)
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)


def test_validation_grid_is_logged_to_tensorboard_and_deterministic(tiny, tmp_path):
    """A real (non fast_dev_run) fit: fast_dev_run swaps in a DummyLogger, so only max_steps reaches TensorBoard."""
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchvision.utils import make_grid

    run = tmp_path / "run"
    metrics = fit.run(compose("generator/tiny_test", tiny(
        "trainer.max_steps=2", "trainer.limit_val_batches=0", "generator.sample_every_n_steps=1",
        "generator.sample_steps=2", "generator.export_on_fit_end=false", f"run_dir={run}")))
    assert metrics["steps"] == 2
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert {"samples", "samples_final"} <= set(acc.Tags()["images"])
    grids, final = acc.Images("samples"), acc.Images("samples_final")
    assert [e.step for e in grids] == [1, 2] and [e.step for e in final] == [2]

    def pixels(event):
        return np.asarray(Image.open(BytesIO(event.encoded_image_string)).convert("RGB"))

    # One row of 8 class samples (32 px, grayscale shown as RGB) with make_grid's 2-pixel padding.
    assert (grids[-1].height, grids[-1].width) == (32 + 4, 8 * 34 + 2)
    assert pixels(grids[-1]).shape == (36, 274, 3) and pixels(grids[-1]).std() > 0
    # Same weights, same fixed captions/AUs/seed: the grid at step 2 and the final grid are the same image.
    assert np.array_equal(pixels(grids[-1]), pixels(final[0]))
    # ... and they are this model's samples: recomputed from the checkpoint's EMA weights.
    m = GeneratorModule.load(str(run / "checkpoints" / "last.ckpt")).eval()
    captions, aus = m.sample_conditions()
    images = m.sample(captions, aus, steps=2, guidance=m.gcfg.sample_guidance, seed=m.gcfg.sample_seed)
    expected = (make_grid((images + 1) / 2, nrow=8).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    assert np.abs(pixels(final[0]).astype(float) - expected).max() <= 1  # TensorBoard truncates to uint8


def test_min_snr_weights_match_the_formula_and_weight_the_loss(tiny):
    from diffusers.training_utils import compute_snr

    from lightning_synfer.modules.generator import min_snr_weights

    gamma = 5.0
    for prediction in ("epsilon", "v_prediction"):
        m = _module(tiny, f"generator.prediction_type={prediction}", "generator.snr_gamma=null").eval()
        t = torch.tensor([0, 10, 100, 400, 700, 999])
        snr = compute_snr(m.noise_scheduler, t)  # diffusers' own SNR: (alpha_t / sigma_t)^2
        w = min_snr_weights(m.alphas_cumprod[t], gamma, prediction)
        expected = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if prediction == "v_prediction" else snr)
        torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-6)
        assert (snr[:2] > gamma).all() and (snr[-2:] < gamma).all()  # both regimes are covered
        if prediction == "epsilon":
            assert (w[:2] < 1).all() and torch.equal(w[-2:], torch.ones(2))  # only low-noise steps are damped
        else:
            assert (w < 1).all()
        # The loss is the plain per-sample MSE times the weight of the drawn timestep.
        seen: list[torch.Tensor] = []
        m.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
        batch = _batch(m, b=1)
        ratios = []
        for seed in range(4):
            with torch.no_grad():
                m.gcfg.snr_gamma = None
                plain = m.diffusion_loss(batch, torch.Generator().manual_seed(seed))
                m.gcfg.snr_gamma = gamma
                weighted = m.diffusion_loss(batch, torch.Generator().manual_seed(seed))
            assert torch.equal(seen[-1], seen[-2])
            ratios.append(float(weighted / plain))
            torch.testing.assert_close(weighted / plain,
                                       min_snr_weights(m.alphas_cumprod[seen[-1]], gamma, prediction)[0])
        assert min(ratios) < 0.95  # the seeds draw damped timesteps, so the check above has teeth


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, monkeypatch):
    import torch.utils.checkpoint as checkpoint_utils

    calls = []
    real = checkpoint_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_utils, "checkpoint", counting)  # diffusers looks it up at call time
    results = []
    for on in (False, True):
        calls.clear()
        m = _module(tiny, f"generator.gradient_checkpointing={str(on).lower()}").train()
        assert m.unet.is_gradient_checkpointing == on
        loss = m.diffusion_loss(_batch(m), torch.Generator().manual_seed(0))
        loss.backward()
        assert bool(calls) == on  # the checkpointed blocks really ran (and only when asked)
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-5, atol=1e-7, msg=name)
