"""One scheduler for sweep points and pipeline stages (scheduler.py: the graph, the polling loop, signals) and
where their jobs run (executors.py: this process, local spawn/forkserver processes; slurm.py: submitit)."""
from lightning_synfer.scheduling.scheduler import Interrupted, Job, JobFailed, Outcome, run_graph

__all__ = ["Interrupted", "Job", "JobFailed", "Outcome", "run_graph"]
