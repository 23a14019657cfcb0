"""Preemption: SIGTERM (what SLURM and most schedulers send first) saves last.ckpt after the current step and
exits with code 0, so the job can be requeued; `resume=auto` then continues to the same weights as an
uninterrupted run. SIGUSR1 requeueing is Lightning's SLURM handler (SLURMEnvironment(auto_requeue=True)),
active only when Lightning detects SLURM; outside SLURM SIGUSR1 has Python's default action (the process
ends, last.ckpt keeps the last periodic checkpoint). Requeued jobs also find Lightning's hpc_ckpt_N.ckpt.

The SIGUSR1 subprocess test fakes SLURM: the SLURM_* variables of a one-task job (so Lightning picks its
SLURMEnvironment and registers the requeue handler) and an `scontrol` first on PATH that records its arguments
and then does what `scontrol requeue` makes SLURM do to the running job: send it SIGTERM.
"""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest
import torch

from lightning_synfer.cli import main
from lightning_synfer.config import compose
from lightning_synfer.runs import find_resumable, prepare_run_dir, resolve_resume_checkpoint
from reliability.test_crash_resume import COMMON, Watcher, assert_same, final_state, launch, subprocess_env

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


SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "synfer", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
FAKE_SCONTROL = """#!/bin/sh
# Stand-in for SLURM's scontrol: record the call, then stop the job as `scontrol requeue` has SLURM do (SIGTERM).
echo "$@" >> "$SYNFER_SCONTROL_LOG"
kill -TERM $PPID
"""


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_hpc_checkpoint_requeues_and_exits_cleanly(tmp_path, capsys):
    """SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`) to a real `run.py fit` under a (faked) SLURM job: Lightning's handler
    saves hpc_ckpt_1.ckpt in the run dir and calls `scontrol requeue <job id>`; the SIGTERM that follows stops
    training after the current step, SaveOnPreemption writes last.ckpt, and the process exits 0 without a
    traceback or metrics.json. The requeued command (resume=auto) then finishes the run from there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    calls = tmp_path / "scontrol.log"
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SYNFER_SCONTROL_LOG=str(calls))
    run = tmp_path / "job"
    # 8 steps per epoch, 16 in all, last.ckpt after every step; no synthetic mix (not what this test is about).
    args = ["experiment=supervised/embedded", "trainer=cpu", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1",
            "trainer.num_sanity_val_steps=0", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=16",
            "data.image_size=32", "data.train.num_images=32", "data.val.num_images=16", "data.test=null",
            "model.backbone=test_resnet", "logger.tensorboard=false", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.runs_dir={tmp_path / 'runs'}", f"run_dir={run}"]
    proc = launch(["fit", *args], tmp_path / "job.log", env=env)
    watcher = Watcher(proc, run / "checkpoints" / "last.ckpt", at_step=2, sig=signal.SIGUSR1)
    watcher.start()
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run.py fit did not end within 300 s (a starved CPU?):\n"
                    f"{(tmp_path / 'job.log').read_text(errors='replace')[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
    watcher.join(timeout=10)
    log = (tmp_path / "job.log").read_text(errors="replace")
    assert watcher.sent, f"SIGUSR1 never sent (the run ended first?):\n{log[-3000:]}"
    assert proc.returncode == 0 and "Traceback" not in log, f"exit code {proc.returncode}:\n{log[-3000:]}"
    assert calls.read_text() == "requeue 4242\n", log[-3000:]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["synfer"]["task"] == "supervised" and 2 <= hpc["global_step"] < 16
    saved = re.search(r"\[synfer\] SIGTERM: saved (\S+) at step (\d+); resume with resume=auto", log)
    assert saved and saved.group(1) == str(run / "checkpoints" / "last.ckpt"), log[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] <= last["global_step"] == int(saved.group(2)) < 16
    assert not (run / "metrics.json").exists()  # unfinished: the requeued job continues it

    capsys.readouterr()
    assert main(["fit", *args, "resume=auto"]) == 0  # the requeued job (this process is not under SLURM)
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 16

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
