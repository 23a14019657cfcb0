from lightning_synfer.losses.soft_ce import SoftTargetCrossEntropy

__all__ = ["SoftTargetCrossEntropy"]
