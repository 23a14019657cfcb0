"""Every experiment config that is not full-scale runs its task once, with trainer.fast_dev_run=true, on fixtures.

Each config under experiments/ is in exactly one of three lists:

- RUN: run here (one slow parametrized test). FER2013 configs read a tiny class-folder fixture, the tasks that
  need inputs get small real ones built once per module (a generator export, classifier / labeler / SSL
  checkpoints saved the way `fit` saves them, a synthetic set, a folder of faces);
- COVERED: already run with fast_dev_run by the named test (checked below to exist and to name the config, or to
  run every config of a discovered kind: the SSL pre-training experiments on embedded faces, found by what they
  configure, run in test_ssl.py::test_fast_dev_run, so a new method's YAML needs no line here);
- FULL_SCALE: needs real datasets (AffectNet, RAF-DB, SFEW) or a Stable Diffusion folder; test_config.py and
  test_paper_configs.py compose and validate them.

A new config fails `test_every_config_is_run_covered_or_full_scale` until it is put in one of them.
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from discover_experiments import ssl_pretraining_on_embedded_data
from fixtures import FER2013_FOLDERS, make_folder_dataset, make_synthetic_set, write_image
from lightning_synfer.tasks import TASKS, load
from lightning_synfer.config import compose, list_experiments, to_container

HERE = Path(__file__).resolve().parent

# config -> "test file::test function" whose fast_dev_run (or, for the pipeline, shrunk end-to-end run) covers it
COVERED = {
    "supervised/embedded": "test_fit_evaluate.py::test_fast_dev_run_fit",
    "supervised/embedded_fast": "test_small_cnn.py::test_fast_dev_run_fit_embedded_fast",
    "generator/embedded": "test_generator.py::test_fit_fast_dev_run_embedded",
    "labeler/embedded": "test_labeler.py::test_fit_fast_dev_run",
    "sweeps/embedded_ratio": "test_sweeps.py::test_local_sweep_runs_points_and_skips_finished",
    # every stage, a few steps each: fast_dev_run would leave the stages without the checkpoints later ones read
    "pipeline/embedded": "test_pipeline.py::test_main_pipeline_runs_end_to_end_shrunk",
    "pipeline/embedded_base": "test_pipeline.py::test_base_pipeline_publishes_a_loadable_base_shrunk",
    "pipeline/embedded_long": "test_pipeline.py::test_long_variant_adds_stages_and_seed_copies_that_read_their_own_copies",
    "pipeline/paper_tiny": "test_paper_tiny.py::test_paper_tiny_runs_the_paper_graph_end_to_end",
    **{f"zeroshot/{n}": "test_clip.py::test_fast_dev_run_fit_miniature"
       for n in ("embedded_tiny", "embedded_tiny_synthetic", "embedded_tiny_both")},
    **{f"fewshot/{n}": "test_fewshot_runs.py::test_fast_dev_run_fewshot_configs"
       for n in ("embedded", "embedded_synthetic", "embedded_synthetic_pretrain")},
    "sweeps/fewshot_embedded": "test_fewshot_runs.py::test_fewshot_sweep_table_and_plot",
}
DISCOVERED_BY = "test_ssl.py::test_fast_dev_run"  # parametrized over ssl_pretraining_on_embedded_data()
COVERED.update({name: DISCOVERED_BY for name in ssl_pretraining_on_embedded_data()})
# config -> what it needs that no fixture here stands in for
FULL_SCALE = {
    "generator/sd15_synfer": "a Stable Diffusion 1.5 folder and RAF-DB",
    "ssl/finetune_rafdb": "RAF-DB",
    "ssl/mocov3_affectnet_r50": "AffectNet",
    "ssl/mocov3_both_r50": "AffectNet and a SynFER set",
    "ssl/mocov3_synfer_r50": "AffectNet and a SynFER set",
    "ssl/probe_affectnet": "AffectNet",
    "ssl/probe_rafdb": "RAF-DB",
    "ssl/probe_sfew": "SFEW",
    # a transformers CLIPModel folder (paths.clip) and the datasets; test_clip.py runs a tiny CLIPModel folder
    "zeroshot/base_rafdb": "a CLIP folder and RAF-DB",
    "zeroshot/base_affectnet": "a CLIP folder and AffectNet",
    "zeroshot/base_sfew": "a CLIP folder and SFEW",
    "zeroshot/clip_affectnet": "a CLIP folder, AffectNet with FEText captions and RAF-DB",
    "zeroshot/clip_synfer": "a CLIP folder, a SynFER set, AffectNet and RAF-DB",
    "zeroshot/clip_both": "a CLIP folder, AffectNet with FEText captions, a SynFER set and RAF-DB",
    "fewshot/rafdb_linear": "RAF-DB (and a backbone checkpoint)",
    "fewshot/rafdb_finetune": "RAF-DB (and a backbone checkpoint)",
    "fewshot/rafdb_synfer": "RAF-DB, ImageNet ResNet-50 weights and a SynFER set",
    "sweeps/fewshot_rafdb": "RAF-DB, ImageNet ResNet-50 weights and a SynFER set",
    "pipeline/paper": "Stable Diffusion 1.5, AffectNet, RAF-DB and SFEW (pipeline/paper_tiny is the same graph, run)",
}
FULL_SCALE_PREFIX = "paper/"  # every paper table config (test_paper_configs.py)

# From test_generator.py: a generator that trains a step in about a second.
TINY_GENERATOR = ["generator.text_encoder=tiny", "generator.text_max_length=16",
                  "generator.block_out_channels=[8,16]", "generator.attention_levels=[false,true]",
                  "generator.au_hidden=32", "generator.cross_attention_dim=32", "generator.sample_every_n_steps=0",
                  "trainer.limit_val_batches=1"]
# From test_ssl.py: a backbone without batch statistics and small heads.
TINY_SSL = ["model.backbone=test_vit", "ssl.proj_hidden_dim=32", "ssl.pred_hidden_dim=32", "ssl.proj_output_dim=16",
            "data.train.num_images=32", "data.synthetic.num_images=32"]
# From test_synthesis.py: 16 px generator, 2 DDIM steps; both images in one predict batch (fast_dev_run: 1 batch).
TINY_SYNTH = ["data.image_size=16", "data.train.num_images=32", "synthesis.num_images=2", "synthesis.batch_size=2",
              "sampling.steps=2", "synthesis.shard_size=4"]

# config -> (task, builder of its overrides from the fixtures)
RUN = {
    "supervised/fer2013_resnet18": ("fit", lambda a: [f"paths.fer2013={a['fer2013']}"]),
    "fer2013/real_only_cycle2": ("fit", lambda a: [f"paths.fer2013={a['fer2013']}"]),
    "generator/fer2013": ("fit", lambda a: [f"paths.fer2013={a['fer2013']}", *TINY_GENERATOR]),
    "generator/tiny_test": ("fit", lambda a: ["generator.sample_every_n_steps=0", "trainer.limit_val_batches=1"]),
    "labeler/embedded_timm": ("fit", lambda a: []),
    "ssl/embedded_linear": ("linear", lambda a: [f"ckpt={a['ssl']}"]),
    "ssl/embedded_finetune": ("finetune", lambda a: [f"ckpt={a['ssl']}"]),
    "generator/synthesize_embedded": ("synthesize", lambda a: [f"synthesis.generator={a['gen']}", *TINY_SYNTH]),
    "generator/synthesize_sg": ("synthesize", lambda a: [f"synthesis.generator={a['gen']}",
                                                         f"guidance.classifier={a['judge']}", *TINY_SYNTH]),
    "generator/synthesize_layout": ("synthesize", lambda a: [f"synthesis.generator={a['gen']}",
                                                             f"synthesis.layout.root={a['faces']}", *TINY_SYNTH]),
    "generator/evaluate_generation": ("evaluate-generation", lambda a: [
        f"generation_eval.dataset={a['synthetic']}", f"generation_eval.judge={a['judge']}",
        f"generation_eval.real.root={a['faces']}",
        "generation_eval.kid_subset_size=3", "generation_eval.batch_size=4"]),
    "generator/annotate": ("annotate", lambda a: [f"annotate.root={a['faces']}", "annotate.batch_size=4"]),
    "generator/au_sweep": ("au-sweep", lambda a: [f"synthesis.generator={a['gen']}", "sampling.steps=2",
                                                   "au_sweep.cell_size=16"]),
    "labeler/rectify": ("label", lambda a: [f"labeling.ensemble=[{a['labeler']},{a['judge']}]",
                                            "labeling.batch_size=8"]),
    "labeler/no_labeler": ("label", lambda a: []),
    # publish_as=null: a fast_dev_run must not replace the shipped base
    "generator/embedded_base": ("fit", lambda a: ["generator.publish_as=null", "trainer.max_time=null"]),
    "generator/embedded_finetune": ("fit", lambda a: []),  # from the shipped base
}
EMBEDDED_DATA = {"labeler/embedded_timm", "ssl/embedded_linear", "ssl/embedded_finetune", "generator/tiny_test",
                 "generator/embedded_base", "generator/embedded_finetune"}  # the others read fixtures or set their own sizes (TINY_SYNTH)


def _is_full_scale(name: str) -> bool:
    return name.startswith(FULL_SCALE_PREFIX) or name in FULL_SCALE


def test_every_config_is_run_covered_or_full_scale():
    names = set(list_experiments())
    lists = {"RUN": set(RUN), "COVERED": set(COVERED), "FULL_SCALE": {n for n in names if _is_full_scale(n)}}
    for a, b in (("RUN", "COVERED"), ("RUN", "FULL_SCALE"), ("COVERED", "FULL_SCALE")):
        assert not lists[a] & lists[b], f"in both {a} and {b}: {sorted(lists[a] & lists[b])}"
    unlisted = names - set().union(*lists.values())
    assert not unlisted, f"experiments/{sorted(unlisted)[0]}.yaml: add it to RUN, COVERED or FULL_SCALE in {__file__}"
    assert not set().union(*lists.values()) - names, "a listed config no longer exists"


def test_covered_configs_name_a_fast_dev_run_that_exists():
    for name, where in COVERED.items():
        file, function = where.split("::")
        text = (HERE / file).read_text()
        node = next((n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == function), None)
        assert node is not None, f"{name}: {where} does not exist"
        if where == DISCOVERED_BY:  # the test runs every discovered config rather than naming it
            params = [ast.unparse(arg) for d in node.decorator_list for arg in getattr(d, "args", [])]
            assert "ssl_pretraining_on_embedded_data()" in params, f"{where} is not parametrized by the discovery"
        else:
            assert name in text or f'"{name.split("/")[-1]}"' in text, f"{file} never names {name}"
        if not name.startswith("pipeline/"):  # a pipeline is run end to end, shrunk
            assert "fast_dev_run=true" in ast.get_source_segment(text, node), f"{where} is not a fast_dev_run"


def test_full_scale_configs_read_external_data_or_models():
    for name in FULL_SCALE:
        cfg = compose(name)
        if cfg.task == "pipeline":  # its stages are the paper configs, each checked on its own
            assert all(s.experiment.startswith(FULL_SCALE_PREFIX) or s.experiment in FULL_SCALE
                       for s in cfg.pipeline.stages if s.task in ("fit", "synthesize")), name
            continue
        external = [n for n in ("train", "val", "test", "synthetic")
                    if cfg.data.get(n) is not None and cfg.data[n].format != "embedded"]
        assert external or cfg.generator.profile == "sd", f"{name} needs no external data: run it in RUN instead"


# -- the runs -------------------------------------------------------------------------------------------------


def _save_checkpoint(module, path: Path) -> Path:
    """As `fit` saves it: weights, hyper-parameters and the module's synfer metadata."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from datamodules.labels import CANONICAL_8
    from datamodules.procedural.aus import AU_NAMES
    from lightning_synfer.modules.generator import GeneratorModule
    from lightning_synfer.modules.labeler import PseudoLabelerModule
    from lightning_synfer.modules.ssl import SSLModule
    from lightning_synfer.modules.supervised import SupervisedFER

    root = tmp_path_factory.mktemp("artifacts")
    out = {"fer2013": make_folder_dataset(root / "fer2013", FER2013_FOLDERS, per_class=2, size=48, split="train")}
    make_folder_dataset(root / "fer2013", FER2013_FOLDERS, per_class=2, size=48, split="val")
    for i in range(4):
        write_image(root / "faces" / f"face{i}.png", size=24, mode="L", seed=i)
    out["faces"] = root / "faces"
    out["synthetic"] = make_synthetic_set(root / "synthetic", n=8, num_classes=8, size=16, mode="L")
    torch.manual_seed(0)
    gen_cfg = compose("generator/tiny_test", ["data.image_size=16"])
    out["gen"] = GeneratorModule(config=to_container(gen_cfg), label_names=list(CANONICAL_8)).save_pretrained(
        root / "generator")
    judge_cfg = compose("supervised/embedded", ["model.au_head=true", "data.image_size=16", "data.num_classes=7",
                                                "model.backbone=resnet10t", "logger.log_confusion_matrix=false"])
    out["judge"] = _save_checkpoint(SupervisedFER(config=to_container(judge_cfg), label_names=list(CANONICAL_8[:7]),
                                                  au_names=list(AU_NAMES)), root / "judge.ckpt")
    lab_cfg = compose("labeler/embedded", ["data.image_size=16", "labeler.dim=16", "labeler.heads=2",
                                           f"paths.cache_dir={root}"])
    out["labeler"] = _save_checkpoint(PseudoLabelerModule(to_container(lab_cfg), list(CANONICAL_8)), root / "lab.ckpt")
    ssl_cfg = compose("ssl/embedded_mocov3", ["data.image_size=32", *TINY_SSL[:4]])
    out["ssl"] = _save_checkpoint(SSLModule(to_container(ssl_cfg), list(CANONICAL_8)), root / "ssl.ckpt")
    return out


