"""Distributed, resumable synthesis of a labelled face set (trainer.predict + SynthesisWriter + merge)."""
from lightning_synfer.synthesis.merge import check_info, collect_records, done_ids, merge
from lightning_synfer.synthesis.writer import SynthesisWriter, image_relpath

__all__ = ["SynthesisWriter", "image_relpath", "merge", "done_ids", "collect_records", "check_info"]
