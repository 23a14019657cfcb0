"""EMA-teacher base (MoCo v3, BYOL, DINO): a frozen copy of student modules, updated after every optimizer
step as teacher <- tau * teacher + (1 - tau) * student, with tau raised from ssl.momentum_start to
ssl.momentum_end on a cosine over the run (BYOL; lightly's `update_momentum`, `cosine_schedule`)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule

from lightning_synfer.modules.ssl.base import SSLBase


class MomentumSSL(SSLBase):
    def __init__(self, config: dict, label_names: Sequence[str], normalization: dict | None = None) -> None:
        super().__init__(config, label_names, normalization)
        self.teacher = nn.ModuleDict()
        self.momentum = float(self.cfg.ssl.momentum_start)
        self._last_step = -1

    def make_teacher(self, *names: str, **factories: Callable[[], nn.Module]) -> None:
        """Copy the student modules `names` (attributes of self) into self.teacher, without gradients:
        a deep copy, or `factories[name]()` loaded with the student's weights (weight-normed layers,
        as in the DINO head, cannot be deep-copied). The teacher stays in train mode with the module, so
        its BatchNorm uses batch statistics (MoCo v3, BYOL); SyncBatchNorm (the method's
        `needs_sync_batchnorm`, or `trainer.sync_batchnorm=true`) converts it too."""
        for name in names:
            student = getattr(self, name)
            if name in factories:
                teacher = factories[name]()
                teacher.load_state_dict(student.state_dict())
            else:
                teacher = copy.deepcopy(student)
            for p in teacher.parameters():
                p.requires_grad = False
            self.teacher[name] = teacher

    def momentum_pairs(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        for name, teacher in self.teacher.items():
            yield getattr(self, name), teacher

    def momentum_at(self, step: int, total: int) -> float:
        s = self.cfg.ssl
        return float(cosine_schedule(step, max(1, total), s.momentum_start, s.momentum_end))

    def update_teacher(self, tau: float) -> None:
        for student, teacher in self.momentum_pairs():
            update_momentum(student, teacher, m=tau)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step (not per accumulated micro-batch), with tau of the step just taken. Here and
        # not in on_train_batch_end: callbacks' on_train_batch_end (ModelCheckpoint) runs before the module's,
        # so a checkpoint written there would miss this step's teacher update and a resumed run would diverge.
        step = self.trainer.global_step + 1  # Lightning counts the step once this hook has returned
        if step > self._last_step:
            self.momentum = self.momentum_at(step - 1, int(self.trainer.estimated_stepping_batches))
            self.update_teacher(self.momentum)
            self._last_step = step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/tau", self.momentum)
