"""Resumable training: the full training state saved at the end of every epoch, and ``--resume true`` to continue.

:class:`LastCheckpoint` is an ignite handler for the trainer. At the end of every epoch it writes ``path`` (rank 0,
atomically) with everything ``save_dict`` names: the network (DDP unwrapped), optimizer, learning-rate scheduler, the
trainer's own state (epoch, iteration) and the checkpoint record (:class:`custom.checkpoint.ModelInfo`). When the
trainer starts it either resumes from ``path`` (``resume=True``; MONAI's ``CheckpointLoader`` restores every object and
the trainer continues at the next epoch of the same schedule) or, when ``path`` or the best-model checkpoint already
exists, refuses to overwrite them unless ``overwrite=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from custom.io import atomic_path
from custom.validation import InputError


class LastCheckpoint:
    """Save the training state to ``path`` every epoch; resume from it, or refuse to overwrite an earlier run.

    Args:
        path: the "last" checkpoint, e.g. ``models/last_model_<variant>.pt``.
        save_dict: ``{"model": network, "optimizer": ..., "lr_scheduler": ..., "segreg": ...}``; every value has
            ``state_dict`` / ``load_state_dict``. The trainer it is attached to is added as ``"trainer"``.
        resume: continue the run saved in ``path`` (it must exist).
        overwrite: start again although ``path`` or ``protect`` exists.
        protect: other files of this run that a new run would replace (the best-model checkpoint).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: Mapping,
        resume: bool = False,
        overwrite: bool = False,
        protect: tuple = (),
    ) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.resume, self.overwrite = bool(resume), bool(overwrite)
        self.protect = [Path(p) for p in protect]

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)  # the engine it is attached to (a config cannot refer to it here)
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def start(self, engine: Engine) -> None:
        if self.resume:
            if not self.path.is_file():
                raise InputError(f"--resume: {self.path} does not exist; train once without --resume first")
            from monai.handlers import CheckpointLoader

            CheckpointLoader(str(self.path), self.save_dict, map_location=engine.state.device)(engine)
            engine.logger.info(f"resumed from {self.path} at epoch {engine.state.epoch} of {engine.state.max_epochs}")
            return
        existing = [p for p in [self.path, *self.protect] if p.is_file()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{', '.join(map(str, existing))} exist from an earlier run; pass --resume true to continue it, "
                "--overwrite true to train again from scratch, or another --ckpt_dir"
            )

    def save(self, engine: Engine) -> None:
        if idist.get_rank() != 0:  # one writer under torchrun
            return
        state = {}
        for k, obj in self.save_dict.items():
            obj = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
            state[k] = obj.state_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
