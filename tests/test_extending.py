"""The "one file" promise of docs/ARCHITECTURE.md, "Adding things": a throwaway SSL method and a throwaway dataset
adapter, each one file of a temporary package, plus their experiment YAMLs, run with no other file touched.

The files are found the documented way: SYNFER_SSL_METHODS and SYNFER_ADAPTERS name the modules,
SYNFER_EXPERIMENTS_DIR the experiments. It all runs in a fresh interpreter, as `run.py` would start.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fixtures import write_image

ROOT = Path(__file__).resolve().parents[1]

METHOD_FILE = '''
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from lightning_synfer.modules.ssl import register_method
from lightning_synfer.modules.ssl.base import SSLBase


@dataclass
class AlignSettings:
    scale: float = 1.0


@register_method("align", AlignSettings)
class Align(SSLBase):
    """Pull the two views' projections together (collapses, which does not matter here)."""

    needs_sync_batchnorm = False

    def __init__(self, config, label_names, normalization=None):
        super().__init__(config, label_names, normalization)
        self.projector = nn.Linear(self.feat_dim, 8)

    def ssl_step(self, views):
        feats = [self.backbone(v) for v in views[:2]]
        z = [F.normalize(self.projector(f), dim=1) for f in feats]
        return -self.settings.scale * (z[0] * z[1]).sum(1).mean(), feats
'''

ADAPTER_FILE = '''
import os

from datamodules.adapters.base import DatasetRoot, RecordList, register_format
from datamodules.records import Record

CODES = {1: "happy", 2: "sad"}  # file names: <code>_<n>.png


@register_format("coded", codes=CODES, roots={"coded": DatasetRoot("SYNFER_CODED", "/nonexistent/coded")})
def load_coded(root, split, label_space):
    out = RecordList()
    folder = os.path.join(root, split)
    for name in sorted(os.listdir(folder)):
        canon = CODES[int(name.split("_")[0])]
        out.append(Record(image=os.path.join(folder, name), label=label_space.names.index(canon), id=name))
    return out
'''

EXPERIMENTS = {
    "ssl/align_embedded.yaml": "defaults:\n  - data: embedded\ntask: ssl\nssl:\n  method: align\n"
                               "  methods: {align: {scale: 2.0}}\n",
    "ssl/align_coded.yaml": 'defaults:\n  - ssl/align_embedded\n'
                            'data:\n  train: {format: coded, root: "${paths.coded}", split: train}\n',
}

# Runs in the fresh interpreter; prints one JSON line of what the test checks.
SCRIPT = '''
import json, sys
from datamodules.adapters import FORMATS, load_records
from datamodules.labels import LabelSpace
from lightning_synfer.cli import main
from lightning_synfer.config import ConfigError, compose
from lightning_synfer.modules.ssl import METHODS

root, overrides = sys.argv[1], json.loads(sys.argv[2])
records = load_records("coded", root, "train", LabelSpace.from_num_classes(7), key="data.train.root")
out = {"formats": FORMATS.names(), "methods": METHODS.names(), "codes": {str(k): v for k, v in FORMATS.get("coded").codes.items()},
       "labels": [r.label for r in records], "paths": compose("ssl/align_coded").paths.coded,
       "scale": compose("ssl/align_embedded").ssl.methods.align.scale}
try:
    compose("ssl/align_embedded", ["ssl.methods.align.scal=3"])
except ConfigError as exc:
    out["typo"] = str(exc)
out["check"] = main(["check-dataset", root, "--format", "coded"])
out["fits"] = [main(["fit", f"experiment=ssl/{name}", *overrides]) for name in ("align_embedded", "align_coded")]
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_new_method_and_a_new_dataset_are_one_file_each(tmp_path):
    plugins = tmp_path / "plugins" / "throwaway"
    plugins.mkdir(parents=True)
    (plugins / "__init__.py").write_text("")
    (plugins / "align.py").write_text(METHOD_FILE)
    (plugins / "coded.py").write_text(ADAPTER_FILE)
    experiments = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments", experiments)
    for name, text in EXPERIMENTS.items():
        (experiments / name).write_text(text)
    data = tmp_path / "coded"
    for i in range(8):
        write_image(data / "train" / f"{1 + i % 2}_{i}.png", size=32, mode="L", seed=i)

    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNFER_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]), OMP_NUM_THREADS="1",
               SYNFER_SSL_METHODS="throwaway.align", SYNFER_ADAPTERS="throwaway.coded",
               SYNFER_EXPERIMENTS_DIR=str(experiments), SYNFER_CODED=str(data), SYNFER_CPU_BF16="0")
    overrides = tiny_overrides(tmp_path, "trainer.fast_dev_run=true", "model.backbone=test_vit", "data.val.num_images=16")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data), json.dumps(overrides)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "coded" in out["formats"] and "align" in out["methods"]
    assert out["codes"] == {"1": "happy", "2": "sad"} and out["labels"] == [1] * 4 + [2] * 4  # happy, sad
    assert out["paths"] == str(data) and out["scale"] == 2.0  # paths.coded from the adapter, env override
    assert "Did you mean ssl.methods.align.scale" in out["typo"]
    assert out["check"] == 0 and out["fits"] == [0, 0], proc.stdout[-3000:]
    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("metrics.json"))]
    assert sorted(m["method"] for m in metrics) == ["align", "align"]
    assert all(m["global_step"] == 1 for m in metrics)
