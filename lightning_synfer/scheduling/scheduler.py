"""The one polling loop: a dependency graph of jobs, at most N at once, on any executor, stoppable by signals.

A sweep is a graph without edges; the pipeline's stages have edges (`after:` and the artifacts they read). The
caller says how a job is made once its dependencies are done (`prepare`: it may return None, "already done",
which is how the pipeline's cache and a sweep's finished points are skipped) and what makes a finished job
done (`finish`: raise JobFailed when an artifact or metrics.json is missing). The executor starts the jobs.

SIGINT / SIGTERM to the scheduling process (Ctrl-C, `kill PID`, a batch scheduler): no job starts after it,
the signal goes on to the running jobs (which save what they can and stop), the scheduler waits for them and
then exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal kills the running
jobs. Finished jobs keep their outputs, so a rerun resumes from the cache.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

from omegaconf import DictConfig

POLL_S = 0.2


@dataclass
class Job:
    name: str
    task: str  # a task of lightning_synfer.tasks.TASKS
    overrides: list[str]  # `run.py TASK OVERRIDES` (experiment=... first where it matters)
    log: Optional[Path] = None  # stdout and stderr of a local process
    config: Optional[DictConfig] = None  # the composed config: the in-process executor runs it as it is
    resources: dict[str, Any] = field(default_factory=dict)  # submitit parameters of this job (SLURM)


class Handle(Protocol):
    where: str  # "pid 1234, log ...", "SLURM job 42_3, log ..."

    def poll(self) -> Optional[int]: ...  # the exit code once the job has ended, else None

    def send(self, signum: int) -> None: ...  # pass a signal on (a SLURM job: cancel it)

    def kill(self) -> None: ...

    def reason(self) -> str: ...  # why it failed, for the summary (exit code, log, exception)


class Executor(Protocol):
    in_process: bool  # jobs run inside this process (signals reach them directly)
    capacity: Optional[int]  # at most this many jobs at once of its own (None: the scheduler's `parallel`)

    def start(self, jobs: Sequence[Job]) -> list[Handle]: ...  # several at once: one SLURM job array

    def close(self) -> None: ...


class JobFailed(RuntimeError):
    """Raised by a `finish` callback: the job ended but did not leave what makes it done."""


class Interrupted(SystemExit):
    """The scheduler stopped on a signal: exits the process with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)  # ran now and finished, in the order they finished
    skipped: list[str] = field(default_factory=list)  # `prepare` said done already (cached, finished earlier)
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    not_started: list[str] = field(default_factory=list)  # blocked by a failure or stopped by fail_fast


