"""Seconds per tiny `fit` stage started as a fresh interpreter (`spawn`) or as a fork of the preloaded fork server
(`forkserver`), one stage at a time, the methods interleaved round by round (docs/BENCHMARKS.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stage_start_methods.py [--rounds 2] [--precision 32-true]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_synfer.scheduling import Job  # noqa: E402
from lightning_synfer.scheduling.executors import LocalProcessExecutor  # noqa: E402

TINY = ["experiment=supervised/embedded", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=16", "data.image_size=32",
        "data.train.num_images=64", "data.val.num_images=32", "data.test.num_images=32", "logger.tensorboard=false"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", type=int, default=2, help="stages per method and round")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="stage-start-"))
    common = [*TINY, f"trainer.precision={args.precision}", f"paths.runs_dir={out / 'runs'}",
              f"paths.cache_dir={out / 'cache'}"]
    executors = {m: LocalProcessExecutor(m, threads=1) for m in ("spawn", "forkserver")}
    seconds: dict[str, list[float]] = {m: [] for m in executors}
    for rnd in range(args.rounds):
        for method, executor in executors.items():
            for i in range(args.stages):
                name = f"{method}-{rnd}-{i}"
                job = Job(name, "fit", [*common, f"seed={i}", f"run_dir={out / name}"], log=out / f"{name}.log")
                t0 = time.perf_counter()
                (handle,) = executor.start([job])
                while handle.poll() is None:
                    time.sleep(0.05)
                seconds[method].append(time.perf_counter() - t0)
                print(f"{name}: exit {handle.poll()}, {seconds[method][-1]:.1f} s", flush=True)
    for method, values in seconds.items():
        print(f"{method}: median {statistics.median(values):.1f} s per stage ({', '.join(f'{v:.1f}' for v in values)})"
              f"; the first forkserver stage includes the server's imports")


if __name__ == "__main__":
    main()
