"""The paper's tables as full-scale configs (experiments/paper/): what each table needs exists, composes, and takes
its dataset and model roots from the one `paths` config (so environment variables move every table at once).

Composition only: nothing is loaded or trained (< 10 s). test_config.py composes every experiment generically.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lightning_synfer.config import compose, list_experiments

REPO = Path(__file__).resolve().parents[2]
ABLATION_ROWS = ("sd15", "sd15_fetext", "sd15_fau", "synfer")
DATASETS = ("rafdb", "affectnet")
BACKBONES = {"resnet50": "resnet50", "convnext_tiny": "convnext_tiny", "vit_small": "vit_small_patch16_224"}

TABLES = {
    "generation": ["paper/generator/sd15", "paper/generator/sd15_synfer", "paper/synthesize/sd15",
                   "paper/synthesize/synfer", "paper/judge/affectnet_convnext_au", "paper/generation/evaluate",
                   "paper/supervised/affectnet_resnet50"],  # the semantic-guidance classifier
    "ablation": ["paper/generator/sd15", "paper/generator/sd15_fetext", "paper/generator/sd15_synfer"]
    + [f"paper/synthesize/{row}" for row in ABLATION_ROWS]
    + [f"paper/ablation/{d}_{row}" for d in DATASETS for row in ABLATION_ROWS],
    "labeler": ["paper/labeler/feranno_affectnet", "paper/labeler/rectify"]
    + [f"paper/ablation/{d}_synfer_intended" for d in DATASETS],
    "supervised": [f"paper/supervised/{d}_{m}{s}" for d in DATASETS for m in BACKBONES for s in ("", "_synfer")]
    + ["paper/synthesize/synfer_5x"],
    "synthetic_only": ["paper/synthetic_only/affectnet_resnet50", "paper/synthetic_only/affectnet_resnet50_5x",
                       "paper/synthesize/synfer_1x", "paper/synthesize/synfer_5x"],
    "ssl": [f"paper/ssl/mocov3_{d}_r50" for d in ("affectnet", "synfer", "both")]
    + [f"paper/ssl/probe_{d}" for d in ("rafdb", "affectnet", "sfew")],
}
PAPER = sorted(n for n in list_experiments() if n.startswith("paper/"))

# Environment variables of experiments/paths/default.yaml (and the two model files the paper configs read).
SENTINELS = {"SYNFER_AFFECTNET": "/env/affectnet", "SYNFER_RAFDB": "/env/rafdb", "SYNFER_SFEW": "/env/sfew",
             "SYNFER_SD": "/env/sd15", "SYNFER_SYNTHETIC": "/env/synfer", "SYNFER_TIMM": "/env/timm",
             "SYNFER_INCEPTION": "/env/inception.pth"}


@pytest.fixture(scope="module")
def configs():
    """Every paper config, composed once with each path variable set to a sentinel (one compose per config:
    composing is ~0.1 s, and the whole file must stay fast)."""
    mp = pytest.MonkeyPatch()
    try:
        for key, value in SENTINELS.items():
            mp.setenv(key, value)
        return {name: compose(name) for name in PAPER}
    finally:
        mp.undo()


def _roots(cfg) -> dict[str, str]:
    """Every dataset/model location a config reads: key -> path."""
    out = {}
    for split in ("train", "val", "test", "synthetic"):
        ds = cfg.data.get(split)
        if ds is not None and ds.root is not None:
            out[f"data.{split}.root"] = ds.root
    for key, value in (("generation_eval.real.root", cfg.generation_eval.real.root),
                       ("synthesis.out", cfg.synthesis.out),
                       ("model.pretrained_path", cfg.model.pretrained_path),
                       ("generator.pretrained_path", cfg.generator.pretrained_path),
                       ("generation_eval.inception_weights", cfg.generation_eval.inception_weights)):
        if value is not None:
            out[key] = value
    return out


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_its_configs(table):
    missing = [n for n in TABLES[table] if n not in PAPER]
    assert not missing, f"{table} table: no experiments/{missing[0]}.yaml"


def test_every_paper_config_belongs_to_a_table_or_is_a_base():
    used = {n for names in TABLES.values() for n in names}
    bases = {"paper/supervised/rafdb_base", "paper/supervised/affectnet_base", "paper/synthesize/base"}
    assert set(PAPER) - used == bases


def test_dataset_and_model_roots_come_from_paths_and_the_environment(configs):
    for name, cfg in configs.items():
        p = cfg.paths
        assert (p.affectnet, p.rafdb, p.synthetic) == ("/env/affectnet", "/env/rafdb", "/env/synfer")
        for key, root in _roots(cfg).items():
            assert root.startswith((p.rafdb, p.affectnet, p.sfew, p.stable_diffusion, p.synthetic,
                                    SENTINELS["SYNFER_TIMM"], SENTINELS["SYNFER_INCEPTION"])), \
                f"{name}: {key}={root} does not follow paths.* / the environment"
    gen = configs["paper/generator/sd15_synfer"]
    assert gen.data.train.root == "/env/affectnet" and gen.generator.pretrained_path == "/env/sd15"


def test_defaults_without_environment(monkeypatch):
    for key in SENTINELS:
        monkeypatch.delenv(key, raising=False)
    cfg = compose("paper/supervised/affectnet_resnet50_synfer")
    assert cfg.data.train.root == cfg.paths.affectnet == "/data/AffectNet"
    assert cfg.data.synthetic.root == cfg.paths.synthetic == "/data/synfer"
    assert cfg.model.pretrained_path == "/models/timm/resnet50.a1_in1k.safetensors"


def test_synfer_affectnet_override_changes_affectnet_roots(monkeypatch, configs):
    for key, value in SENTINELS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SYNFER_AFFECTNET", "/elsewhere/AffectNet")
    for name in ("paper/synthetic_only/affectnet_resnet50", "paper/generation/evaluate", "paper/synthesize/synfer"):
        before, after = _roots(configs[name]), _roots(compose(name))
        changed = {k for k in before if before[k] != after[k]}
        assert changed == {k for k, v in before.items() if v.startswith("/env/affectnet")} != set(), name
        assert all(after[k].startswith("/elsewhere/AffectNet") for k in changed), (name, after)


def test_gpu_trainer_presets(configs):
    for name, cfg in configs.items():
        assert cfg.trainer.accelerator == "gpu", f"{name}: trainer.accelerator={cfg.trainer.accelerator}"
    for name in TABLES["supervised"][:-1] + ["paper/generator/sd15_synfer", "paper/synthesize/synfer_5x",
                                             "paper/ssl/mocov3_both_r50"]:
        assert configs[name].trainer.strategy == "ddp", name


def test_generators_are_the_two_stage_recipe(configs):
    """Each ablation row's generator is the previous one plus one part: SD -> + FEText fine-tune of the whole UNet
    -> + the FAU adapter trained alone on that frozen UNet (generator.init_from, set by the pipeline)."""
    full, fetext, sd = (configs[f"paper/generator/{n}"] for n in ("sd15_synfer", "sd15_fetext", "sd15"))
    for cfg in (full, fetext, sd):
        assert cfg.task == "generator" and cfg.generator.profile == "sd" and cfg.generator.text_encoder == "clip"
        assert cfg.generator.pretrained_path == cfg.paths.stable_diffusion
    assert full.generator.au_adapter and not fetext.generator.au_adapter and not sd.generator.au_adapter
    assert fetext.generator.train_unet and not full.generator.train_unet and full.generator.lora_rank == 0
    assert full.data.train.format == fetext.data.train.format == "synthetic"  # FEText: captions + AUs
    assert full.data.train.root == full.paths.affectnet
    assert full.trainer.max_steps > 0 and fetext.trainer.max_steps > 0
    assert sd.trainer.max_steps == 0  # the pretrained weights, exported untouched
    stages = {s.name: s for s in compose("pipeline/paper").pipeline.stages}
    assert stages["gen_synfer"].experiment == "paper/generator/sd15_synfer"
    assert "generator.init_from={gen_fetext.export}" in stages["gen_synfer"].overrides


def test_synthesis_rows_and_downstream_sets_agree(configs):
    for row in ABLATION_ROWS:
        synth = configs[f"paper/synthesize/{row}"]
        assert synth.guidance.enabled == (row == "synfer"), row
        assert not synth.sampling.clip_sample  # latent space
        assert synth.synthesis.out.startswith(synth.paths.synthetic)
        for d in DATASETS:
            down = configs[f"paper/ablation/{d}_{row}"]
            assert down.data.synthetic.root == synth.synthesis.out, (row, d)
            assert down.data.mix.synthetic_ratio > 0 and down.model.backbone == "resnet50"
            assert down.data.train.format == d
    assert len({configs[f"paper/synthesize/{r}"].synthesis.out for r in ABLATION_ROWS}) == len(ABLATION_ROWS)
    for row in ABLATION_ROWS:  # the layout start (DDIM inversion of a real training face) is the SynFER row's only
        layout = configs[f"paper/synthesize/{row}"].synthesis.layout
        assert layout.enabled == (row == "synfer"), row
    lay = configs["paper/synthesize/synfer"].synthesis.layout
    assert (lay.format, lay.root, lay.split) == ("affectnet", configs["paper/synthesize/synfer"].paths.affectnet, "train")
    for size, multiple in (("1x", 1.0), ("5x", 5.0)):  # sized by AffectNet train's counted size, not a constant
        big = configs[f"paper/synthesize/synfer_{size}"]
        assert big.synthesis.real_multiple == multiple and big.synthesis.num_images == 0 and big.guidance.enabled
        assert big.synthesis.real_set.format == "affectnet" and big.synthesis.real_set.num_classes == 7
        assert big.synthesis.layout.enabled
    assert configs["paper/synthesize/synfer_5x"].synthesis.out == configs["paper/synthesize/synfer_5x"].paths.synthetic


def test_feranno_at_sd_scale_and_the_row_without_rectification(configs):
    lab = configs["paper/labeler/feranno_affectnet"]
    assert lab.task == "labeler" and lab.data.image_size == 512 and lab.data.train.format == "affectnet"
    assert lab.labeler.unet_path == lab.paths.stable_diffusion and lab.labeler.t > 0
    for d in DATASETS:
        rectified, intended = configs[f"paper/ablation/{d}_synfer"], configs[f"paper/ablation/{d}_synfer_intended"]
        assert intended.data.synthetic.version == 1 and rectified.data.synthetic.version is None
        assert intended.data.synthetic.root == rectified.data.synthetic.root


def test_supervised_real_and_synthetic(configs):
    for d in DATASETS:
        for short, timm_name in BACKBONES.items():
            real, mixed = configs[f"paper/supervised/{d}_{short}"], configs[f"paper/supervised/{d}_{short}_synfer"]
            assert real.model.backbone == mixed.model.backbone == timm_name
            assert real.model.pretrained_path and real.model.pretrained_path == mixed.model.pretrained_path
            assert real.data.train.format == d and real.data.synthetic is None
            assert real.data.mix.synthetic_ratio == 0
            assert mixed.data.synthetic.format == "synthetic" and mixed.data.synthetic.root == mixed.paths.synthetic
            assert 0 < mixed.data.mix.synthetic_ratio < 1


def test_synthetic_only_is_all_synthetic_at_1x_and_5x(configs):
    cfg, five = configs["paper/synthetic_only/affectnet_resnet50"], configs["paper/synthetic_only/affectnet_resnet50_5x"]
    assert cfg.data.mix.synthetic_ratio == five.data.mix.synthetic_ratio == 1.0
    assert (cfg.data.mix.synthetic_scale, five.data.mix.synthetic_scale) == (1.0, 5.0)
    assert cfg.data.synthetic.root == configs["paper/synthesize/synfer_1x"].synthesis.out
    assert five.data.synthetic.root == configs["paper/synthesize/synfer_5x"].synthesis.out
    assert cfg.data.train.format == "affectnet"
    assert cfg.data.test.format == "affectnet"
    assert compose("paper/synthetic_only/affectnet_resnet50",
                   ["data.mix.synthetic_scale=5"]).data.mix.synthetic_scale == 5  # the sweep's largest point


def test_generation_judge_and_evaluation(configs):
    judge = configs["paper/judge/affectnet_convnext_au"]
    assert judge.model.au_head and judge.data.train.format == "synthetic"  # FEText AU labels
    assert judge.model.backbone != configs["paper/supervised/affectnet_resnet50"].model.backbone  # not the guide
    ev = configs["paper/generation/evaluate"]
    real = ev.generation_eval.real
    assert ev.generation_eval.features == "inception" and real.format == "affectnet" and real.root == ev.paths.affectnet


def test_ssl_wrappers_are_thin(configs):
    """The paper/ssl wrappers only rename the run folder (and put probes on one GPU): read as YAML, not composed."""
    from omegaconf import OmegaConf

    for name in TABLES["ssl"]:
        raw = OmegaConf.to_container(OmegaConf.load(REPO / "experiments" / f"{name}.yaml"))
        assert list(raw) == ["defaults"], name
        assert raw["defaults"][0] == name.replace("paper/", "", 1)
        assert all(d == {"trainer": "gpu"} for d in raw["defaults"][1:]), name
        assert configs[name].trainer.accelerator == "gpu"
    assert configs["paper/ssl/mocov3_synfer_r50"].data.mix.synthetic_ratio == 1.0


def test_reproduce_doc_covers_every_table():
    doc = (REPO / "docs" / "REPRODUCE.md").read_text()
    for names in TABLES.values():
        for name in names:
            assert name in doc, f"docs/REPRODUCE.md never mentions {name}"
    for number in ("88.40", "20.06", "16.32", "55.14", "87.72", "93.31", "89.42", "91.95", "65.36", "68.13",
                   "67.23", "69.84"):
        assert number in doc, number
    assert "sweep.grid.data.mix.synthetic_scale=[1,2,3,4,5]" in doc
    assert "supervised/fer2013_resnet18" in doc and "generator/fer2013" in doc