class _Signals:
    """SIGINT/SIGTERM handlers for the duration of a run. The handler only notes the signal (printing or starting
    a subprocess inside a handler can break the code it interrupted); the polling loop then passes it on to the
    running jobs, and kills them on a second one. With in-process jobs SIGINT keeps Python's KeyboardInterrupt,
    which stops the running task at once; SIGTERM is noted, and Lightning's own SIGTERM handler (which calls this
    one too) stops a training after its current step."""

    def __init__(self, in_process: bool) -> None:
        self.signums = (signal.SIGTERM,) if in_process else (signal.SIGINT, signal.SIGTERM)
        self.caught: list[int] = []
        self.delivered = 0

    @property
    def received(self) -> Optional[int]:
        return self.caught[0] if self.caught else None

    def handle(self, signum: int, frame: Any = None) -> None:
        self.caught.append(signum)

    def deliver(self, running: dict[str, tuple[Job, Handle]], log: Callable[[str], None]) -> None:
        """Pass the signals caught since the last call on: the first to every running job, later ones kill."""
        while self.delivered < len(self.caught):
            signum = self.caught[self.delivered]
            first = self.delivered == 0
            self.delivered += 1
            log(f"[synfer] {signal.Signals(signum).name}: no job starts from now on; "
                f"{'passing it on to' if first else 'killing'} {len(running)} running job(s)")
            for _, handle in list(running.values()):
                handle.send(signum) if first else handle.kill()

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Signals"]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in self.signums}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_graph(graph: Mapping[str, Sequence[str]], *, executor: Executor, parallel: int,
              prepare: Callable[[str], Optional[Job]], finish: Callable[[Job, int, Handle], None],
              started: Optional[Callable[[Job, Handle], None]] = None, fail_fast: bool = True,
              log: Callable[[str], None] = print) -> Outcome:
    """Run every job of `graph` (name -> the names it waits for; its order is the start priority).

    A job becomes ready when all it waits for are done; `prepare(name)` then makes it (or returns None: done
    already). At most `parallel` run at once (or the executor's own capacity). When a job ends, `finish(job,
    exit_code, handle)` makes it done or raises JobFailed; `started(job, handle)` hears of each start. A
    failure blocks what waits for it; with `fail_fast` it also stops all new starts. Raises Interrupted after a
    signal, once the running jobs have ended."""
    pending, outcome = list(graph), Outcome()
    finished: set[str] = set()
    running: dict[str, tuple[Job, Handle]] = {}
    limit = executor.capacity or parallel
    signals = _Signals(executor.in_process)
    with signals.installed(), _no_orphans(running):
        while True:
            signals.deliver(running, log)
            stopping = signals.received is not None or (fail_fast and bool(outcome.failed))
            if not stopping:
                stop = lambda: signals.received is not None  # noqa: E731 - a signal may come while jobs start
                for job, handle in _start_ready(graph, pending, finished, running, outcome, executor, limit, prepare,
                                                stop):
                    if started is not None:
                        started(job, handle)
            if not running:
                break
            time.sleep(POLL_S)
            for name, (job, handle) in list(running.items()):
                code = handle.poll()
                if code is None:
                    continue
                del running[name]
                try:
                    finish(job, code, handle)
                except JobFailed as exc:
                    outcome.failed[name] = str(exc)
                    log(f"[synfer] {name}: FAILED ({exc})")
                    continue
                finished.add(name)
                outcome.done.append(name)
    outcome.not_started = pending
    if signals.received is not None:
        log(f"[synfer] stopped by {signal.Signals(signals.received).name}: {len(outcome.done)} job(s) finished "
            f"now, {len(pending)} not started; rerun the same command to resume")
        raise Interrupted(signals.received)
    return outcome


@contextlib.contextmanager
def _no_orphans(running: dict[str, tuple[Job, Handle]]) -> Iterator[None]:
    """An error in the loop itself (a stage config that does not compose, Ctrl-C with in-process jobs): stop the
    running jobs (SIGTERM, then SIGKILL after 30 s) and wait for them before the error goes on."""
    try:
        yield
    except BaseException:
        for _, handle in running.values():
            handle.send(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(h.poll() is None for _, h in running.values()):
            if time.monotonic() > deadline:
                for _, handle in running.values():
                    handle.kill()
            time.sleep(POLL_S)
        raise


def _start_ready(graph: Mapping[str, Sequence[str]], pending: list[str], finished: set[str],
                 running: dict[str, tuple[Job, Handle]], outcome: Outcome, executor: Executor, limit: int,
                 prepare: Callable[[str], Optional[Job]], stop: Callable[[], bool]) -> list[tuple[Job, Handle]]:
    """Prepare the ready jobs in graph order until `limit` run, and start them in one call (one SLURM array).
    A job that `prepare` finds done makes its dependants ready at once, so the list is walked again."""
    batch: list[Job] = []
    progress = True
    while progress and len(running) + len(batch) < limit:
        progress = False
        for name in list(pending):
            if len(running) + len(batch) >= limit or stop():
                break
            if any(dep not in finished for dep in graph[name]):
                continue
            pending.remove(name)
            job = prepare(name)
            if job is None:
                finished.add(name)
                outcome.skipped.append(name)
                progress = True
                break  # `finished` grew: look at the list from the top again
            batch.append(job)
    pairs = list(zip(batch, executor.start(batch))) if batch else []
    for job, handle in pairs:
        running[job.name] = (job, handle)
    return pairs
