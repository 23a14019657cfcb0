"""A test stage task, `sleep`: writes started.json (pid, time), sleeps SYNFER_TEST_SLEEP_S seconds (none with
seed=0: a stage that finishes at once), then writes metrics.json. Importing this module registers it in the task table; run as a script it is a runner:

    python tests/lightning_synfer/sleep_task.py pipeline EXPERIMENT [OVERRIDES]   # run_pipeline
    python tests/lightning_synfer/sleep_task.py TASK [OVERRIDES]                  # run.py TASK (e.g. sweep)

Its stages start through the forkserver with only this module preloaded, so that a stage starts in well under a
second (a spawned `run.py` could not find the `sleep` task, which only this module registers).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lightning_synfer import tasks

tasks.TASKS["sleep"] = ("sleep_task:run", "supervised/embedded",
                        "test helper: sleep SYNFER_TEST_SLEEP_S seconds, then write metrics.json")


def run(cfg, argv=None) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "started.json").write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
    deadline = time.time() + (float(os.environ.get("SYNFER_TEST_SLEEP_S", "0")) if cfg.seed else 0.0)
    while time.time() < deadline:
        time.sleep(0.05)
    (run_dir / "metrics.json").write_text(json.dumps({"slept": True}))
    return {}


def main(argv: list[str]) -> int:
    from lightning_synfer.scheduling import executors

    executors.PRELOAD = ("sleep_task",)
    if argv[0] == "pipeline":
        from lightning_synfer.config import compose
        from lightning_synfer.pipeline.runner import run_pipeline

        run_pipeline(compose(argv[1], argv[2:]))
        return 0
    from lightning_synfer.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
