"""FAU adapter: facial action units -> MLP -> M tokens, injected by decoupled cross-attention (IP-Adapter style).

The UNet's encoder_hidden_states is cat([text tokens (T), AU tokens (M)], dim=1). In every cross-attention
layer an `AUAttnProcessor` splits off the last M tokens, attends to the text tokens exactly like diffusers'
AttnProcessor2_0, attends separately to the AU tokens through its own to_k_au / to_v_au, and returns
text_attn + scale * au_attn. Self-attention layers keep their default processor. With scale = 0 the AU
branch is skipped, so the output is exactly the base model's.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class AUAdapter(nn.Module):
    """AU intensities (B, K) in [0, 1] (binary vectors too) -> (B, M, cross_dim) tokens."""

    def __init__(self, num_aus: int, cross_dim: int, num_tokens: int = 4, hidden: int = 256,
                 au_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.num_aus, self.cross_dim, self.num_tokens = int(num_aus), int(cross_dim), int(num_tokens)
        self.au_names = list(au_names) if au_names is not None else None
        self.mlp = nn.Sequential(nn.Linear(num_aus, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, num_tokens * cross_dim))
        self.norm = nn.LayerNorm(cross_dim)
        # Processors of the UNet this adapter drives (set by install_au_processors); saved with the MLP.
        self.processors: nn.ModuleDict = nn.ModuleDict()

    def forward(self, aus: torch.Tensor) -> torch.Tensor:
        if aus.ndim != 2 or aus.shape[1] != self.num_aus:
            names = f" ordered as {self.au_names}" if self.au_names else ""
            raise ValueError(f"AU vector of shape {tuple(aus.shape)}: expected (batch, {self.num_aus}){names}")
        x = self.mlp(aus.to(self.mlp[0].weight.dtype))
        return self.norm(x.view(aus.shape[0], self.num_tokens, self.cross_dim))


class AUAttnProcessor(nn.Module):
    """Cross-attention processor: text attention + scale * attention over the last `num_tokens` AU tokens."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.num_tokens, self.scale = int(num_tokens), float(scale)
        self.to_k_au = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_au = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(f"AUAttnProcessor: encoder_hidden_states must be cat([text tokens, {self.num_tokens} AU "
                             f"tokens], dim=1); got shape "
                             f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        text = encoder_hidden_states[:, :-self.num_tokens]
        au = encoder_hidden_states[:, -self.num_tokens:]
        batch_size, sequence_length, _ = text.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(text), attn.to_v(text)
        query, key, head_dim = query_key_heads(attn, query, key)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        if self.scale != 0.0:  # skipped at 0: the exact base-model computation
            au = au.to(self.to_k_au.weight.dtype)
            au_key, au_value = self.to_k_au(au), self.to_v_au(au)
            au_key = au_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            au_value = au_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            au_out = F.scaled_dot_product_attention(query, au_key.to(query.dtype), au_value.to(query.dtype),
                                                    dropout_p=0.0, is_causal=False)
            out = out + self.scale * au_out
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def query_key_heads(attn: nn.Module, query: torch.Tensor, key: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query and key of a diffusers `Attention` layer split into its heads, (B, heads, tokens, head_dim), with the
    layer's q/k norms applied as diffusers' own processors do; and head_dim. Shared by the AU processor and the
    labeler's attention-keeping processor, so both see the attention the base model computes."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, head_dim


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Processor name -> Attention module, for the cross-attention (attn2) layers only."""
    out = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[: -len(".processor")])
        if getattr(attn, "is_cross_attention", False):
            out[name] = attn
    return out


def install_au_processors(unet: nn.Module, num_tokens: int, scale: float = 1.0,
                          value_init: str = "copy") -> nn.ModuleDict:
    """Put an AUAttnProcessor on every cross-attention layer; self-attention keeps its processor.

    to_k_au / to_v_au start as copies of the layer's to_k / to_v (IP-Adapter's init), so AU tokens are
    read in the same key/value space as text from the first step. value_init="zero" starts to_v_au at zero
    instead (ControlNet's zero init): the AU branch adds nothing until it has learnt something, so a short
    adapter fine-tune of a frozen base starts from exactly the base's images.
    """
    if value_init not in ("copy", "zero"):
        raise ValueError(f"generator.au_value_init={value_init!r}: expected copy (IP-Adapter) or zero")
    cross = cross_attention_layers(unet)
    if not cross:
        raise ValueError("install_au_processors: the UNet has no cross-attention layers to condition on AUs")
    procs = dict(unet.attn_processors)
    new = nn.ModuleDict()
    ref = next(unet.parameters())
    for name, attn in cross.items():
        proc = AUAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, num_tokens, scale)
        with torch.no_grad():
            proc.to_k_au.weight.copy_(_base_weight(attn.to_k))
            if value_init == "copy":
                proc.to_v_au.weight.copy_(_base_weight(attn.to_v))
            else:
                proc.to_v_au.weight.zero_()
        proc.to(device=ref.device, dtype=torch.float32)
        procs[name] = proc
        new[_key(name)] = proc
    unet.set_attn_processor(procs)
    return new


def _base_weight(linear: nn.Module) -> torch.Tensor:
    # A peft LoRA wrapper keeps the original Linear as base_layer.
    return getattr(linear, "base_layer", linear).weight


def au_processors(unet: nn.Module) -> dict[str, AUAttnProcessor]:
    return {n: p for n, p in unet.attn_processors.items() if isinstance(p, AUAttnProcessor)}


def set_au_scale(unet: nn.Module, scale: float) -> None:
    procs = au_processors(unet)
    if not procs:
        raise ValueError("set_au_scale: this UNet has no AU processors (install_au_processors was not called)")
    for p in procs.values():
        p.scale = float(scale)


def adapter_state_dict(adapter: AUAdapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}


def save_au_adapter(adapter: AUAdapter, path: str | os.PathLike) -> None:
    """MLP + every processor's to_k_au/to_v_au, with the AU names and sizes in the metadata."""
    import json

    from safetensors.torch import save_file

    meta = {"num_aus": str(adapter.num_aus), "cross_dim": str(adapter.cross_dim),
            "num_tokens": str(adapter.num_tokens), "au_names": json.dumps(adapter.au_names or [])}
    save_file(adapter_state_dict(adapter), str(path), metadata=meta)


def load_au_adapter(adapter: AUAdapter, path: str | os.PathLike) -> None:
    """Load weights saved by save_au_adapter into `adapter` (and its installed processors)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"AU adapter {path}: no such file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    names = json.loads(meta.get("au_names", "[]"))
    if int(meta.get("num_aus", adapter.num_aus)) != adapter.num_aus or int(meta.get("num_tokens", adapter.num_tokens)) \
            != adapter.num_tokens:
        raise ValueError(f"AU adapter {path}: saved for {meta.get('num_aus')} AUs {names} and "
                         f"{meta.get('num_tokens')} tokens; this model expects {adapter.num_aus} AUs "
                         f"{adapter.au_names} and {adapter.num_tokens} tokens")
    state = load_file(str(path))
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"AU adapter {path}: weights do not match this UNet's cross-attention layers "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
