"""`python run.py --help` lists every task and every experiment config; a misspelt task is one clear error."""
from __future__ import annotations

from pathlib import Path

import pytest

from lightning_synfer.cli import main
from lightning_synfer.tasks import PLAIN_TASKS, TASKS

ROOT = Path(__file__).resolve().parents[2]
CONFIG_GROUPS = {"paths", "trainer", "logger", "data", "model"}  # merged under their key, not experiments


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_tasks_and_experiment_configs(capsys, flag):
    assert main([flag]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: python run.py")
    listed_tasks = {ln.split()[0] for ln in lines[lines.index("tasks:") + 1:] if ln.startswith("  ") and ln.strip()}
    assert {"fit", "evaluate"} | set(TASKS) | set(PLAIN_TASKS) <= listed_tasks
    on_disk = sorted(p.relative_to(ROOT / "experiments").with_suffix("").as_posix()
                     for p in (ROOT / "experiments").rglob("*.yaml")
                     if p.relative_to(ROOT / "experiments").parts[0] not in CONFIG_GROUPS)
    assert "supervised/embedded" in on_disk and "supervised/fer2013_resnet18" in on_disk
    start = next(i for i, ln in enumerate(lines) if ln.startswith("experiments"))
    listed = [ln.strip() for ln in lines[start + 1:start + 1 + len(on_disk)]]
    assert listed == on_disk
    assert not any(ln.strip().startswith(f"{group}/") for ln in lines for group in CONFIG_GROUPS)


def test_unknown_task_is_one_error_with_a_suggestion(capsys):
    assert main(["evalute"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'evalute'; did you mean 'evaluate'?") and "Traceback" not in err
