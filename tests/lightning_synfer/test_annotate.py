"""`annotate`: real faces + an AU tool's CSV (OpenFace, py-feat, LibreFace, in their own column layouts) or an AU
model, + captions -> our dataset format; failed faces skipped and listed; resumable after a kill."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from datamodules.datamodule import FERDataModule
from datamodules.labels import CANONICAL_8
from datamodules.procedural.captions import EXPRESSION_WORDS
from datamodules.synthetic import read_header, read_manifest
from fixtures import CrashAfter, make_folder_dataset, write_image
from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.config.errors import ConfigError
from lightning_synfer.tasks import annotate

OPENFACE_AUS = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
                "AU20", "AU23", "AU25", "AU26", "AU45"]
OPENFACE_PRESENCE = OPENFACE_AUS[:-1] + ["AU28", "AU45"]
PYFEAT_AUS = ["AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU11", "AU12", "AU14", "AU15", "AU17",
              "AU20", "AU23", "AU24", "AU25", "AU26", "AU28", "AU43"]
LIBREFACE_DETECTION = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]
LIBREFACE_INTENSITY = [1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26]


def _faces(root: Path, n: int = 5) -> list[Path]:
    return [write_image(root / f"face_{i:02d}.png", size=16, mode="RGB", seed=i) for i in range(n)]


def _write_openface(path: Path, n: int, *, failed_success: int, low_confidence: int) -> None:
    """FeatureExtraction -fdir output: one row per frame (= sorted image), ', '-separated header, 0-5 intensities."""
    header = ["frame", "face_id", "timestamp", "confidence", "success", "gaze_0_x", "pose_Tx", "x_0", "y_0",
              *[f"{a}_r" for a in OPENFACE_AUS], *[f"{a}_c" for a in OPENFACE_PRESENCE]]
    lines = [", ".join(header)]
    for i in range(n):
        conf = 0.2 if i == low_confidence else 0.98
        success = 0 if i == failed_success else 1
        intens = [f"{(i + k) % 6:.2f}" for k in range(len(OPENFACE_AUS))]
        lines.append(", ".join([str(i + 1), "0", f"{i / 30:.3f}", str(conf), str(success), "0.1", "12.0", "30.1",
                                "40.2", *intens, *["1"] * len(OPENFACE_PRESENCE)]))
    path.write_text("\n".join(lines) + "\n")


def _args(tmp_path, root, out, *extra):
    return ["trainer=cpu", "trainer.enable_progress_bar=false", f"paths.runs_dir={tmp_path / 'runs'}",
            f"paths.cache_dir={tmp_path / 'cache'}", f"annotate.root={root}", f"annotate.out={out}",
            "annotate.batch_size=2", *extra]


def _failed_list(tmp_path) -> list[str]:
    return next((tmp_path / "runs").rglob("failed_faces.txt")).read_text().splitlines()


def test_openface_csv_gives_the_manifest_skips_failed_faces_and_resumes_after_a_kill(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "fetext"
    _faces(root, 5)
    _write_openface(tmp_path / "openface.csv", 5, failed_success=1, low_confidence=3)
    args = _args(tmp_path, root, out, "annotate.aus.source=openface", f"annotate.aus.csv={tmp_path / 'openface.csv'}")
    cfg = compose("generator/annotate", args)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        annotate.run(cfg, callbacks=[CrashAfter(1)])
    assert not (out / "manifest.jsonl").exists()
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out))
    assert header["au_names"] == [a.replace("AU0", "AU") for a in OPENFACE_AUS]  # the 17 intensities, not _c
    assert header["domain"] == "real" and header["label_optional"] and header["au_scale"] == "facs"
    assert [r["source_image"] for r in records] == ["face_00.png", "face_02.png", "face_04.png"]
    assert all("label" not in r for r in records)  # a plain folder: no classes
    assert records[1]["aus"][:3] == [0.4, 0.6, 0.8]  # frame 3 = face_02: (2 + k) % 6 / 5
    assert all((out / r["image"]).read_bytes() == (root / r["source_image"]).read_bytes() for r in records)
    assert all(r["caption"].startswith("a close-up photo of a face") and r["caption_source"] == "templates"
               for r in records)
    failed = _failed_list(tmp_path)
    assert len(failed) == 2 and "face_01.png: OpenFace success=0" in failed[0] and "confidence 0.2" in failed[1]
    assert len({json.loads(line)["id"] for p in (out / "parts").glob("*.jsonl")
                for line in p.read_text().splitlines()}) == 3  # the rerun annotated only what the kill left
    # Read back as real faces by a generator run (unlabelled faces are kept there).
    gen_cfg = compose("generator/tiny_test", ["data.train.format=synthetic", f"data.train.root={out}",
                                              "data.val=null", "data.test=null", "data.num_workers=0"])
    dm = FERDataModule(gen_cfg)
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    assert dm.au_names == header["au_names"] and int(sample["domain"]) == 0 and int(sample["label"]) == -1
    assert float(sample["label_soft"].sum()) == 0.0 and sample["aus"].shape == (17,)


def test_openface_per_image_csvs_pick_the_most_confident_face(tmp_path):
    root, out, csvs = tmp_path / "faces", tmp_path / "fetext", tmp_path / "openface"
    _faces(root, 2)
    csvs.mkdir()
    header = "face, confidence, " + ", ".join(f"{a}_r" for a in OPENFACE_AUS)
    (csvs / "face_00.csv").write_text(header + "\n0, 0.6, " + ", ".join(["1.0"] * 17) + "\n1, 0.9, "
                                      + ", ".join(["5.0"] * 17) + "\n")
    (csvs / "face_01.csv").write_text(header + "\n")  # FaceLandmarkImg found no face
    args = _args(tmp_path, root, out, "annotate.aus.source=openface", f"annotate.aus.csv={csvs}")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    _, records = read_manifest(str(out))
    assert [r["source_image"] for r in records] == ["face_00.png"] and records[0]["aus"] == [1.0] * 17
    assert "face_01.png: no row in" in _failed_list(tmp_path)[0]


def test_pyfeat_csv_on_a_labelled_fer2013_folder(tmp_path):
    root, out = tmp_path / "fer2013", tmp_path / "fetext"
    make_folder_dataset(root, per_class=1, size=16, split="train")
    images = sorted((root / "train").rglob("*.jpg"))
    cols = ["FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", "FaceScore", "x_0", "y_0", "Pitch", "Roll",
            "Yaw", *PYFEAT_AUS, "anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral", "input",
            "frame"]
    with open(tmp_path / "fex.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", *cols])  # Fex.to_csv writes the pandas index as a first, unnamed column
        for i, img in enumerate(images):
            score = "" if i == 2 else "0.99"  # no face: py-feat writes NaN
            aus = ["" if i == 2 else f"{0.05 * ((i + k) % 20):.2f}" for k in range(len(PYFEAT_AUS))]
            w.writerow([i, 1, 2, 10, 10, score, 5, 6, 0, 0, 0, *aus, *["0.1"] * 7, str(img), 0])
            if i == 0:  # a second, weaker face in the first image is ignored
                w.writerow([i, 0, 0, 4, 4, "0.6", 1, 1, 0, 0, 0, *["1.0"] * len(PYFEAT_AUS), *["0.1"] * 7, str(img), 0])
    args = _args(tmp_path, root, out, "annotate.format=folder", "annotate.aus.source=pyfeat",
                 f"annotate.aus.csv={tmp_path / 'fex.csv'}", "data.num_classes=7")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out))
    assert len(header["au_names"]) == 20 and header["au_names"][0] == "AU1" and not header["label_optional"]
    assert len(records) == 6 and len(_failed_list(tmp_path)) == 1
    by_source = {r["source_image"]: r for r in records}
    first = by_source[str(images[0].relative_to(root))]
    assert first["aus"][:2] == [0.0, 0.05]  # the most confident face, probabilities kept as they are
    names = header["label_names"]
    assert names == list(CANONICAL_8[:7]) and str(images[2].relative_to(root)) not in by_source
    assert len({r["label"] for r in records}) == 6  # every class but the one whose only face failed
    assert all(r["caption"].endswith(f"looking {EXPRESSION_WORDS[names[r['label']]][0]}") for r in records)


def test_libreface_csv_intensities_and_presence(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "fetext"
    faces = _faces(root, 3)
    cols = ["input_image_path", "aligned_image_path", "pitch", "yaw", "roll", "facial_expression",
            *[f"au_{k}" for k in LIBREFACE_DETECTION], *[f"au_{k}_intensity" for k in LIBREFACE_INTENSITY]]
    with open(tmp_path / "libreface.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", *cols])
        for i, face in enumerate(faces):
            w.writerow([i, str(face), f"tmp/{face.name}", 0, 0, 0, "Happiness",
                        *[i % 2] * 12, *[f"{2.5 * (i % 3):.3f}"] * 12])
    args = _args(tmp_path, root, out, "annotate.aus.source=libreface", f"annotate.aus.csv={tmp_path / 'libreface.csv'}")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out))
    assert header["au_names"] == [f"AU{k}" for k in LIBREFACE_INTENSITY] and header["au_scale"] == "facs"
    assert [r["aus"][0] for r in records] == [0.0, 0.5, 1.0]
    out2 = tmp_path / "presence"
    args = _args(tmp_path, root, out2, "annotate.aus.source=libreface", f"annotate.aus.csv={tmp_path / 'libreface.csv'}",
                 "annotate.aus.libreface_values=presence")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out2))
    assert header["au_names"] == [f"AU{k}" for k in LIBREFACE_DETECTION] and [r["aus"][0] for r in records] == [0, 1, 0]


class _TinyAUNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # mean brightness per channel -> 3 "AU" logits
        return x.mean(dim=(2, 3)) * 4.0


def test_torchscript_au_model_and_captions_from_a_file(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "fetext"
    _faces(root, 3)
    model = tmp_path / "au_model.pt"
    torch.jit.save(torch.jit.script(_TinyAUNet()), str(model))
    (tmp_path / "captions.tsv").write_text("face_00.png\ta smiling woman\nface_01\tan old man frowning\n")
    args = _args(tmp_path, root, out, "annotate.aus.source=model", f"annotate.aus.model={model}",
                 "annotate.aus.names=[AU06,AU12,au_25]", "annotate.aus.scale=logits", "annotate.aus.image_size=8",
                 "annotate.captions.source=file", f"annotate.captions.file={tmp_path / 'captions.tsv'}")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out))
    assert header["au_names"] == ["AU6", "AU12", "AU25"] and header["au_scale"] == "logits"
    assert all(len(r["aus"]) == 3 and 0 < min(r["aus"]) and max(r["aus"]) < 1 for r in records)
    assert [r["caption"] for r in records[:2]] == ["a smiling woman", "an old man frowning"]
    assert [r["caption_source"] for r in records] == ["file", "file", "templates"]


def test_onnx_model_without_onnxruntime_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import onnxruntime  # noqa: F401
        pytest.skip("onnxruntime is installed here: ONNX models load")
    except ImportError:
        pass
    from lightning_synfer.annotation.models import AUModel

    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ConfigError, match="needs onnxruntime, which is not installed.*TorchScript"):
        AUModel(str(tmp_path / "m.onnx"), ["AU1"], "unit")


def test_unknown_tool_columns_are_named(tmp_path):
    from lightning_synfer.annotation.tool_csv import AUCSVError, read_pyfeat

    (tmp_path / "x.csv").write_text("input,score\na.png,1\n")
    with pytest.raises(AUCSVError, match=r"x.csv: no py-feat AU columns; expected AU01"):
        read_pyfeat(str(tmp_path / "x.csv"))


def make_tiny_blip(folder: Path) -> Path:
    """A random BLIP captioner built from config dicts (no download): what BLIP/BLIP-2 folders look like."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "face", "smiling", "person"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    text = dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, bos_token_id=2, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizerFast(str(folder / "vocab.txt"))).save_pretrained(folder)
    return folder


