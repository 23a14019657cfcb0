#!/usr/bin/env python
"""lightning-synfer command line. `python run.py --help` lists the tasks and experiments."""
import sys

from lightning_synfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
