"""DDIM + CFG determinism, semantic guidance, inversion, specs (tiny stand-in generator, CPU, seconds)."""
from __future__ import annotations

import re
import zlib
from contextlib import nullcontext

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DConditionModel

from datamodules.labels import CANONICAL_8
from datamodules.procedural.aus import AU_NAMES
from lightning_synfer.sampling import (DDIMSampler, SamplerSettings, SemanticGuidance, build_specs, ddim_invert,
                                       split_prediction)
from lightning_synfer.sampling.ddim import Conditioner
from lightning_synfer.sampling.specs import AUStats, class_counts, read_captions_file, spec_seed, specs_from_config

DIM, TOKENS = 32, 6


class TinyGen(L.LightningModule):
    """Stand-in with exactly the GeneratorModule sampling interface: pixel space, hashed-word text encoder."""

    def __init__(self, size: int = 16, channels: int = 1, aus: bool = True, prediction_type: str = "epsilon",
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.size, self.channels = size, channels
        self.unet = UNet2DConditionModel(
            sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=DIM, norm_num_groups=8,
            attention_head_dim=8)
        self.vae = None
        self.text_encoder = nn.Embedding(257, DIM)
        self.au_names = list(AU_NAMES)
        self.au_adapter = nn.Linear(len(self.au_names), 2 * DIM) if aus else None
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                             prediction_type=prediction_type, clip_sample=True)
        self.prediction_type = prediction_type
        self.label_names = list(CANONICAL_8)
        self.generator_id = "tiny-stand-in"

    def encode_text(self, captions):
        ids = torch.zeros(len(captions), TOKENS, dtype=torch.long)
        for i, c in enumerate(captions):
            words = [1 + zlib.crc32(w.encode()) % 256 for w in c.split()][:TOKENS]
            ids[i, : len(words)] = torch.tensor(words, dtype=torch.long)
        return self.text_encoder(ids.to(self.text_encoder.weight.device))

    def encode_aus(self, aus):
        if self.au_adapter is None:
            return None
        return self.au_adapter(aus.to(self.au_adapter.weight)).view(len(aus), 2, DIM)

    def conditioning(self, text_emb, au_tokens):
        return text_emb if au_tokens is None else torch.cat([text_emb, au_tokens], 1)

    def denoise(self, x_t, t, encoder_hidden_states, use_ema=False):
        # A "trained-like" prediction: the exact eps of N(0, 0.5^2) data plus a small conditional UNet term,
        # so that DDIM trajectories are smooth (inversion works) and the text still matters (guidance works).
        a = self.noise_scheduler.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (1 - a).sqrt() * x_t / (0.25 * a + 1 - a)
        out = eps + 0.2 * self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states).sample
        if self.prediction_type == "v_prediction":
            x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
            return a.sqrt() * out - (1 - a).sqrt() * x0
        return out

    def images_to_model_space(self, images_m11):
        return images_m11

    def model_space_to_images(self, z):
        return z

    def sample_shape(self, batch):
        return (batch, self.channels, self.size, self.size)

    def ema_weights(self):
        return nullcontext()


@pytest.fixture(scope="module")
def gen():
    return TinyGen().eval().requires_grad_(False)


CAPS = ["a photo of a face looking happy", "a photo of a face looking sad", "a calm face", "an angry face"]


def _aus(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((n, len(AU_NAMES)), dtype=np.float32))


def test_sampler_deterministic_and_batch_independent(gen):
    sampler = DDIMSampler(gen, SamplerSettings(steps=4, eta=0.5, text_scale=3.0, au_scale=2.0))
    aus = _aus(4)
    a = sampler.sample(CAPS, aus, [1, 2, 3, 4])
    b = sampler.sample(CAPS, aus, [1, 2, 3, 4])
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    # Same spec and seed in another batch (different neighbours, different size) -> same image.
    c = sampler.sample([CAPS[2], "something else"], torch.stack([aus[2], aus[0]]), [3, 99])
    torch.testing.assert_close(c[0], a[2], atol=1e-4, rtol=0)
    d = sampler.sample(CAPS[:1], aus[:1], [5])
    assert (d[0] - a[0]).abs().max() > 1e-3  # another seed, another image


