"""Synthesis end to end with the real (tiny) GeneratorModule: interrupted + resumed runs, 2-process DDP,
and evaluate-generation (FER accuracy, AU error, FID/KID with backbone features)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules.labels import CANONICAL_8
from datamodules.procedural.aus import AU_NAMES
from datamodules.synthetic import read_manifest
from fixtures import CrashAfter, make_synthetic_set, write_image
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.tasks import synthesize


@pytest.fixture(scope="module")
def gen_export(tmp_path_factory):
    """A randomly initialised tiny generator (the real module), exported like `fit` does."""
    from lightning_synfer.modules.generator import GeneratorModule

    cfg = compose("generator/tiny_test", ["data.image_size=16"])
    torch.manual_seed(0)
    gen = GeneratorModule(config=to_container(cfg), label_names=list(CANONICAL_8))
    return gen.save_pretrained(tmp_path_factory.mktemp("gen") / "export")


def _overrides(tmp_path, export, out, *extra):
    return ["trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.image_size=16",
            "data.train.num_images=32", f"paths.runs_dir={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"synthesis.generator={export}", f"synthesis.out={out}", "synthesis.batch_size=2", "sampling.steps=2",
            "synthesis.shard_size=4", *extra]


def _part_lines(out: Path) -> list[dict]:
    lines = []
    for p in sorted((out / "parts").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def test_interrupted_synthesis_resumes_to_exactly_n_unique_records(tmp_path, gen_export):
    out = tmp_path / "synth"
    args = _overrides(tmp_path, gen_export, out, "synthesis.num_images=7")
    cfg = compose("generator/synthesize_embedded", args)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        synthesize.run(cfg, callbacks=[CrashAfter(2)])
    assert not (out / "manifest.jsonl").exists()
    first = _part_lines(out)
    assert len(first) == 4 and all((out / r["image"]).is_file() for r in first)
    # A crash mid-line leaves a partial JSON line; an image may exist without its line.
    part = next((out / "parts").glob("*.jsonl"))
    with open(part, "a") as fh:
        fh.write('{"id": "0-000000')
    assert main(["synthesize", "experiment=generator/synthesize_embedded", *args]) == 0
    header, records = read_manifest(str(out))
    assert len(records) == 7 and len({r["id"] for r in records}) == 7
    assert [r["index"] for r in records] == list(range(7))
    assert header["label_names"] == list(CANONICAL_8) and header["au_names"] == list(AU_NAMES)
    assert header["image_size"] == 16 and header["channels"] == 1 and records[0]["generator"] == header["generator"]
    assert all(len(r["aus"]) == len(AU_NAMES) and r["caption"] for r in records)
    assert len(_part_lines(out)) == 7  # the resumed run generated only the 3 missing images
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert images == sorted(r["image"] for r in records) and records[5]["image"].startswith("images/00001/")
    # A third run has nothing to do and keeps the set as it is.
    assert main(["synthesize", "experiment=generator/synthesize_embedded", *args]) == 0
    assert read_manifest(str(out))[1] == records
    # Other settings into the same folder are refused instead of mixing two sets.
    assert main(["synthesize", "experiment=generator/synthesize_embedded", *args, "synthesis.seed=5"]) == 2


@pytest.mark.ddp
def test_two_process_synthesis_writes_disjoint_parts(tmp_path, gen_export, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks start their own torch
    out = tmp_path / "synth"
    args = _overrides(tmp_path, gen_export, out, "synthesis.num_images=6", "trainer.accelerator=cpu",
                      "trainer.devices=2", "trainer.strategy=ddp_spawn")
    synthesize.run(compose("generator/synthesize_embedded", args))
    by_rank = {}
    for p in (out / "parts").glob("*.jsonl"):
        rank = p.name.split("-")[0]
        by_rank.setdefault(rank, set()).update(json.loads(line)["id"] for line in p.read_text().splitlines())
    assert sorted(by_rank) == ["rank0", "rank1"]
    assert not (by_rank["rank0"] & by_rank["rank1"])
    assert len(by_rank["rank0"]) + len(by_rank["rank1"]) == 6
    _, records = read_manifest(str(out))
    assert {r["id"] for r in records} == by_rank["rank0"] | by_rank["rank1"] and len(records) == 6


def _judge_ckpt(tmp_path: Path) -> Path:
    """A small supervised classifier with an AU head, saved the way fit's checkpoints are."""
    from lightning_synfer.modules.supervised import SupervisedFER

    cfg = compose("supervised/embedded", ["model.au_head=true", "data.image_size=16", "data.channels=1",
                                          "data.num_classes=7", "logger.log_confusion_matrix=false"])
    module = SupervisedFER(config=to_container(cfg), label_names=list(CANONICAL_8[:7]), au_names=list(AU_NAMES))
    path = tmp_path / "judge.ckpt"
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_evaluate_generation_reports_fer_au_fid_kid(tmp_path):
    synth = make_synthetic_set(tmp_path / "set", n=16, num_classes=8, size=20, mode="L")
    real = tmp_path / "real"
    for i in range(10):
        write_image(real / f"{i}.png", size=24, mode="L", seed=100 + i)
    judge = _judge_ckpt(tmp_path)
    argv = ["evaluate-generation", f"generation_eval.dataset={synth}", f"generation_eval.judge={judge}",
            f"generation_eval.real.root={real}", "generation_eval.kid_subset_size=5", "generation_eval.batch_size=6",
            f"paths.runs_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false"]
    assert main(argv) == 0
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert metrics["num_images"] == 14 and metrics["excluded_classes"] == {"contempt": 2}
    assert 0 <= metrics["fer_accuracy"] <= 1 and sum(metrics["per_class_counts"].values()) == 14
    assert metrics["per_class"]["happy"]["count"] == 2
    # AUs: the fixture's DISFA-style names (AU01...) meet the judge's (AU1...) where they overlap.
    assert 0 <= metrics["au"]["mae"] <= 1 and 0 <= metrics["au"]["accuracy"] <= 1
    assert set(metrics["au"]["per_au_mae"]) == {"AU01", "AU02", "AU04", "AU05", "AU06", "AU09", "AU12", "AU15",
                                                  "AU20", "AU25", "AU26"}
    assert metrics["fid"] is not None and metrics["fid"] >= -1e-6 and metrics["kid"] is not None
    assert metrics["num_real"] == 10 and metrics["fid_features"].startswith("backbone:")
    # Inception needs local weights: a clear config error, no download.
    assert main([*argv, "generation_eval.features=inception"]) == 2


