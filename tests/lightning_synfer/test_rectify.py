"""Label rectification: the rule on hand-made probabilities, atomic manifest versioning, the label task end to end
(diffusion labeler + supervised classifier), an interrupted run that resumes, and the "no labeler" mode."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.labels import CANONICAL_8, LabelSpace
from datamodules.synthetic import ManifestError, read_manifest, records_from_manifest, write_manifest
from fixtures import CrashAfter, make_synthetic_set
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.config.compose import to_container
from lightning_synfer.labeling.rectify import decide, rectify
from lightning_synfer.tasks import label

NAMES = ["neutral", "happy", "sad"]


def test_majority_agreement_keeps_the_hard_label():
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])  # votes: happy, happy, neutral
    d = decide(1, probs)
    assert d["label_source"] == "intended" and d["label_soft"] is None and d["label_rectified"] == 1
    assert d["agreement"] == pytest.approx(2 / 3)


def test_disagreement_gives_the_average_of_the_ensemble():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])  # votes: neutral, sad, neutral
    d = decide(1, probs)
    assert d["label_source"] == "ensemble" and d["agreement"] == 0.0
    np.testing.assert_allclose(d["label_soft"], probs.mean(0))
    assert d["label_rectified"] == 0
    # A tie is not a majority: 1 of 2 votes for the intended label -> soft.
    assert decide(0, np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]))["label_source"] == "ensemble"


def test_intended_weight_softens_toward_the_intended_label_instead_of_overwriting_it():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])  # votes: neutral, sad; intended: happy
    d = decide(1, probs, intended_weight=1.0)
    np.testing.assert_allclose(d["label_soft"], [(0.7 + 0.1) / 3, (0.2 + 0.3 + 1) / 3, (0.1 + 0.6) / 3])
    assert d["label_source"] == "ensemble" and d["label_rectified"] == 1  # two weak members that disagree
    # members that agree with each other against the intention still win
    assert decide(1, np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]), intended_weight=1.0)["label_rectified"] == 0


def test_min_confidence_drops_uncertain_records_and_summary_counts():
    records = [{"id": "a", "image": "a.png", "label": 0}, {"id": "b", "image": "b.png", "label": 1},
               {"id": "c", "image": "c.png", "label": 2}, {"id": "d", "image": "d.png", "label": 2}]
    probs = {"a": np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]),       # agree, confident
             "b": np.array([[0.4, 0.35, 0.25], [0.3, 0.4, 0.3]]),        # 1 of 2: soft, max mean 0.375 < 0.5
             "c": np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]),          # disagree: soft -> happy
             "d": np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])}
    new, summary = rectify(records, probs, NAMES, min_confidence=0.5)
    assert [r["id"] for r in new] == ["a", "c", "d"]
    by_id = {r["id"]: r for r in new}
    assert "label_soft" not in by_id["a"] and by_id["a"]["label_source"] == "intended" and by_id["a"]["agreement"] == 1
    np.testing.assert_allclose(by_id["c"]["label_soft"], [0.15, 0.75, 0.1])
    assert by_id["c"]["label"] == 2 and by_id["c"]["label_rectified"] == 1  # `label` stays the intended one
    assert summary["num_dropped"] == 1 and summary["num_changed"] == 1 and summary["num_soft"] == 1
    assert summary["agreement_rate"] == pytest.approx(2 / 4)
    assert summary["per_class"]["sad"]["agreement_rate"] == pytest.approx(0.5)
    assert summary["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    none, s0 = rectify(records, {}, NAMES, mode="none")
    assert [r["label_source"] for r in none] == ["intended"] * 4 and s0["num_changed"] == 0


def test_new_manifest_version_is_atomic_and_leaves_v1_untouched(tmp_path):
    root = make_synthetic_set(tmp_path / "set", n=4, num_classes=3, size=8)
    v1 = (root / "manifest.jsonl").read_bytes()
    _, records = read_manifest(str(root))
    bad = [dict(r) for r in records]
    bad[2]["label_soft"] = [0.5, 0.6, 0.0]  # does not sum to 1
    with pytest.raises(ManifestError, match="label_soft"):
        write_manifest(str(root), bad)
    assert sorted(os.listdir(root)) == ["dataset.json", "images", "manifest.jsonl"]  # no v2, no tmp file
    new, _ = rectify(records, {r["id"]: np.eye(3)[[r["label"]] * 2] for r in records}, list(CANONICAL_8[:3]))
    path = write_manifest(str(root), new)
    assert Path(path).name == "manifest.v2.jsonl" and (root / "manifest.jsonl").read_bytes() == v1
    with pytest.raises(FileExistsError):
        write_manifest(str(root), new, version=2)
    assert not [n for n in os.listdir(root) if "tmp" in n]


# ----------------------------------------------------------------------------------------- the label task

def _classifier_ckpt(tmp_path: Path, family: str) -> Path:
    """An untrained classifier saved the way fit saves it (the rule does not care how good it is)."""
    from lightning_synfer.modules import module_class

    if family == "labeler":
        cfg = compose("labeler/embedded", ["data.image_size=16", "labeler.dim=16", "labeler.heads=2",
                                           f"paths.cache_dir={tmp_path}"])
        names = list(CANONICAL_8)
    else:
        cfg = compose("supervised/embedded", ["data.image_size=16", "data.num_classes=7", "model.backbone=resnet10t"])
        names = list(CANONICAL_8[:7])  # a 7-class model on an 8-class set: contempt gets no mass
    torch.manual_seed(1)
    module = module_class(cfg.task)(config=to_container(cfg), label_names=names)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / f"{family}.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def labelers(tmp_path_factory):
    d = tmp_path_factory.mktemp("labelers")
    return [_classifier_ckpt(d, "labeler"), _classifier_ckpt(d, "supervised")]


def _args(tmp_path, root, labelers, *extra):
    return ["trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0", "labeling.batch_size=3",
            f"paths.runs_dir={tmp_path / 'runs'}", f"labeling.dataset={root}",
            f"labeling.ensemble=[{','.join(str(p) for p in labelers)}]", *extra]


def _part_ids(root: Path) -> list[str]:
    ids = []
    for p in (root / "labeling").glob("*/parts/*.jsonl"):
        ids += [json.loads(line)["id"] for line in p.read_text().splitlines() if line.strip()]
    return ids


def test_label_task_interrupted_run_resumes_and_writes_v2(tmp_path, labelers):
    root = make_synthetic_set(tmp_path / "set", n=8, num_classes=8, size=16, mode="L", soft=True)
    v1 = (root / "manifest.jsonl").read_bytes()
    args = _args(tmp_path, root, labelers)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        label.run(compose("labeler/rectify", args), callbacks=[CrashAfter(1)])
    assert len(_part_ids(root)) == 3 and not (root / "manifest.v2.jsonl").exists()
    metrics = label.run(compose("labeler/rectify", args))
    ids = _part_ids(root)
    assert len(ids) == 8 and len(set(ids)) == 8  # the rerun predicted only the 5 missing records
    assert metrics["num_predicted_now"] == 5 and metrics["version"] == 2 and metrics["num_records"] == 8
    header, records = read_manifest(str(root))
    assert (root / "manifest.jsonl").read_bytes() == v1 and len(records) == 8
    for rec in records:
        assert rec["label_source"] in ("intended", "ensemble") and 0 <= rec["agreement"] <= 1
        assert ("label_soft" in rec) == (rec["label_source"] == "ensemble")
    summary = json.loads((root / "label_summary.v2.json").read_text())
    assert Path(metrics["manifest"]) == root / "manifest.v2.jsonl" and summary["num_changed"] == metrics["num_changed"]
    assert (root / "label_confusion.v2.png").stat().st_size > 0 and sum(map(sum, summary["confusion"])) == 8
    # Back into training: the DataModule reads the newest version, soft labels included.
    recs = records_from_manifest(str(root), LabelSpace.from_num_classes(8))
    assert len(recs) == 8
    # The same command again: nothing new. Another threshold: reuses the predictions, writes v3.
    again = label.run(compose("labeler/rectify", args))
    assert again["already_done"] and again["version"] == 2 and not (root / "manifest.v3.jsonl").exists()
    third = label.run(compose("labeler/rectify", [*args, "labeling.min_confidence=1.0"]))
    assert third["version"] == 3 and third["num_predicted_now"] == 0 and third["num_kept"] == 0
    assert not [n for n in os.listdir(root) if "tmp" in n]


def test_no_labeler_mode_keeps_intended_labels_and_bad_input_is_one_line(tmp_path, labelers, capsys):
    root = make_synthetic_set(tmp_path / "set", n=5, num_classes=7, size=8, mode="L")
    assert main(["label", "experiment=labeler/no_labeler", f"paths.runs_dir={tmp_path / 'runs'}",
                 f"labeling.dataset={root}", "trainer=cpu"]) == 0
    _, records = read_manifest(str(root))
    assert [r["label_source"] for r in records] == ["intended"] * 5 and "label_soft" not in records[0]
    assert main(["label", f"paths.runs_dir={tmp_path / 'runs'}", f"labeling.dataset={root}"]) == 2
    assert "labeling.ensemble=[CKPT" in capsys.readouterr().err
    assert main(["label", f"paths.runs_dir={tmp_path / 'runs'}", f"labeling.dataset={root}",
                 f"labeling.ensemble=[{tmp_path / 'missing.ckpt'}]"]) == 2


@pytest.mark.ddp
def test_two_process_labelling_predicts_every_record_once(tmp_path, labelers, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks start their own torch
    root = make_synthetic_set(tmp_path / "set", n=7, num_classes=8, size=16, mode="L")
    args = _args(tmp_path, root, labelers, "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.strategy=ddp_spawn")
    label.run(compose("labeler/rectify", args))
    ranks = {p.name.split("-")[0] for p in (root / "labeling").glob("*/parts/*.jsonl")}
    ids = _part_ids(root)
    assert ranks == {"rank0", "rank1"} and set(ids) == {f"syn-{i:06d}" for i in range(7)}
    assert len(ids) == 7  # predict shards without padding repeats (a repeat would be deduped by id anyway)
    _, records = read_manifest(str(root))
    assert len(records) == 7 and all("label_source" in r for r in records)