def test_cfg_combination_and_passes(gen):
    aus = _aus(2)
    cond = Conditioner(gen, CAPS[:2], aus, 3.0, 2.0)
    assert cond.passes == ("uncond", "text", "full")
    u, t, f = torch.randn(3, 2, 1, 4, 4).unbind(0)
    expected = u + 3.0 * (t - u) + 2.0 * (f - t)
    torch.testing.assert_close(cond.combine(torch.cat([u, t, f])), expected)
    assert Conditioner(gen, CAPS[:2], aus, 1.0, 1.0).passes == ("full",)
    assert Conditioner(gen, CAPS[:2], aus, 1.0, 4.0).passes == ("text", "full")
    assert Conditioner(gen, CAPS[:2], None, 3.0, 2.0).passes == ("uncond", "full")
    # Equal text and AU scales: the text-only pass cancels out of the sum, and the result is the same.
    same = Conditioner(gen, CAPS[:2], aus, 3.0, 3.0)
    assert same.passes == ("uncond", "full")
    torch.testing.assert_close(same.combine(torch.cat([u, f])), u + 3.0 * (t - u) + 3.0 * (f - t))
    # The unconditional AU input is the all-zero vector (what AU dropout trains).
    torch.testing.assert_close(cond.null_au[0], gen.encode_aus(torch.zeros(1, len(AU_NAMES)))[0])


def test_cfg_start_samples_the_noisiest_steps_without_cfg(gen, monkeypatch):
    aus, seeds = _aus(2), [1, 2]
    conditional = DDIMSampler(gen, SamplerSettings(steps=4, text_scale=1.0, au_scale=1.0)).sample(CAPS[:2], aus, seeds)
    cfg = DDIMSampler(gen, SamplerSettings(steps=4, text_scale=3.0, au_scale=2.0)).sample(CAPS[:2], aus, seeds)
    sizes = []
    denoise = gen.denoise
    monkeypatch.setattr(gen, "denoise", lambda x, *a, **k: (sizes.append(x.shape[0]), denoise(x, *a, **k))[1])
    half = DDIMSampler(gen, SamplerSettings(steps=4, text_scale=3.0, au_scale=2.0, cfg_start=0.5))
    out = half.sample(CAPS[:2], aus, seeds)
    assert sizes == [2, 2, 6, 6]  # the conditional pass alone in the first 2 of 4 steps, then the 3 CFG passes
    assert (out - cfg).abs().max() > 1e-4 and (out - conditional).abs().max() > 1e-4
    # every step without CFG is the conditional sampler exactly
    whole = DDIMSampler(gen, SamplerSettings(steps=4, text_scale=3.0, au_scale=2.0, cfg_start=0.9))
    torch.testing.assert_close(whole.sample(CAPS[:2], aus, seeds), conditional)