def test_synthesis_with_semantic_guidance_and_layout_start(tmp_path, gen_export):
    faces = tmp_path / "faces"
    for i in range(3):
        write_image(faces / f"face{i}.png", size=24, mode="L", seed=i)
    judge = _judge_ckpt(tmp_path)  # 7 classes: contempt specs are sampled unguided
    out = tmp_path / "synth"
    args = _overrides(tmp_path, gen_export, out, "synthesis.num_images=4", "guidance.enabled=true",
                      f"guidance.classifier={judge}", "guidance.window=1.0", "guidance.scale=0.5",
                      "synthesis.layout.enabled=true", f"synthesis.layout.root={faces}",
                      "synthesis.layout.strength=0.5", "sampling.steps=2")
    metrics = synthesize.run(compose("generator/synthesize_sg", args))
    assert metrics["complete"] and metrics["guidance"] and metrics["layout"] and metrics["num_new"] == 4
    _, records = read_manifest(str(out))
    assert len(records) == 4 and all(r["layout"] in {"face0.png", "face1.png", "face2.png"} for r in records)
    info = json.loads((out / "synthesis.json").read_text())
    assert info["guidance"]["enabled"] and info["layout"]["strength"] == 0.5


def test_real_generator_sampling_is_deterministic(gen_export):
    from lightning_synfer.modules.generator import GeneratorModule
    from lightning_synfer.sampling import DDIMSampler, SamplerSettings

    gen = GeneratorModule.load(gen_export)
    sampler = DDIMSampler(gen, SamplerSettings(steps=3, eta=1.0, text_scale=3.0, au_scale=2.0, use_ema=True))
    caps = ["a photo of a face looking happy", "a sad face", "", "an angry face"]
    aus = torch.rand(4, len(gen.au_names), generator=torch.Generator().manual_seed(0))
    a = sampler.sample(caps, aus, [11, 12, 13, 14])
    assert torch.equal(a, sampler.sample(caps, aus, [11, 12, 13, 14]))
    b = sampler.sample(caps[2:], aus[2:], [13, 14])
    torch.testing.assert_close(b, a[2:], atol=1e-4, rtol=0)


class PostfixSpy(Callback):
    """Reads the predict bar's postfix after each batch (callbacks given to run() come after the writer)."""

    def __init__(self) -> None:
        self.postfixes: list[str] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.postfixes.append(trainer.progress_bar_callback.predict_progress_bar.postfix)


def test_progress_bar_shows_images_per_second(tmp_path, gen_export, capsys):
    spy = PostfixSpy()
    args = _overrides(tmp_path, gen_export, tmp_path / "synth", "synthesis.num_images=4",
                      "trainer.enable_progress_bar=true")
    synthesize.run(compose("generator/synthesize_embedded", args), callbacks=[spy])
    assert len(spy.postfixes) == 2  # 4 images, batches of 2
    rates = [re.fullmatch(r"img/s=(\d+\.\d\d)", p or "") for p in spy.postfixes]
    assert all(rates) and all(float(r.group(1)) > 0 for r in rates), spy.postfixes
    # ... and it reaches the terminal: tqdm draws the last postfix when the bar closes.
    assert re.search(r"Predicting.*img/s=\d+\.\d\d", capsys.readouterr().out)
