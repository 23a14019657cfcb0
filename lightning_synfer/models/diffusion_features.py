"""What the pseudo-labeler reads out of a frozen diffusion UNet, and the block that fuses it.

    DiffusionFeatureExtractor(unet)      forward hooks on every up block (multi-scale features) and an
                                         AttentionKeepingProcessor around every cross-attention processor;
                                         forward(x_t, t, cond) -> (features [(B, C_i, H_i, W_i)],
                                                                   maps [(B, T, h_l, w_l)] per cross-attn layer)
    BidirectionalFusion(dim, heads)      feature tokens attend to attention tokens and vice versa

Attention maps: the wrapper recomputes softmax(QK^T / sqrt(d)) of the layer's queries against the TEXT tokens
and hands the call on to the processor it wraps, unchanged, so the UNet's output is exactly what it was
(AttnProcessor2_0, LoRA, or the FAU adapter's AUAttnProcessor). With an AUAttnProcessor the last M tokens of
encoder_hidden_states are AU tokens in their own, separate softmax; only the text-token part is kept: its
probabilities sum to 1 per query like a plain cross-attention, so maps from generators with and without the
adapter mean the same thing. The cost is one extra Q/K projection per cross-attention layer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_synfer.models.au_adapter import query_key_heads


class AttentionStore:
    """Shared by the extractor and its processors: the maps of the current forward pass, by layer name."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.text_tokens: int = 0  # keep the first N text tokens (0 = all)


class AttentionKeepingProcessor(nn.Module):
    """Wraps a cross-attention processor; stores the head-averaged text-token attention (B, queries, T)."""

    def __init__(self, inner: Any, store: AttentionStore, name: str) -> None:
        super().__init__()
        if isinstance(inner, AttentionKeepingProcessor):
            raise ValueError(f"{name}: already wrapped by an AttentionKeepingProcessor")
        self.inner = inner  # an nn.Module inner (AU processor) stays in the state_dict under .inner.
        self.store = store
        self.name = name
        # The FAU adapter appends its M AU tokens after the text tokens.
        self.num_au_tokens = int(getattr(inner, "num_tokens", 0)) if type(inner).__name__ == "AUAttnProcessor" else 0

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            self.store.maps[self.name] = self.text_attention(attn, hidden_states, encoder_hidden_states, temb)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def text_attention(self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor,
                       temb: Optional[torch.Tensor]) -> torch.Tensor:
        # The same pre-processing as diffusers' AttnProcessor, up to the attention probabilities.
        h = hidden_states
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb)
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        if self.num_au_tokens:
            context = context[:, :-self.num_au_tokens]
        if self.store.text_tokens:
            context = context[:, :self.store.text_tokens]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, _ = query_key_heads(attn, attn.to_q(h), attn.to_k(context))
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        return scores.softmax(dim=-1).mean(dim=1)  # (B, queries, T), heads averaged


def spatial_shape(num_queries: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a layer with `num_queries` positions in a UNet whose input is height x width.

    Down blocks halve with ceil rounding (stride-2 conv, padding 1), so try 1, 2, 4, ... in turn.
    """
    h, w = height, width
    for _ in range(16):
        if h * w == num_queries:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"attention layer with {num_queries} queries does not match a downsampling of the "
                     f"{height}x{width} UNet input")


class KeepOutput:
    """Forward hook: puts a block's output into slot i of a shared list."""

    def __init__(self, sink: list, i: int) -> None:
        self.sink, self.i = sink, int(i)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.sink[self.i] = output[0] if isinstance(output, (tuple, list)) else output


class DiffusionFeatureExtractor(nn.Module):
    """A frozen UNet instrumented for read-out: up-block outputs and cross-attention maps of one pass."""

    def __init__(self, unet: nn.Module, text_tokens: int = 0) -> None:
        super().__init__()
        from lightning_synfer.models.au_adapter import cross_attention_layers

        self.unet = unet
        self.store = AttentionStore()
        self.store.text_tokens = int(text_tokens)
        layers = cross_attention_layers(unet)
        if not layers:
            raise ValueError("DiffusionFeatureExtractor: the UNet has no cross-attention layers (expected a "
                             "UNet2DConditionModel with CrossAttn blocks); the attention branch needs them")
        procs = dict(unet.attn_processors)
        for name in layers:
            procs[name] = AttentionKeepingProcessor(procs[name], self.store, name)
        unet.set_attn_processor(procs)
        self.attention_layers: list[str] = list(layers)
        ups = getattr(unet, "up_blocks", None)
        if not ups:
            raise ValueError("DiffusionFeatureExtractor: the UNet has no up_blocks to hook (expected a diffusers "
                             "UNet2DConditionModel)")
        self.scale_channels: list[int] = [int(c) for c in reversed(unet.config.block_out_channels)]
        # One list shared with the hooks and cleared in place (the hooks hold it: picklable for ddp_spawn).
        self._features: list[Optional[torch.Tensor]] = [None] * len(ups)
        for i, block in enumerate(ups):
            block.register_forward_hook(KeepOutput(self._features, i))

    def _clear(self) -> None:
        self.store.maps.clear()
        for i in range(len(self._features)):
            self._features[i] = None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._clear()
        # The UNet's own output is not needed; the hooks and processors keep what the labeler reads.
        self.unet(x_t, t, encoder_hidden_states=cond)
        features = list(self._features)
        if any(f is None for f in features):
            raise RuntimeError("DiffusionFeatureExtractor: an up block did not run (hooks missed a scale)")
        height, width = x_t.shape[-2:]
        maps = []
        for name in self.attention_layers:
            probs = self.store.maps.get(name)
            if probs is None:
                raise RuntimeError(f"DiffusionFeatureExtractor: cross-attention layer {name} did not run")
            h, w = spatial_shape(probs.shape[1], height, width)
            maps.append(probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w))
        self._clear()
        return features, maps


