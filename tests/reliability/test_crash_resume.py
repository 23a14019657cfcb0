"""Crash resume: a run killed with SIGKILL at a random step, then rerun with the same command + resume=auto,
ends with exactly the weights of an uninterrupted run (bitwise on CPU, trainer.deterministic=true).

Covers supervised, SSL (MoCo v3) and generator training, each with augmentation on, a synthetic stand-in mixed
in at ratio 0.5 (the mixing sampler's mid-epoch position), the LR schedule, the generator's EMA and the RNG
(per-sample augmentation seeds from the sampler, per-batch reseeding by `trainer.SeedEachBatch`).

The killed run is a real `python run.py fit` subprocess; a watcher thread polls `D/checkpoints/last.ckpt`,
freezes the process (SIGSTOP) once it holds the chosen step, notes the step on disk and sends SIGKILL. The
uninterrupted reference and the resumed run go through the same CLI entry point in this process (one thread,
like the subprocess), which saves two interpreter start-ups per family on a small shared CPU machine.

Synthesis (`run.py synthesize`) and labelling (`run.py label`) killed mid-run: the same command again completes
the set with exactly N unique records, and no manifest is ever visible half-written.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_synfer.cli import main

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SYNFER_RELIABILITY_SEED", random.SystemRandom().randrange(10_000)))

# 32 real images, 4 real + 4 synthetic per step: 8 steps per epoch, 16 in all; last.ckpt every 3 steps.
STEPS_PER_EPOCH, EPOCHS = 8, 2
COMMON = [
    "trainer=cpu", f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "trainer.deterministic=true", "trainer.checkpoint_every_n_steps=3", "trainer.num_sanity_val_steps=0",
    "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=16", "data.image_size=32",
    "data.train.num_images=32", "data.val.num_images=16", "data.test=null",
    "data.synthetic={format: embedded, split: train, num_images: 64, seed: 1000}", "data.mix.synthetic_ratio=0.5",
    "logger.tensorboard=false",
]
SSL_SMALL = ["model.backbone=test_vit", "ssl.proj_hidden_dim=32", "ssl.pred_hidden_dim=32", "ssl.proj_output_dim=16",
             "ssl.aug.local_size=16", "ssl.online.knn_bank_size=16"]
FAMILIES = {
    # test_resnet has batch norm (running stats) and dropout (model RNG); `fer` augmentation (data RNG).
    "supervised": ("supervised/embedded", ["model.backbone=test_resnet", "model.drop_rate=0.2",
                                           "data.augment.preset=fer"]),
    "ssl": ("ssl/embedded_mocov3", SSL_SMALL),
    "generator": ("generator/tiny_test", ["generator.sample_every_n_steps=0", "generator.export_on_fit_end=false",
                                          "trainer.limit_val_batches=1"]),
}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SYNFER_RUN_STAMP", None)
    return env


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env or subprocess_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def ckpt_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # not there yet (last.ckpt is replaced atomically, so never half-written)
        return None


class Watcher(threading.Thread):
    """Sends `sig` to `proc` once `ckpt` holds global step >= `at_step`. For SIGKILL the process is frozen first
    (SIGSTOP), so `self.step` is exactly the checkpoint a resumed run finds."""

    def __init__(self, proc: subprocess.Popen, ckpt: Path, at_step: int, sig: int = signal.SIGKILL) -> None:
        super().__init__(daemon=True)
        self.proc, self.ckpt, self.at_step, self.sig = proc, ckpt, at_step, sig
        self.step: int | None = None
        self.sent = False

    def run(self) -> None:
        seen = None
        while self.proc.poll() is None:
            try:
                stamp = self.ckpt.stat().st_mtime_ns
            except FileNotFoundError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                step = ckpt_step(self.ckpt)
                if step is not None and step >= self.at_step:
                    if self.sig == signal.SIGKILL:
                        os.kill(self.proc.pid, signal.SIGSTOP)
                        step = ckpt_step(self.ckpt)
                    self.step = step
                    os.kill(self.proc.pid, self.sig)
                    self.sent = True
                    return
            time.sleep(0.01)


def final_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"global_step": ckpt["global_step"], "state_dict": ckpt["state_dict"],
            "optimizer": ckpt["optimizer_states"], "lr_schedulers": ckpt.get("lr_schedulers"),
            "ema": ckpt.get("ema")}


def assert_same(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), f"keys differ at {where}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # embedded renders, shared by every run of this module


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sigkill_then_resume_auto_equals_uninterrupted_run(family, tmp_path, shared_cache):
    experiment, extra = FAMILIES[family]
    rng = random.Random(f"{SEED}-{family}")
    kill_at = rng.randint(2, STEPS_PER_EPOCH * EPOCHS - 5)
    note = f"(SYNFER_RELIABILITY_SEED={SEED}, kill at step >= {kill_at})"
    args = [f"experiment={experiment}", *COMMON, *extra, f"paths.cache_dir={shared_cache}",
            f"paths.runs_dir={tmp_path / 'runs'}"]

    killed_dir = tmp_path / "killed"
    proc = launch(["fit", *args, f"run_dir={killed_dir}"], tmp_path / "killed.log")
    watcher = Watcher(proc, killed_dir / "checkpoints" / "last.ckpt", kill_at)
    watcher.start()
    # The uninterrupted reference runs here meanwhile (both single-threaded).
    assert main(["fit", *args, f"run_dir={tmp_path / 'full'}"]) == 0
    proc.wait(timeout=300)
    watcher.join(timeout=10)
    log = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert watcher.sent and proc.returncode == -signal.SIGKILL, f"run was not killed {note}:\n{log}"
    assert watcher.step is not None and kill_at <= watcher.step < STEPS_PER_EPOCH * EPOCHS, note
    assert not (killed_dir / "metrics.json").exists()

    assert main(["fit", *args, f"run_dir={killed_dir}", "resume=auto"]) == 0
    full, resumed = final_state(tmp_path / "full"), final_state(killed_dir)
    assert full["global_step"] == resumed["global_step"] == STEPS_PER_EPOCH * EPOCHS
    if family == "generator":
        assert full["ema"] and full["ema"]["optimization_step"] == STEPS_PER_EPOCH * EPOCHS
    assert_same(full, resumed, f"{family} final checkpoint {note}")


def _part_lines(out: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (out / "parts").glob("*.jsonl")) \
        if (out / "parts").is_dir() else 0


@pytest.mark.slow
def test_synthesis_sigkill_then_rerun_gives_exactly_n_unique_records(tmp_path):
    """`run.py synthesize` killed mid-run; the same command again completes the set with exactly N unique
    records, every image present, and no manifest is ever visible half-written (the kill freezes the process
    and checks the folder first). Labelling: `test_label_sigkill_then_rerun_gives_exactly_n_unique_records`."""
    from datamodules.labels import CANONICAL_8
    from datamodules.synthetic import read_manifest
    from lightning_synfer.config import compose, to_container
    from lightning_synfer.modules.generator import GeneratorModule

    torch.manual_seed(0)
    gen = GeneratorModule(config=to_container(compose("generator/tiny_test", ["data.image_size=16"])),
                          label_names=list(CANONICAL_8))
    export = gen.save_pretrained(tmp_path / "export")
    out, n = tmp_path / "synth", 24
    args = ["synthesize", "experiment=generator/synthesize_embedded", "trainer=cpu", "trainer.enable_progress_bar=false",
            "data.num_workers=0", "data.image_size=16", "data.train.num_images=32", f"paths.runs_dir={tmp_path / 'runs'}",
            f"paths.cache_dir={tmp_path / 'cache'}", f"synthesis.generator={export}", f"synthesis.out={out}",
            f"synthesis.num_images={n}", "synthesis.batch_size=2", "sampling.steps=2", "synthesis.shard_size=8"]
    proc = launch(args, tmp_path / "synth.log")
    kill_at = random.Random(f"{SEED}-synth").randint(2, 8)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and _part_lines(out) < kill_at and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        lines = _part_lines(out)
        manifest_seen = (out / "manifest.jsonl").exists()
        if manifest_seen:  # only if it already finished: then the manifest must be complete
            assert len(read_manifest(str(out))[1]) == n
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    log = (tmp_path / "synth.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL and not manifest_seen and kill_at <= lines < n, \
        f"(SYNFER_RELIABILITY_SEED={SEED}) lines={lines}:\n{log}"

    assert main(args[:1] + args[1:]) == 0
    header, records = read_manifest(str(out))
    assert len(records) == n and len({r["id"] for r in records}) == n
    assert sorted(r["index"] for r in records) == list(range(n))
    assert all((out / r["image"]).is_file() for r in records)
    assert main(["check-dataset", str(out)]) == 0


def _label_predictions(root: Path) -> list[dict]:
    """Every prediction line the label task would read back (a line cut by the kill is not one of them)."""
    out = []
    for part in sorted((root / "labeling").glob("*/parts/*.jsonl")):
        for line in part.read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.mark.slow
def test_label_sigkill_then_rerun_gives_exactly_n_unique_records(tmp_path):
    """`run.py label` killed mid-prediction; the same command again predicts only the records the killed run had
    not written, once each, and writes manifest.v2.jsonl with exactly N unique records. No v2 manifest (nor its
    temporary file) exists while the killed run is frozen, and manifest.jsonl (v1) is never touched."""
    from datamodules.labels import CANONICAL_8
    from datamodules.synthetic import read_manifest
    from fixtures import make_synthetic_set
    from lightning_synfer.config import compose, to_container
    from lightning_synfer.modules.supervised import SupervisedFER

    n = 40
    root = make_synthetic_set(tmp_path / "set", n=n, num_classes=8, size=16, mode="L")
    v1 = (root / "manifest.jsonl").read_bytes()
    torch.manual_seed(1)  # an untrained classifier: the resume logic does not care how good its labels are
    clf = SupervisedFER(config=to_container(compose("supervised/embedded", [
        "data.image_size=16", "model.backbone=test_resnet", "logger.log_confusion_matrix=false"])),
        label_names=list(CANONICAL_8))
    ckpt = {"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams)}
    clf.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "clf.ckpt")
    args = ["label", "trainer=cpu", "trainer.enable_progress_bar=false", "data.num_workers=0", "labeling.batch_size=1",
            f"paths.runs_dir={tmp_path / 'runs'}", f"labeling.dataset={root}",
            f"labeling.ensemble=[{tmp_path / 'clf.ckpt'}]"]

    proc = launch(args, tmp_path / "label.log")
    kill_at = random.Random(f"{SEED}-label").randint(2, 10)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and len(_label_predictions(root)) < kill_at and time.time() < deadline:
            time.sleep(0.01)
        timed_out = time.time() >= deadline
        os.kill(proc.pid, signal.SIGSTOP)
        done = _label_predictions(root)
        v2_files = sorted(p.name for p in root.iterdir() if p.name.startswith("manifest.v2"))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    log = (tmp_path / "label.log").read_text(errors="replace")[-3000:]
    note = f"(SYNFER_RELIABILITY_SEED={SEED}, kill after {kill_at} predictions, {len(done)} on disk" + (
        ", 240 s deadline passed: a starved CPU?)" if timed_out else ")")
    assert proc.returncode == -signal.SIGKILL and kill_at <= len(done) < n, f"{note}:\n{log}"
    assert v2_files == [] and not list((root / "labeling").glob("*/written.json")), f"{v2_files} {note}"

    assert main(args) == 0  # the same command, rerun
    predictions = _label_predictions(root)
    ids = [r["id"] for r in predictions]
    assert len(ids) == n and len(set(ids)) == n, f"records predicted twice or missing {note}"  # once each
    metrics = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert metrics["num_predicted_now"] == n - len(done) and metrics["version"] == 2, note
    header, records = read_manifest(str(root))
    assert len(records) == n and {r["id"] for r in records} == {f"syn-{i:06d}" for i in range(n)}
    assert all("label_source" in r for r in records)
    assert (root / "manifest.jsonl").read_bytes() == v1
    assert not [p.name for p in root.iterdir() if ".tmp" in p.name]
    assert main(["check-dataset", str(root)]) == 0