def test_split_prediction_v_and_eps():
    x0, eps = torch.randn(2, 2, 1, 4, 4).unbind(0)
    a = torch.tensor(0.3)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        px0, peps = split_prediction(out, xt, a, kind)
        torch.testing.assert_close(px0, x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(peps, eps, atol=1e-5, rtol=0)


class Brightness(nn.Module):
    """Toy FER classifier: class 0 = bright face, class 1 = dark face."""

    def forward(self, images):
        m = images.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([8 * m, -8 * m], 1)


def test_semantic_guidance_raises_target_probability(gen):
    clf = Brightness()
    n = 8
    labels = torch.tensor([0, 1] * (n // 2))
    caps = [CAPS[i % 4] for i in range(n)]
    aus, seeds = _aus(n, 1), list(range(100, 100 + n))
    settings = SamplerSettings(steps=6, eta=0.0, text_scale=2.0, au_scale=1.5)
    plain = DDIMSampler(gen, settings).sample(caps, aus, seeds, labels=labels)
    sg = SemanticGuidance(clf, scale=3.0, window=0.5)
    guided_sampler = DDIMSampler(gen, settings, guidance=sg)
    guided = guided_sampler.sample(caps, aus, seeds, labels=labels)
    assert guided_sampler.last_stats["guided_steps"] == 3

    def target_prob(images):
        return clf((images + 1) / 2).softmax(-1).gather(1, labels[:, None]).mean().item()

    assert target_prob(guided) > target_prob(plain) + 0.02, (target_prob(guided), target_prob(plain))


def test_guidance_window_is_validated_and_counts_last_steps():
    with pytest.raises(ValueError, match="guidance.window"):
        SemanticGuidance(Brightness(), 0.1, 0.0)
    sg = SemanticGuidance(Brightness(), 0.1, 0.25)
    assert [sg.active(i, 8) for i in range(8)] == [False] * 6 + [True] * 2
    assert SemanticGuidance(Brightness(), 0.1, 1.0).active(0, 8)


def test_guidance_window_config_error():
    from lightning_synfer.config import compose
    from lightning_synfer.config.compose import ConfigError

    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"guidance.window.*\(0, 1\]"):
            compose("supervised/embedded", [f"guidance.window={bad}"])
    assert compose("supervised/embedded", ["guidance.window=1.0"]).guidance.window == 1.0


def test_inversion_roughly_reconstructs(gen):
    sampler = DDIMSampler(gen, SamplerSettings(steps=10, eta=0.0, text_scale=1.0, au_scale=1.0, clip_sample=False))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    faces = torch.stack([(0.8 - (xx ** 2 + yy ** 2)).clamp(-1, 1), (xx * 0.7).sin()])[:, None]
    caps, aus = CAPS[:2], _aus(2)
    x_t, start = ddim_invert(sampler, faces, caps, aus)
    assert start == 0 and x_t.shape == faces.shape
    recon = sampler.sample(caps, aus, [0, 1], x_start=x_t, start_index=start)
    err = (recon - faces).abs().mean().item()
    random = sampler.sample(caps, aus, [0, 1])
    assert err < 0.1 and err < 0.3 * (random - faces).abs().mean().item(), err
    # Partial inversion (layout strength 0.5) starts half way.
    x_half, start = ddim_invert(sampler, faces, caps, aus, num_steps=5)
    assert start == 5
    recon = sampler.sample(caps, aus, [0, 1], x_start=x_half, start_index=start)
    assert (recon - faces).abs().mean().item() < 0.1


def test_specs_class_balance_and_determinism():
    names = list(CANONICAL_8[:7])
    specs = build_specs(50, names, AU_NAMES, seed=3)
    counts = np.bincount([s.label for s in specs], minlength=7)
    assert counts.sum() == 50 and counts.max() - counts.min() <= 1
    again = build_specs(50, names, AU_NAMES, seed=3)
    assert [s.to_dict() for s in specs] == [s.to_dict() for s in again]
    assert len({s.id for s in specs}) == 50 and specs[7].id == "3-00000007"
    assert build_specs(50, names, AU_NAMES, seed=4)[0].seed != specs[0].seed
    assert specs[0].seed == spec_seed(3, 0)
    for s in specs:
        assert len(s.aus) == len(AU_NAMES) and all(0 <= a <= 1 for a in s.aus) and s.caption
    happy = [s for s in specs if names[s.label] == "happy"]
    assert np.mean([s.aus[AU_NAMES.index("AU12")] for s in happy]) > 0.3  # EMFACS: smiles
    # Counts per class (list or mapping), and the training prior when not balanced.
    assert class_counts(0, names, {"happy": 3, "sad": 2}) == [0, 3, 2, 0, 0, 0, 0]
    assert class_counts(10, names, None, class_balanced=False, prior=[1, 1, 0, 0, 0, 0, 0]) == [5, 5, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="synthesis.per_class"):
        class_counts(5, names, [1, 2])
    # Empirical AUs come from the class's own training faces.
    stats = AUStats({"happy": np.full((3, len(AU_NAMES)), 0.25)}, AU_NAMES)
    specs = build_specs(14, names, AU_NAMES, seed=0, au_stats=stats)
    assert all(s.aus[0] == 0.25 for s in specs if names[s.label] == "happy")


def _captions_file(path):
    path.write_text("# happy and sad have their own captions; every other class uses the template\n"
                    "happy\ta beaming face\nHappiness\ta grinning face\n\nsad\ta tearful face\n"
                    "a photo of a {expression} person\n", encoding="utf-8")
    return path


def test_specs_take_captions_from_the_file_per_class_and_by_seed(tmp_path):
    names = list(CANONICAL_8[:7])
    path = _captions_file(tmp_path / "captions.txt")
    captions = read_captions_file(str(path), names)
    assert captions == (["a photo of a {expression} person"],
                        {"happy": ["a beaming face", "a grinning face"], "sad": ["a tearful face"]})
    specs = build_specs(70, names, AU_NAMES, seed=1, captions=captions)
    by_class = {n: {s.caption for s in specs if names[s.label] == n} for n in names}
    assert by_class["happy"] == {"a beaming face", "a grinning face"}  # pinned lines, both drawn among 10
    assert by_class["sad"] == {"a tearful face"}
    assert by_class["anger"] == {"a photo of a angry person"}  # {expression} becomes the class word
    assert by_class["surprise"] == {"a photo of a surprised person"}
    again = [s.caption for s in build_specs(70, names, AU_NAMES, seed=1, captions=captions)]
    assert again == [s.caption for s in specs]
    other = build_specs(70, names, AU_NAMES, seed=2, captions=captions)
    assert [s.caption for s in other if names[s.label] == "happy"] != [s.caption for s in specs
                                                                       if names[s.label] == "happy"]
    # The same through the synthesis config key.
    from lightning_synfer.config import compose

    cfg = compose("generator/synthesize_embedded", [f"synthesis.captions_file={path}", "synthesis.au_source=emfacs",
                                                    "synthesis.num_images=70", "synthesis.seed=1"])
    assert [s.to_dict() for s in specs_from_config(cfg, names, AU_NAMES)] == [s.to_dict() for s in specs]


def test_bad_captions_file_names_the_file(tmp_path):
    names = list(CANONICAL_8[:7])
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"synthesis.captions_file={missing}: no such file")):
        read_captions_file(str(missing), names)
    bad = tmp_path / "bad.txt"
    bad.write_text("a {expression} face\nhapy\ta smiling face\n")
    with pytest.raises(ValueError, match=re.escape(f"'hapy' in {bad}:2") + r".*Did you mean 'happy'"):
        read_captions_file(str(bad), names)
    bad.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=re.escape(f"synthesis.captions_file={bad}: no captions")):
        read_captions_file(str(bad), names)
    bad.write_text("happy\ta smiling face\n")  # pinned lines only, and not for every class
    with pytest.raises(ValueError,
                       match=re.escape(f"synthesis.captions_file={bad}: no caption for classes ['neutral'")):
        read_captions_file(str(bad), names)
    bad.write_bytes(b"\xff\xfe\x00a caption in UTF-16\n")
    with pytest.raises(ValueError, match=re.escape(f"synthesis.captions_file={bad}: not UTF-8 text")):
        read_captions_file(str(bad), names)
    bad.write_text("a {expression} face\nhappy\t\n")  # a pinned line with nothing after the tab
    with pytest.raises(ValueError,
                       match=re.escape(f"synthesis.captions_file={bad}:2: class 'happy' has an empty caption")):
        read_captions_file(str(bad), names)


