"""Text encoders and the FAU adapter: shapes, caching, decoupled cross-attention placement and exactness."""
import pytest
import torch


from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from lightning_synfer.models.au_adapter import (AUAdapter, AUAttnProcessor, au_processors, cross_attention_layers,
                                                install_au_processors, load_au_adapter, save_au_adapter, set_au_scale)
from lightning_synfer.models.text_encoders import MiniLMTextEncoder, TinyTextEncoder
from lightning_synfer.models.unets import tiny_unet_config


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(16, 1, (8, 16), 1, (True, True), 32, 2, 8)).eval()


def test_minilm_loads_offline_and_caches():
    enc = MiniLMTextEncoder(max_length=12)
    out = enc.encode(["a photo of a face looking happy", "a sad face", "a photo of a face looking happy"])
    assert out.shape == (3, 12, 384) and enc.dim == 384 and enc.max_length == 12
    assert torch.equal(out[0], out[2])
    assert len(enc._cache) == 2
    assert not any(p.requires_grad for p in enc.parameters())


def test_tiny_encoder_cache_is_lru_and_consistent():
    enc = TinyTextEncoder(dim=16, max_length=8, cache_size=2)
    a = enc.encode(["one", "two"])
    enc.encode(["three"])  # evicts "one"
    assert list(enc._cache) == ["two", "three"]
    assert torch.allclose(enc.encode(["one"])[0], a[0])
    assert TinyTextEncoder(dim=16, max_length=8).encode(["one"]).allclose(a[:1])  # fixed-seed weights


def test_processor_on_every_cross_attention_layer_only():
    unet = _unet()
    n_cross = len(cross_attention_layers(unet))
    procs = install_au_processors(unet, num_tokens=3)
    assert len(procs) == n_cross == 2 * 1 + 2 * 2 + 1  # down 2 levels x 1 layer, up 2 x 2, mid 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            assert isinstance(proc, AUAttnProcessor)
        else:
            assert name.endswith("attn1.processor") and isinstance(proc, AttnProcessor2_0)


def test_au_scale_zero_is_exactly_the_base_model():
    unet = _unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    text = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
        install_au_processors(unet, num_tokens=3, scale=0.0)
        adapter = AUAdapter(14, 32, num_tokens=3, hidden=16)
        ehs = torch.cat([text, adapter(torch.rand(2, 14))], dim=1)
        assert torch.equal(unet(x, t, encoder_hidden_states=ehs).sample, base)
        set_au_scale(unet, 1.0)
        assert not torch.allclose(unet(x, t, encoder_hidden_states=ehs).sample, base)
        assert all(p.scale == 1.0 for p in au_processors(unet).values())


def test_adapter_save_load_roundtrip(tmp_path):
    outs = []
    for seed in (0, 1):
        unet = _unet(0)
        torch.manual_seed(seed)
        adapter = AUAdapter(14, 32, num_tokens=3, hidden=16, au_names=[f"AU{i}" for i in range(14)])
        adapter.processors = install_au_processors(unet, 3)
        if seed == 0:
            for p in adapter.parameters():  # move away from the to_k/to_v copy init
                p.data.add_(0.01 * torch.randn_like(p))
            save_au_adapter(adapter, tmp_path / "au.safetensors")
        else:
            load_au_adapter(adapter, tmp_path / "au.safetensors")
        aus = torch.linspace(0, 1, 28).view(2, 14)
        with torch.no_grad():
            ehs = torch.cat([torch.ones(2, 5, 32), adapter(aus)], 1)
            outs.append(unet(torch.ones(2, 1, 16, 16), torch.tensor([3, 700]), encoder_hidden_states=ehs).sample)
    assert torch.equal(outs[0], outs[1])
    wrong = AUAdapter(12, 32, num_tokens=3, hidden=16)
    with pytest.raises(ValueError, match="14 AUs"):
        load_au_adapter(wrong, tmp_path / "au.safetensors")


def test_adapter_rejects_wrong_au_length():
    adapter = AUAdapter(3, 8, num_tokens=2, hidden=8, au_names=["AU1", "AU2", "AU4"])
    assert adapter(torch.tensor([[0.0, 1.0, 1.0]])).shape == (1, 2, 8)  # binary AUs are fine
    with pytest.raises(ValueError, match=r"AU1', 'AU2', 'AU4"):
        adapter(torch.zeros(1, 5))