def _assert_metrics(task: str, metrics: dict) -> None:
    if task in ("fit", "linear", "finetune"):
        assert metrics["global_step"] == 1, metrics  # fast_dev_run: one training step
    if task in ("linear", "finetune"):
        assert 0.0 <= metrics["accuracy"] <= 1.0
    if task == "synthesize":
        assert metrics["complete"] and metrics["num_records"] == 2
    if task == "evaluate-generation":
        assert metrics["num_images"] == 7 and 0.0 <= metrics["fer_accuracy"] <= 1.0  # contempt: not a judge class
    if task == "annotate":  # fast_dev_run: one predict batch holds the 4 faces
        assert metrics["complete"] and metrics["num_records"] == 4 and metrics["num_failed"] == 0
    if task == "label":
        assert metrics["version"] == 2 and metrics["num_records"] == 8
    if task == "au-sweep":  # fast_dev_run: one predict batch holds the whole sweep
        assert list(metrics["aus"]) == ["AU12", "AU4"] and metrics["num_images"] == 2 * 5 + 2


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUN))
def test_config_runs_fast_dev_run_on_fixtures(name, artifacts, tmp_path):
    task, build = RUN[name]
    extra = ["trainer.fast_dev_run=true", *build(artifacts)]
    if task == "synthesize":
        extra.append(f"synthesis.out={tmp_path / 'synthetic'}")
    if task == "annotate":
        extra.append(f"annotate.out={tmp_path / 'fetext'}")
    if task == "label":  # writes manifest.v2.jsonl: a copy per run
        extra.append(f"labeling.dataset={shutil.copytree(artifacts['synthetic'], tmp_path / 'synthetic')}")
    argv = [f"experiment={name}", *tiny_overrides(tmp_path, *extra, embedded=name in EMBEDDED_DATA)]
    cfg = compose(name, argv[1:])
    assert cfg.trainer.fast_dev_run is True
    metrics = load(task)(cfg, [task, *argv])
    written = sorted((tmp_path / "runs").rglob("metrics.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["task"] == metrics["task"]
    _assert_metrics(task, metrics)