class BidirectionalFusion(nn.Module):
    """Feature tokens attend to attention tokens and attention tokens to feature tokens (both from the block's
    inputs), each with a residual + LayerNorm, then a residual MLP + LayerNorm per stream."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.feat_to_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_to_feat = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_f1, self.norm_a1 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_f2, self.norm_a2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_f = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.mlp_a = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, feats: torch.Tensor, attns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.norm_f1(feats + self.feat_to_attn(feats, attns, attns, need_weights=False)[0])
        a = self.norm_a1(attns + self.attn_to_feat(attns, feats, feats, need_weights=False)[0])
        return self.norm_f2(f + self.mlp_f(f)), self.norm_a2(a + self.mlp_a(a))


class FeatureTokens(nn.Module):
    """Branch 1: standardise every scale's channels (BatchNorm without affine, as in MAE's linear probing),
    average-pool to a grid x grid map; each cell is a token (Linear to dim) with learned scale and position
    embeddings.

    Frozen features carry a large constant part per channel and a small image-dependent part; a per-token
    LayerNorm kept the constant part and the heads stayed at chance on the tiny generator's features, while
    per-channel standardisation over the data exposes the part that differs between faces.

    Where on the face a feature fires is what tells expressions apart: one globally pooled token per scale
    kept too little of it (a linear read-out of pooled tiny-generator features was near chance on the embedded
    faces, 4 x 4 cells were not), so grid=1 is the global-pool variant and the default keeps a coarse layout.
    """

    def __init__(self, channels: list[int], dim: int, grid: int = 4) -> None:
        super().__init__()
        self.grid = int(grid)
        self.norm = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for c in channels)
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in channels)
        self.scale_embed = nn.Parameter(torch.zeros(len(channels), 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        nn.init.normal_(self.scale_embed, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        tokens = [proj(F.adaptive_avg_pool2d(norm(f.float()), self.grid).flatten(2).transpose(1, 2))
                  for norm, proj, f in zip(self.norm, self.proj, features)]  # each (B, grid^2, dim)
        x = torch.stack(tokens, dim=1) + self.scale_embed + self.pos_embed  # (B, scales, grid^2, dim)
        return x.flatten(1, 2)  # (B, scales * grid^2, dim)


class AttentionTokens(nn.Module):
    """Branch 2: every layer's head-averaged map of every text token, resized to grid x grid, is one token:
    Linear(grid^2 -> dim) shared by all, plus learned layer and text-token embeddings."""

    def __init__(self, num_layers: int, num_tokens: int, grid: int, dim: int) -> None:
        super().__init__()
        self.grid, self.num_tokens = int(grid), int(num_tokens)
        # LayerNorm over each map: with a fixed caption the maps differ between faces only by small spatial
        # shifts of attention; standardising each map makes that pattern, not its tiny amplitude, the signal.
        self.norm = nn.LayerNorm(self.grid * self.grid)
        self.proj = nn.Linear(self.grid * self.grid, dim)
        self.layer_embed = nn.Parameter(torch.zeros(num_layers, 1, dim))
        self.token_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.normal_(self.layer_embed, std=0.02)
        nn.init.normal_(self.token_embed, std=0.02)

    def resize(self, m: torch.Tensor) -> torch.Tensor:
        if m.shape[-2:] == (self.grid, self.grid):
            return m
        return F.interpolate(m, size=(self.grid, self.grid), mode="bilinear", align_corners=False,
                             antialias=m.shape[-1] > self.grid)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        grids = torch.stack([self.resize(m.float()) for m in maps], dim=1)  # (B, L, T, g, g)
        b, layers, tokens = grids.shape[:3]
        x = self.proj(self.norm(grids.flatten(3))) + self.layer_embed + self.token_embed
        return x.reshape(b, layers * tokens, -1)  # (B, L*T, dim)


__all__ = ["AttentionStore", "AttentionKeepingProcessor", "DiffusionFeatureExtractor", "BidirectionalFusion",
           "FeatureTokens", "AttentionTokens", "spatial_shape"]
