"""`python run.py table RUN_DIR... [--out DIR] [--group-by KEY ...] [--metrics NAME ...]`.

Each RUN_DIR is a run dir or a folder searched recursively (a sweep folder, runs/<experiment>/...). Writes
table.md, table.csv (mean, std, n per metric), runs.csv (one line per run) and, when data.mix.synthetic_ratio
or data.mix.synthetic_scale vary, `<metric>_vs_<key>.png`; prints the Markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from lightning_synfer.sweeps.table import build_tables


def default_out(paths: list[str]) -> Path:
    """The first argument when it is a folder of runs (a sweep folder), else ./tables."""
    first = Path(paths[0])
    if first.is_dir() and not (first / "metrics.json").is_file():
        return first
    return Path("tables")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run dirs or folders to search")
    parser.add_argument("--out", default=None, help="output folder (default: the first folder argument, or ./tables)")
    parser.add_argument("--group-by", nargs="+", default=None, metavar="KEY",
                        help="config keys of the rows (default: every key that varies, except seed)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="metrics.json keys to show, dotted (default: accuracy-like ones found)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.paths)
    tables = build_tables(args.paths, out=out, group_by=args.group_by, metrics=args.metrics,
                          plots=not args.no_plots)
    print(tables.markdown, end="")
    print(f"[synfer] {len(tables.runs)} runs in {len(tables.rows)} rows; grouped by "
          f"{', '.join(tables.group_keys) or '(nothing varies)'}")
    for name, path in tables.files.items():
        print(f"[synfer] {name}: {path}")
    return 0
