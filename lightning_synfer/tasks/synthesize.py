"""`python run.py synthesize synthesis.generator=PATH synthesis.num_images=N synthesis.out=DIR
[guidance.enabled=true guidance.classifier=CKPT] [synthesis.layout.enabled=true synthesis.layout.root=DIR]`.

Specs (sampling/specs.py) -> a Dataset -> trainer.predict with Lightning's distributed sampler ->
SynthesisWriter (images + per-rank manifest parts) -> rank 0 merges into the synthetic dataset format.
Rerunning the same command resumes: specs whose image and manifest line exist are skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lightning_synfer.config.compose import to_container
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.sampling.ddim import DDIMSampler, SamplerSettings
from lightning_synfer.sampling.guidance import SemanticGuidance
from lightning_synfer.sampling.inversion import (ddim_invert, image_geometry, inverted_steps, list_layout_images,
                                                 load_image_m11)
from lightning_synfer.sampling.specs import Spec, specs_from_config
from lightning_synfer.synthesis.merge import check_info, collect_records, done_ids, merge
from lightning_synfer.synthesis.writer import SynthesisWriter
from lightning_synfer.tasks.common import finish, peak_memory_mb, start_run
from lightning_synfer.trainer import build_trainer


class SpecDataset(Dataset):
    def __init__(self, specs: Sequence[Spec]) -> None:
        self.specs = list(specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.specs[i].to_dict()


def collate_specs(items: list[dict]) -> dict[str, Any]:
    has_aus = all(it["aus"] is not None for it in items)
    return {
        "id": [it["id"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "aus": torch.tensor([it["aus"] for it in items], dtype=torch.float32) if has_aus else None,
        "caption": [it["caption"] for it in items],
        "caption_source": [it["caption_source"] for it in items],
        "seed": [int(it["seed"]) for it in items],
    }


class SynthesisModule(L.LightningModule):
    """predict_step: a batch of specs -> uint8 images + manifest records. Wraps the generator unchanged."""

    def __init__(self, gen: Any, settings: SamplerSettings, *, guidance: Optional[SemanticGuidance] = None,
                 layout_paths: Optional[list[str]] = None, layout_strength: float = 1.0,
                 generator_id: str = "", prompt_enricher: Any = None) -> None:
        super().__init__()
        self.gen = gen
        self.prompt_enricher = prompt_enricher  # synthesis.captions=llm (sampling/prompts.PromptEnricher)
        self.guidance = guidance
        self.settings = settings
        self.layout_paths = layout_paths
        self.layout_strength = float(layout_strength)
        self.generator_id = generator_id
        self._sampler: Optional[DDIMSampler] = None

    @property
    def sampler(self) -> DDIMSampler:
        if self._sampler is None:
            self._sampler = DDIMSampler(self.gen, self.settings, guidance=self.guidance)
        return self._sampler

    def layout_start(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        size, channels = image_geometry(self.gen)
        # The face is picked by the spec's seed: the same spec always starts from the same face.
        paths = [self.layout_paths[s % len(self.layout_paths)] for s in batch["seed"]]
        images = torch.stack([load_image_m11(p, size, channels) for p in paths])
        k = inverted_steps(self.settings.steps, self.layout_strength)
        return ddim_invert(self.sampler, images, batch["caption"], batch["aus"], num_steps=k, seeds=batch["seed"])

    def enrich_prompts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """synthesis.captions=llm: this rank's coarse captions -> detailed prompts (the coarse one is kept)."""
        if self.prompt_enricher is None:
            return batch
        names = [self.gen.label_names[int(i)] for i in batch["label"]]
        aus = batch["aus"].tolist() if batch["aus"] is not None else None
        enriched = self.prompt_enricher(batch["caption"], names, aus, list(self.gen.au_names))
        return {**batch, "coarse_caption": list(batch["caption"]), "caption": [p for p, _ in enriched],
                "caption_source": [src for _, src in enriched]}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        batch = self.enrich_prompts(batch)
        x_start, start_index = None, 0
        if self.layout_paths:
            x_start, start_index = self.layout_start(batch)
        images = self.sampler.sample(batch["caption"], batch["aus"], batch["seed"], labels=batch["label"],
                                     x_start=x_start, start_index=start_index)
        arr = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        arr = arr.permute(0, 2, 3, 1).numpy()
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
        records = []
        for i, rid in enumerate(batch["id"]):
            # `caption` is the prompt the generator saw; caption_source says how it was made
            rec = {"id": rid, "index": int(batch["index"][i]), "label": int(batch["label"][i]),
                   "caption": batch["caption"][i], "caption_source": batch["caption_source"][i],
                   "seed": int(batch["seed"][i]), "generator": self.generator_id}
            if "coarse_caption" in batch:
                rec["coarse_caption"] = batch["coarse_caption"][i]
            if batch["aus"] is not None:
                rec["aus"] = [round(float(a), 6) for a in batch["aus"][i].tolist()]
            if self.layout_paths:
                rec["layout"] = os.path.basename(self.layout_paths[batch["seed"][i] % len(self.layout_paths)])
            records.append(rec)
        return {"images": arr, "records": records}


