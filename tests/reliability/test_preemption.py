"""Preemption: SIGTERM (what SLURM and most schedulers send first) saves last.ckpt after the current step and
exits with code 0, so the job can be requeued; `resume=auto` then continues to the same weights as an
uninterrupted run. SIGUSR1 requeueing is Lightning's SLURM handler (SLURMEnvironment(auto_requeue=True)),
active only when Lightning detects SLURM; outside SLURM SIGUSR1 has Python's default action (the process
ends, last.ckpt keeps the last periodic checkpoint). Requeued jobs also find Lightning's hpc_ckpt_N.ckpt.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.runs import find_resumable, prepare_run_dir, resolve_resume_checkpoint
from reliability.test_crash_resume import COMMON, Watcher, assert_same, final_state, launch

SUPERVISED = ["experiment=supervised/embedded", *COMMON, "model.backbone=test_resnet", "model.drop_rate=0.2",
              "data.augment.preset=fer"]


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_exits_cleanly_and_resumes(tmp_path):
    args = [*SUPERVISED, f"paths.cache_dir={tmp_path / 'cache'}", f"paths.runs_dir={tmp_path / 'runs'}"]
    run = tmp_path / "preempted"
    proc = launch(["fit", *args, f"run_dir={run}"], tmp_path / "preempted.log")
    watcher = Watcher(proc, run / "checkpoints" / "last.ckpt", at_step=4, sig=signal.SIGTERM)
    watcher.start()
    assert main(["fit", *args, f"run_dir={tmp_path / 'full'}"]) == 0  # the reference, meanwhile
    proc.wait(timeout=300)
    watcher.join(timeout=10)
    log = (tmp_path / "preempted.log").read_text(errors="replace")
    assert watcher.sent, log[-3000:]
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{log[-3000:]}"
    assert "Traceback" not in log
    saved = re.search(r"\[synfer\] SIGTERM: saved (\S+) at step (\d+); resume with resume=auto", log)
    assert saved, log[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == int(saved.group(2)) and 4 <= ckpt["global_step"] < 16
    assert not (run / "metrics.json").exists()  # unfinished: a requeued job resumes it

    assert main(["fit", *args, f"run_dir={run}", "resume=auto"]) == 0
    assert_same(final_state(tmp_path / "full"), final_state(run), "final checkpoint after SIGTERM + resume")


def test_sigusr1_requeue_is_lightnings_slurm_handler(tiny, monkeypatch):
    """Under SLURM the Trainer we build keeps Lightning's auto-requeue environment (SIGUSR1 -> hpc checkpoint +
    scontrol requeue); outside SLURM there is no SIGUSR1 handler at all."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from lightning_synfer.trainer import build_trainer

    cfg = compose("supervised/embedded", tiny())
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    assert not isinstance(build_trainer(cfg, None)._accelerator_connector.cluster_environment, SLURMEnvironment)
    for var, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "synfer",
                       "SLURM_JOB_ID": "123", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(var, value)
    env = build_trainer(cfg, None)._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1


def test_resume_auto_takes_the_newest_of_last_and_hpc_checkpoints(tiny, tmp_path):
    """After a SLURM SIGUSR1 requeue, Lightning's hpc_ckpt_N.ckpt (in the run dir) may be newer than last.ckpt."""
    cfg = compose("supervised/embedded", tiny("resume=auto"))
    run = prepare_run_dir(cfg)
    assert resolve_resume_checkpoint(cfg, run) is None
    hpc = run.path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    assert find_resumable(cfg, run.config_hash) == run.path
    assert resolve_resume_checkpoint(cfg, run) == str(hpc)
    last = run.checkpoints / "last.ckpt"
    last.write_bytes(b"x")
    now = time.time()
    os.utime(hpc, (now - 60, now - 60))
    assert resolve_resume_checkpoint(cfg, run) == str(last)
    os.utime(hpc, (now + 60, now + 60))
    assert resolve_resume_checkpoint(cfg, run) == str(hpc)
