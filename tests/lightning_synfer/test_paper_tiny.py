"""pipeline/paper_tiny: the paper's whole stage graph (experiments/pipeline/paper.yaml) end to end on CPU, on a tiny
Stable Diffusion folder and tiny AffectNet / RAF-DB / SFEW folders in their real layouts, all built in tmp_path.

Checks every stage's artefacts, that semantic guidance backpropagates through the VAE decoder and the layout start
encodes real faces with the VAE encoder (in the SynFER synthesis stages only), the two-stage generator recipe
(stage 2 keeps stage 1's UNet and adds the adapter), set sizes from the real split's size, and the report's tables.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fixtures import make_affectnet, make_rafdb, make_sfew, make_tiny_sd, write_fetext
from lightning_synfer.config import compose

REPO = Path(__file__).resolve().parents[2]
AFFECTNET_TRAIN = 9  # codes cycle 0..7, 0: the 7-class train split drops the one contempt face (code 7) -> 8 = one batch


def build_inputs(root: Path) -> dict[str, str]:
    """The tiny SD folder and datasets; returns the environment variables that point paths.* at them."""
    affectnet = make_affectnet(root / "AffectNet", n_train=AFFECTNET_TRAIN, n_val=8, size=32)
    write_fetext(affectnet)
    return {"SYNFER_SD": str(make_tiny_sd(root / "sd")), "SYNFER_AFFECTNET": str(affectnet),
            "SYNFER_RAFDB": str(make_rafdb(root / "RAF-DB", n_train=8, n_test=7, size=32)),
            "SYNFER_SFEW": str(make_sfew(root / "SFEW", per_class=2, size=32))}


class VAECalls:
    """Records, per pipeline stage, the VAE encoder/decoder calls and whether a gradient flowed into the decoder."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import AutoencoderKL

        from lightning_synfer.pipeline import runner

        self.stage = None
        self.calls: dict[str, dict[str, int]] = {}
        prepare, encode, decode = runner._Run.prepare, AutoencoderKL.encode, AutoencoderKL.decode

        def track_prepare(run, name):
            self.stage = name
            return prepare(run, name)

        def count(kind):
            entry = self.calls.setdefault(self.stage, {"encode": 0, "decode": 0, "decode_with_grad": 0})
            entry[kind] += 1

        def track_encode(vae, x, *args, **kwargs):
            count("encode")
            return encode(vae, x, *args, **kwargs)

        def track_decode(vae, z, *args, **kwargs):
            count("decode")
            if torch.is_grad_enabled() and z.requires_grad:
                count("decode_with_grad")
            return decode(vae, z, *args, **kwargs)

        from lightning_synfer.modules.labeler import LatentEncoder

        latent = LatentEncoder.forward

        def track_latent(encoder, x):  # the labeler runs the VAE's encoder and quant_conv itself
            count("encode")
            return latent(encoder, x)

        monkeypatch.setattr(LatentEncoder, "forward", track_latent)
        monkeypatch.setattr(runner._Run, "prepare", track_prepare)
        monkeypatch.setattr(AutoencoderKL, "encode", track_encode)
        monkeypatch.setattr(AutoencoderKL, "decode", track_decode)

    def of(self, stage: str) -> dict[str, int]:
        return self.calls.get(stage, {"encode": 0, "decode": 0, "decode_with_grad": 0})