def generator_id(path: Optional[str]) -> str:
    """name@hash of a generator export folder or checkpoint: sizes and sampled bytes, fast on large files."""
    if not path:
        return "in-memory"
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return f"{p.stem or p.name}@{h.hexdigest()[:12]}"


def load_generator(cfg: DictConfig) -> Any:
    path = cfg.synthesis.generator
    if not path:
        raise ConfigError("synthesize needs synthesis.generator=PATH (a generator export folder or .ckpt from `fit`)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"synthesis.generator={path}: no such file or folder")
    from lightning_synfer.modules.generator import GeneratorModule

    return GeneratorModule.load(path)


def synthesis_info(cfg: DictConfig, specs: Sequence[Spec], gen_id: str) -> dict[str, Any]:
    """Everything that decides the images; a resume must match it exactly."""
    blob = json.dumps([s.to_dict() for s in specs], sort_keys=True).encode()
    c = to_container(cfg)
    info = {"specs_sha256": hashlib.sha256(blob).hexdigest(), "num_specs": len(specs), "generator": gen_id,
            "sampling": c["sampling"], "guidance": c["guidance"],
            "layout": c["synthesis"]["layout"] if cfg.synthesis.layout.enabled else {"enabled": False}}
    if cfg.synthesis.captions == "llm":  # the specs hold the coarse captions; the LLM decides the prompts
        info["prompt_llm"] = c["synthesis"]["llm"]
    return info


def synthesis_module(cfg: DictConfig, gen: Any, gen_id: str, label_names: Sequence[str]) -> SynthesisModule:
    """The generator with the sampler settings, semantic guidance and layout start of the config."""
    layout = cfg.synthesis.layout
    layout_paths = None
    if layout.enabled:
        if not layout.root:
            raise ConfigError("synthesis.layout.enabled=true needs synthesis.layout.root=DIR (a folder of real faces)")
        layout_paths = list_layout_images(layout.root, layout.format, layout.split, key="synthesis.layout.root")
    enricher = None
    if cfg.synthesis.captions == "llm":
        from lightning_synfer.sampling.prompts import LLM_INSTRUCTION, PromptEnricher

        llm = cfg.synthesis.llm
        enricher = PromptEnricher(llm.model, max_new_tokens=llm.max_new_tokens,
                                  instruction=llm.instruction or LLM_INSTRUCTION)
    return SynthesisModule(gen, SamplerSettings.from_config(cfg.sampling),
                           guidance=SemanticGuidance.from_config(cfg.guidance, label_names), layout_paths=layout_paths,
                           layout_strength=layout.strength, generator_id=gen_id, prompt_enricher=enricher)


def resolve_set_size(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """synthesis.real_multiple: set synthesis.num_images to that multiple of the real training split's size
    (counted now, in the split's own label space). Returns what was counted, or None when num_images is given."""
    y = cfg.synthesis
    if y.real_multiple is None:
        return None
    from datamodules.adapters import load_records
    from datamodules.labels import LabelSpace

    real = y.real_set
    records = load_records(real.format, real.root, real.split, LabelSpace.from_num_classes(int(real.num_classes)),
                           key="synthesis.real_set.root")
    if not len(records):
        raise ValueError(f"synthesis.real_set.root={real.root}: no {real.format} {real.split} images to size the "
                         f"synthetic set by (synthesis.real_multiple={y.real_multiple})")
    num = int(round(float(y.real_multiple) * len(records)))
    if y.num_images and y.num_images != num:
        raise ConfigError(f"synthesis.num_images={y.num_images} and synthesis.real_multiple={y.real_multiple} "
                          f"(= {num} images of {len(records)} real) disagree; set one of them")
    y.num_images = num
    return {"real_images": len(records), "real_multiple": float(y.real_multiple), "num_images": num}


def run(cfg: DictConfig, argv: Optional[list[str]] = None, *, generator: Any = None,
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """`generator`: an already built GeneratorModule (tests, notebooks) instead of synthesis.generator."""
    if not cfg.synthesis.out:
        raise ConfigError("synthesize needs synthesis.out=DIR (the synthetic dataset folder to write or resume)")
    set_size = resolve_set_size(cfg)
    gen = generator if generator is not None else load_generator(cfg)
    # eval() only: GeneratorModule's EMA swap reads the trainable set from requires_grad, so no freezing here
    # (sampling runs under no_grad; semantic guidance differentiates w.r.t. the text embedding only).
    gen.eval()
    gen_id = generator_id(cfg.synthesis.generator) if generator is None else getattr(gen, "generator_id",
                                                                                     "in-memory")
    run_dir = start_run(cfg, argv)
    label_names = list(gen.label_names)
    au_names = list(gen.au_names) if getattr(gen, "au_adapter", None) is not None else []
    specs = specs_from_config(cfg, label_names, au_names, generator_cfg=getattr(gen, "cfg", None))
    out = str(cfg.synthesis.out)
    os.makedirs(out, exist_ok=True)
    from lightning_synfer.runs import is_global_zero

    check_info(out, synthesis_info(cfg, specs, gen_id), write=is_global_zero())
    expected = {s.id for s in specs}
    # Snapshot before any rank writes (DDP init is a rendezvous), so all ranks shard the same list.
    done = done_ids(out)
    remaining = [s for s in specs if s.id not in done]
    size, channels = _geometry(gen)
    header_meta = {"image_size": size, "channels": channels, "generator": gen_id}

    module = synthesis_module(cfg, gen, gen_id, label_names)
    t0 = time.perf_counter()
    merged = None
    if remaining:
        writer = SynthesisWriter(out, label_names=label_names, au_names=au_names,
                                 shard_size=cfg.synthesis.shard_size, expected_ids=expected, header_meta=header_meta)
        loader = DataLoader(SpecDataset(remaining), batch_size=cfg.synthesis.batch_size, shuffle=False,
                            num_workers=0, collate_fn=collate_specs)
        trainer = build_trainer(cfg, run_dir, use_distributed_sampler=True, monitor=None, enable_checkpointing=False,
                                callbacks=[writer, *callbacks], logger=False,
                                # Guidance differentiates through the UNet: predict must not run in inference mode.
                                inference_mode=module.guidance is None)
        if trainer.is_global_zero:
            print(f"[synfer] synthesize: {len(remaining)} of {len(specs)} images to generate "
                  f"({len(specs) - len(remaining)} already in {out})", flush=True)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if not trainer.is_global_zero:
            return {}
    elif is_global_zero():
        merged = merge(out, label_names, au_names, expected_ids=expected, header_meta=header_meta)
    wall = time.perf_counter() - t0
    if not is_global_zero():
        return {}
    records = collect_records(out, expected)
    new = len(records) - len(done & expected)
    metrics = {"task": "synthesize", "out": out, "generator": gen_id, "num_specs": len(specs),
               "num_records": len(records), "num_new": new, "num_resumed": len(done & expected),
               "wall_time_s": wall, "images_per_s": new / wall if wall > 0 else None,
               "guidance": bool(cfg.guidance.enabled), "layout": bool(cfg.synthesis.layout.enabled),
               "complete": len(records) == len(specs), **peak_memory_mb()}
    if merged is not None:
        metrics["merged"] = merged
    if set_size is not None:
        metrics["set_size"] = set_size
    print(f"[synfer] synthesize: {len(records)}/{len(specs)} records in {out}/manifest.jsonl, "
          f"{new} new at {metrics['images_per_s'] or 0:.2f} images/s", flush=True)
    return finish(run_dir, metrics)


def _geometry(gen: Any) -> tuple[int, int]:
    from lightning_synfer.sampling.inversion import image_geometry

    return image_geometry(gen)
