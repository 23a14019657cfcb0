"""Sweeps (grids of ordinary runs), their launchers (local, SLURM job arrays) and result tables."""
from lightning_synfer.sweeps.grid import Point, expand, flatten_grid, plan, sweep_dir
from lightning_synfer.sweeps.table import build_tables

__all__ = ["Point", "build_tables", "expand", "flatten_grid", "plan", "sweep_dir"]
