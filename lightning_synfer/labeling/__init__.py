"""Pseudo-label rectification: the rule (rectify.py) and the distributed, resumable prediction writer (writer.py).
The task is lightning_synfer/tasks/label.py; the diffusion labeler is lightning_synfer/modules/labeler.py."""
from lightning_synfer.labeling.rectify import decide, format_summary, rectify
from lightning_synfer.labeling.writer import LabelWriter, read_predictions

__all__ = ["decide", "rectify", "format_summary", "LabelWriter", "read_predictions"]
