"""The command line: `python run.py TASK [experiment=GROUP/NAME] [key=value ...]`.

The task table (`lightning_synfer.tasks.TASKS`) is the one place that lists what the suite can do. With no
arguments, `python run.py` runs the main job on the embedded data.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from lightning_synfer.tasks import DEFAULT_TASK, PLAIN_TASKS, TASKS, load


DRY_RUN_KEYS = {"pipeline": "pipeline.dry_run", "sweep": "sweep.dry_run"}


def usage() -> str:
    from lightning_synfer.config.compose import list_experiments

    lines = ["usage: python run.py [TASK] [experiment=GROUP/NAME] [key=value ...]", "", "tasks:"]
    for name, (_, default, text) in TASKS.items():
        lines.append(f"  {name:<18} {text}" + (f" (default experiment: {default})" if default else ""))
    for name, (_, text) in PLAIN_TASKS.items():
        lines.append(f"  {name:<18} {text}")
    lines += ["", "experiments (experiments/<group>/<name>.yaml):"]
    lines += [f"  {name}" for name in list_experiments()]
    lines += ["", "config groups: trainer=cpu|gpu|ddp|multinode data=... model=... (see experiments/<group>/)",
              "examples:",
              "  python run.py fit experiment=supervised/fer2013_resnet18 trainer=gpu",
              "  python run.py evaluate ckpt=runs/.../checkpoints/best.ckpt data.test.root=DIR data.test.format=folder"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SYNFER_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    # Lightning prints through its own handler; stop its records reaching ours a second time.
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).propagate = False
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    task = DEFAULT_TASK
    if argv and "=" not in argv[0]:
        task = argv.pop(0)
    if dry_run:  # the flag spelling of pipeline.dry_run / sweep.dry_run
        if task not in DRY_RUN_KEYS:
            print(f"error: --dry-run: task '{task}' has no dry run (tasks with one: {', '.join(DRY_RUN_KEYS)})",
                  file=sys.stderr)
            return 2
        argv.append(f"{DRY_RUN_KEYS[task]}=true")
    from lightning_synfer.config.compose import ConfigError, compose

    try:
        if task in PLAIN_TASKS:
            return int(load(task)(argv) or 0)
        if task not in TASKS:
            import difflib

            close = difflib.get_close_matches(task, list(TASKS) + list(PLAIN_TASKS), n=1)
            raise ConfigError(f"unknown task '{task}'" + (f"; did you mean '{close[0]}'?" if close else "")
                              + f" Tasks: {', '.join(list(TASKS) + list(PLAIN_TASKS))}")
        cfg = compose(TASKS[task][1], argv)
        load(task)(cfg, [task, *argv])
    except Exception as exc:
        # Bad input: one clear line, no traceback (SYNFER_DEBUG=1 shows it). Anything else is a bug: traceback.
        if os.environ.get("SYNFER_DEBUG") or not _is_bad_input(exc, ConfigError):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _is_bad_input(exc: BaseException, config_error: type) -> bool:
    import pickle

    # Bad config/data/checkpoints; a checkpoint the safe (weights_only) unpickler refused; a diverged run.
    clean: tuple = (config_error, FileNotFoundError, ValueError, pickle.UnpicklingError)
    trainer = sys.modules.get("lightning_synfer.trainer")
    if trainer is not None:
        clean += (trainer.NonFiniteLossError,)
    return isinstance(exc, clean)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
        text = text.splitlines()[-1]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= 2000 else text[:2000] + " ..."