@pytest.mark.slow
def test_paper_tiny_runs_the_paper_graph_end_to_end(tmp_path, monkeypatch):
    from datamodules.synthetic import read_manifest
    from lightning_synfer.tasks import pipeline

    for key, value in build_inputs(tmp_path / "inputs").items():
        monkeypatch.setenv(key, value)
    vae = VAECalls(monkeypatch)
    cfg = compose("pipeline/paper_tiny", [f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"])
    full = OmegaConf.load(REPO / "experiments" / "pipeline" / "paper.yaml")
    assert [s.name for s in cfg.pipeline.stages] == [s["name"] for s in full.pipeline.stages]  # the same graph
    pipeline.run(cfg)
    root = tmp_path / "runs" / "pipeline" / "pipeline_paper_tiny"
    record = json.loads((root / "pipeline.json").read_text())["stages"]

    # Every stage finished with its metrics and declared artefacts.
    for stage in cfg.pipeline.stages:
        rec = record[stage.name]
        assert (Path(rec["run_dir"]) / "metrics.json").is_file(), stage.name
        assert set(rec["artifacts"]) == set(stage.artifacts) and all(Path(p).exists() for p in rec["artifacts"].values())
    metrics = {name: rec["metrics"] for name, rec in record.items()}

    # Two-stage generator: stage 2 trains the adapter only, on stage 1's (EMA) UNet, which its export keeps unchanged.
    fetext, synfer = (Path(record[n]["artifacts"]["export"]) for n in ("gen_fetext", "gen_synfer"))
    assert not (fetext / "au_adapter.safetensors").exists() and (synfer / "au_adapter.safetensors").is_file()
    stage1 = load_file(str(fetext / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    stage2 = load_file(str(synfer / "unet" / "diffusion_pytorch_model.safetensors"))
    assert stage1.keys() == stage2.keys() and all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    assert metrics["gen_sd15"]["steps"] == 0 and metrics["gen_fetext"]["steps"] == metrics["gen_synfer"]["steps"] >= 1

    # Synthesis: guidance differentiates through the VAE decoder, the layout start encodes faces with the VAE encoder;
    # both only where the paper has them (SynFER rows), none before.
    for row in ("synfer", "1x", "5x"):
        calls = vae.of(f"syn_{row}")
        assert calls["decode_with_grad"] > 0 and calls["encode"] > 0, (row, calls)
        _, recs = read_manifest(record[f"syn_{row}"]["artifacts"]["dir"], version=1)
        assert all("layout" in r for r in recs) and metrics[f"syn_{row}"]["guidance"]
    for row in ("sd15", "fetext", "fau"):
        calls = vae.of(f"syn_{row}")
        assert calls["decode"] > 0 and calls["decode_with_grad"] == 0 and calls["encode"] == 0, (row, calls)
        _, recs = read_manifest(record[f"syn_{row}"]["artifacts"]["dir"], version=1)
        assert not any("layout" in r for r in recs)
    real = AFFECTNET_TRAIN - 1  # 7-class AffectNet train of the fixture (its contempt face dropped)
    assert metrics["syn_1x"]["set_size"] == {"real_images": real, "real_multiple": 1.0, "num_images": real}
    assert metrics["syn_1x"]["num_records"] == real and metrics["syn_5x"]["num_records"] == 5 * real
    assert metrics["syn_sd15"]["num_records"] == 8

    # Labels: every set rectified into manifest v2 after its generation metrics read v1; the labeler read latents.
    for row in ("sd15", "fetext", "fau", "synfer", "1x", "5x"):
        header, recs = read_manifest(record[f"syn_{row}"]["artifacts"]["dir"])
        assert len(recs) and all("label_source" in r for r in recs), row
        assert metrics[f"eval_{row}"]["fer_accuracy"] is not None if row in ("sd15", "fetext", "fau", "synfer") else True
    assert vae.of("feranno")["encode"] > 0
    for name in ("abl_rafdb_synfer", "abl_affectnet_synfer_intended", "sup_rafdb_vit_small_synfer", "synonly_5x"):
        assert 0 <= metrics[name]["test"]["accuracy"] <= 1
    for data in ("affectnet", "synfer", "both"):
        assert all(0 <= metrics[f"probe_{data}_{p}"]["accuracy"] <= 1 for p in ("rafdb", "affectnet", "sfew"))

    # The report: every paper table with the paper's numbers beside ours.
    report = (root / "report" / "report.md").read_text()
    for table in full.pipeline.tables:
        assert f"## {table.title}" in report
    for paper_number in ("(55.14)", "(16.32)", "(68.13)", "(69.84)", "(81.68)"):
        assert paper_number in report
