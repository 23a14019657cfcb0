"""benchmarks/gpu/check.sh, the prepared GPU check of issue 17: its --cpu-smoke mode runs every phase's code path
(fine-tune in Lightning vs the plain diffusers loop, sampling with/without semantic guidance and the layout start,
the FERAnno labeler) on a tiny SD at 64 px and writes the JSON + Markdown results; without a GPU and without
--cpu-smoke it fails with a message that says so; --dry-run hands over to the paper pipeline's dry run."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK_SH = REPO / "benchmarks" / "gpu" / "check.sh"


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_measures_every_phase_and_writes_json_and_markdown(tmp_path):
    check = load_check()
    assert check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "check.json").read_text())
    env = result["environment"]
    assert env["mode"] == "cpu-smoke" and env["gpu"] is None
    assert all(env[k] for k in ("date_utc", "torch", "diffusers", "transformers", "lightning"))

    fine = result["phases"]["finetune"]
    assert fine["experiment"] == "paper/generator/sd15_fetext" and fine["image_size"] == 64
    ours, plain = fine["generator_module"], fine["plain_diffusers_loop"]
    for loop in (ours, plain):
        assert loop["reps"] == check.CPU_SMOKE.train_steps and loop["median_s"] > 0
        assert math.isfinite(loop["final_loss"])
    assert ours["trainable_params_m"] == plain["trainable_params_m"]  # the same UNet trains in both loops
    assert fine["throughput_ratio_ours_over_plain"] == round(plain["median_s"] / ours["median_s"], 3)
    assert fine["recipe"]["gradient_checkpointing"] and fine["recipe"]["ema"] and fine["recipe"]["snr_gamma"] == 5.0

    sampling = result["phases"]["sampling"]["variants"]
    steps = check.CPU_SMOKE.sample_steps
    guided = {name: row["guided_steps"] for name, row in sampling.items()}
    assert guided == {"cfg": 0, "cfg + semantic guidance (window 0.3)": 1, "cfg + semantic guidance (window 1)": steps,
                      "SynFER row: cfg + guidance (window 0.3) + layout start": 1}
    assert [name for name, row in sampling.items() if row["layout_start"]] == [
        "SynFER row: cfg + guidance (window 0.3) + layout start"]
    assert all(row["images_per_s"] > 0 for row in sampling.values()) and sampling["cfg"]["time_vs_cfg"] == 1.0

    labeler = result["phases"]["labeler"]
    assert set(labeler["variants"]) == {"forward (rectification)", "training step (heads)"}
    assert all(row["images_per_s"] > 0 for row in labeler["variants"].values())

    md = (tmp_path / "check.md").read_text()
    for heading in ("# GPU check (cpu-smoke)", "## Fine-tune step", "## Sampling", "## FERAnno labeler",
                    "Throughput ratio ours / plain"):
        assert heading in md


def test_without_a_gpu_it_fails_loudly_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    out = tmp_path / "results"
    proc = subprocess.run([str(CHECK_SH), "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not out.exists()


def test_dry_run_prints_the_plan_and_runs_the_paper_pipelines_dry_run(monkeypatch, capsys):
    check = load_check()
    calls = []
    monkeypatch.setattr(check.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    assert check.main(["--dry-run"]) == 0
    assert calls == [[sys.executable, str(REPO / "run.py"), "experiment=pipeline/paper", "--dry-run"]]
    printed = capsys.readouterr().out
    assert "batch 16 @ 512 px, bf16-mixed" in printed and "25 DDIM steps" in printed
