"""The stage plan's time estimate: each stage's measured seconds on a reference machine, scaled to this one.

`pipeline.stages[*].estimate_s` holds what the stage took on the machine named in `pipeline.reference`
(docs/BENCHMARKS.md), whose `speed_probe` score is `pipeline.reference.probe`. Here the same probe runs once
(~1.5 s: fp32 training steps of a small CNN on one thread, what most stages are made of), and every estimate is
scaled by reference / here. The plan's total replays the scheduler: `parallel` at a time, each free slot
taking the first stage in list order whose dependencies are done.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def speed_probe(seconds: float = 1.5, batch: int = 64) -> float:
    """Images per second of fp32 training steps of a small 32 px CNN on one thread (higher is faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(64, 8))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x = torch.randn(batch, 1, 32, 32, generator=gen)
        y = torch.randint(0, 8, (batch,), generator=gen)

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        step()  # warm-up: oneDNN picks its kernels
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            done += batch
        return done / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def makespan(names: Sequence[str], graph: dict[str, list[str]], seconds: dict[str, float], parallel: int,
             done: Sequence[str] = ()) -> float:
    """Seconds until every stage not in `done` has run, scheduled as run_graph does: whenever a slot is free, the
    first stage in list order whose dependencies have finished starts (a later ready stage fills the gap while an
    earlier one waits). A dependency that is not a stage here counts as done."""
    finished: dict[str, float] = {n: 0.0 for n in done}
    known = set(names)
    pending = [n for n in names if n not in finished]
    running: dict[str, float] = {}  # stage -> when it ends
    now = 0.0
    while pending or running:
        for name in list(pending):
            if len(running) >= max(1, parallel):
                break
            if all(d in finished or d not in known for d in graph.get(name, [])):
                pending.remove(name)
                running[name] = now + seconds.get(name, 0.0)
        if not running:  # what is left waits on itself: nothing more can start
            break
        name = min(running, key=running.__getitem__)
        now = finished[name] = running.pop(name)
    return now


def scaled_estimates(estimates: dict[str, Optional[float]], reference_probe: Optional[float],
                     here_probe: float) -> dict[str, float]:
    factor = (reference_probe / here_probe) if reference_probe and here_probe > 0 else 1.0
    return {name: float(s) * factor for name, s in estimates.items() if s is not None}
