"""The Trainer factory's contract with Lightning: every TrainerConfig field reaches lightning.Trainer, and the one
private Lightning hook we call is covered by a pinned version range."""
from __future__ import annotations

import configparser
import inspect
from importlib import metadata
from pathlib import Path

import lightning as L
from lightning.pytorch.loops.fit_loop import _FitLoop
from packaging.requirements import Requirement

from lightning_synfer.config.compose import compose
from lightning_synfer.trainer import OWN_TRAINER_KEYS, build_trainer, trainer_arguments

ROOT = Path(__file__).resolve().parents[2]


def _lightning_requirement() -> Requirement:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return next(Requirement(line) for line in lines if Requirement(line).name == "lightning")


def test_lightning_is_pinned_to_the_tested_range_because_we_call_a_private_hook():
    req = _lightning_requirement()
    assert any(spec.operator == "<" for spec in req.specifier), f"setup.cfg: {req} needs an upper bound"
    assert req.specifier.contains(metadata.version("lightning")), f"installed lightning is outside {req}"
    # RestoreLoaderState calls it; a Lightning release without it must fail here, not silently replay epochs.
    assert callable(getattr(_FitLoop, "_load_combined_loader_states", None))


def test_every_trainer_config_field_is_a_trainer_argument_or_ours():
    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    passed = set(trainer_arguments())
    assert passed <= accepted, f"TrainerConfig fields lightning.Trainer does not take: {sorted(passed - accepted)}"
    assert OWN_TRAINER_KEYS - {"checkpoint_every_n_steps"} <= accepted  # precision, sync_batchnorm: resolved by us


def test_config_values_reach_the_trainer(tiny):
    cfg = compose("supervised/embedded", tiny("trainer.max_steps=7", "trainer.accumulate_grad_batches=3",
                                              "trainer.gradient_clip_val=0.5", "trainer.log_every_n_steps=4"))
    trainer = build_trainer(cfg, None)
    assert trainer.max_steps == 7
    assert trainer.accumulate_grad_batches == 3
    assert trainer.gradient_clip_val == 0.5
    assert trainer.log_every_n_steps == 4
