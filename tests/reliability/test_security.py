"""Security: checkpoints load only through the safe unpickler (weights_only=True) or safetensors, config strings
are data (never evaluated), and manifest paths cannot leave their dataset folder (absolute, '..', symlink)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from fixtures import make_folder_dataset, make_synthetic_set
from lightning_synfer.cli import main

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "lightning_synfer", ROOT / "datamodules", ROOT / "run.py"]


def _sources():
    for base in PRODUCT:
        yield from ([base] if base.is_file() else sorted(base.rglob("*.py")))


def _code(path: Path) -> str:
    """The file without comments and docstrings (what runs)."""
    import ast

    return ast.unparse(_strip_docstrings(ast.parse(path.read_text())))


def _strip_docstrings(tree):
    import ast

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def test_every_torch_load_in_product_code_is_weights_only():
    calls = []
    for path in _sources():
        text = _code(path)
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start():i]
            calls.append((path, call))
            assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call}"
    assert calls  # the scan found the loader (lightning_synfer/checkpoints.py)
    for path in _sources():
        text = _code(path)
        assert not re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", text), path
        assert "weights_only=False" not in text, path
        # Lightning's own checkpoint loads (resume, test on best): weights_only=True
        for m in re.finditer(r"\.(fit|test|validate|predict)\([^()]*ckpt_path=[^()]*\)", text):
            assert "weights_only=True" in m.group(0), f"{path}: {m.group(0)}"


class Evil:
    """Unpickling this would create a marker file (stands for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, tiny, capsys):
    from lightning_synfer.checkpoints import CheckpointError, load_module
    from lightning_synfer.modules.generator import GeneratorModule

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "synfer": {"task": "supervised", "label_names": []}, "hyper_parameters": {},
                "payload": Evil(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_module(evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        GeneratorModule.load(evil)
    capsys.readouterr()
    assert main(["evaluate", *tiny(f"ckpt={evil}")]) == 2
    assert "weights_only" in capsys.readouterr().err
    # resuming training from it goes through Lightning's loader with weights_only=True
    assert main(["fit", *tiny("trainer.fast_dev_run=true", "model.backbone=test_resnet", "data.test=null",
                              f"resume={evil}")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("value", ["__import__('os').system('touch PWNED')", "!!python/object/apply:os.system [touch PWNED]"])
def test_config_strings_are_never_evaluated(tmp_path, tiny, capsys, value, monkeypatch):
    """A value is a plain string (Python-looking text) or refused by the safe YAML loader (python tags)."""
    from lightning_synfer.config import compose

    monkeypatch.chdir(tmp_path)
    args = tiny(f"data.train.root={value}", "data.train.format=folder", "trainer.fast_dev_run=true",
                "model.backbone=test_resnet", "data.test=null")
    capsys.readouterr()
    if value.startswith("!!"):
        code, err = main(["fit", *args]), capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert "cannot parse overrides" in err and "could not determine a constructor" in err, err
    else:
        # The value names a real dataset folder, so the run is valid: only an evaluation of it could break it.
        make_folder_dataset(tmp_path / value, per_class=2, size=32)
        assert compose("supervised/embedded", args).data.train.root == value
        assert main(["fit", *args]) == 0, capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()
    for path in _sources():
        assert not re.search(r"(?<![\w.])(eval|exec)\(", _code(path)), path


def _poison(root: Path, image: str) -> Path:
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["image"] = image
    lines[2] = json.dumps(rec)
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_file", "symlink_dir"])
def test_manifest_paths_cannot_escape_the_dataset_root(tmp_path, tiny, capsys, kind):
    root = make_synthetic_set(tmp_path / "syn", n=6, num_classes=8, size=32)
    outside = tmp_path / "secret.png"
    outside.write_bytes((root / "images" / "000000.png").read_bytes())  # a real image outside the root
    if kind == "absolute":
        image = str(outside)
    elif kind == "dotdot":
        image = "images/../../secret.png"
    elif kind == "symlink_file":
        os.symlink(outside, root / "images" / "link.png")
        image = "images/link.png"
    else:
        os.symlink(tmp_path, root / "escape")
        image = "escape/secret.png"
    manifest = _poison(root, image)
    capsys.readouterr()
    assert main(["check-dataset", str(root)]) == 1
    assert f"{manifest}:3" in capsys.readouterr().out
    code = main(["fit", *tiny("trainer.fast_dev_run=true", "model.backbone=test_resnet", "data.test=null",
                              f"data.synthetic.root={root}", "data.synthetic.format=synthetic",
                              "data.mix.synthetic_ratio=0.5")])
    err = capsys.readouterr().err
    assert code == 2 and f"{manifest}:3" in err and "'image'" in err and "Traceback" not in err