def test_gaussian_aus_follow_the_class_mean_and_covariance_and_the_seed():
    k = len(AU_NAMES)
    rng = np.random.default_rng(0)
    mean = np.linspace(0.3, 0.7, k)
    happy = mean + 0.05 * rng.standard_normal((500, k))
    happy[:, 1] = happy[:, 0] - mean[0] + mean[1]  # AU2 moves with AU1: a covariance, not only a mean
    sad = 0.02 + 0.05 * rng.standard_normal((500, k))  # mostly below 0 after a draw: clipped to [0, 1]
    stats = AUStats({"happy": happy, "sad": sad}, AU_NAMES)
    names = ["happy", "sad"]
    specs = build_specs(800, names, AU_NAMES, seed=0, au_stats=stats, au_sampling="gaussian")
    assert all(len(s.aus) == k and all(0.0 <= a <= 1.0 for a in s.aus) for s in specs)
    got = {n: np.array([s.aus for s in specs if names[s.label] == n]) for n in names}
    assert len(got["happy"]) == len(got["sad"]) == 400
    np.testing.assert_allclose(got["happy"].mean(0), happy.mean(0), atol=0.015)
    np.testing.assert_allclose(got["happy"].std(0), happy.std(0), rtol=0.2)
    corr = np.corrcoef(got["happy"], rowvar=False)
    assert corr[0, 1] > 0.99 and abs(corr[0, 2]) < 0.2
    assert (got["sad"] == 0).mean() > 0.2 and got["sad"].mean() < 0.1  # the class's own statistics, clipped
    # Draws, not training rows (that would be the empirical mode).
    rows = {tuple(np.round(r, 6)) for r in happy}
    assert not any(tuple(v) in rows for v in got["happy"])
    # Deterministic by seed, also with a fresh AUStats (no state carried in its cache).
    fresh = AUStats({"happy": happy, "sad": sad}, AU_NAMES)
    again = build_specs(800, names, AU_NAMES, seed=0, au_stats=fresh, au_sampling="gaussian")
    assert [s.aus for s in again] == [s.aus for s in specs]
    assert build_specs(800, names, AU_NAMES, seed=1, au_stats=fresh, au_sampling="gaussian")[0].aus != specs[0].aus