def test_captions_from_a_local_image_to_text_model(tmp_path):
    root, out = tmp_path / "faces", tmp_path / "fetext"
    _faces(root, 2)
    blip = make_tiny_blip(tmp_path / "blip")
    args = _args(tmp_path, root, out, "annotate.captions.source=model", f"annotate.captions.model={blip}",
                 "annotate.captions.max_new_tokens=4")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(out))
    assert header["au_names"] == [] and header["caption_source"] == "model"
    vocab = set((blip / "vocab.txt").read_text().split())
    for r in records:
        words = r["caption"].split()
        assert words[:3] == ["a", "photo", "of"] and len(words) > 3 and set(words) <= vocab  # the model continued it
        assert r["caption_source"] == "model"
    assert read_header(str(out))["domain"] == "real"


def test_annotating_into_the_dataset_root_points_at_the_images_in_place(tmp_path):
    """The paper configs' FEText layout: dataset.json + manifest.jsonl INTO the AffectNet root, images not copied."""
    from fixtures import make_affectnet

    root = make_affectnet(tmp_path / "affectnet", n_train=4, n_val=2, size=16, codes=[0, 1, 2, 3])
    args = _args(tmp_path, root, root, "annotate.format=affectnet", "data.num_classes=7")
    assert main(["annotate", "experiment=generator/annotate", *args]) == 0
    header, records = read_manifest(str(root))
    assert len(records) == 4 and not (root / "images").exists()
    assert all(r["image"].startswith("Manually_Annotated_Images/") for r in records)
    assert sorted(header["label_names"][r["label"]] for r in records) == ["happy", "neutral", "sad", "surprise"]
