"""Resumable training: the full training state saved at the end of every epoch, and ``--resume true`` to continue.

:class:`LastCheckpoint` is an ignite handler for the trainer. At the end of every epoch it writes ``path`` (rank 0,
atomically) with everything ``save_dict`` names: the network (DDP unwrapped), optimizer, learning-rate scheduler, the
trainer's own state (epoch, iteration) and the checkpoint record (:class:`custom.checkpoint.ModelInfo`). When the
trainer starts it either resumes from ``path`` (``resume=True``; MONAI's ``CheckpointLoader`` restores every object and
the trainer continues at the next epoch of the same schedule) or, when ``path`` or the best-model checkpoint already
exists, refuses to overwrite them unless ``overwrite=True``.

Besides the objects a config names, every save holds a :class:`RunState`: the best key metric so far (the evaluator's
``best_metric``/``best_metric_epoch`` and the best-model saver's record) and every random number generator the
training draws from (torch, numpy, Python, and the random transforms of the training data). A resumed run therefore
keeps the best model an uninterrupted run would keep (no "new best" at a score equal to the saved one) and, on the
same seed and device, trains the same weights.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.flags import as_bool
from custom.io import atomic_path
from custom.validation import InputError


def check_run_folder(path, protect=(), resume=False, overwrite=False) -> None:
    """The overwrite rule of a training run, before any work (configs call it in ``initialize``): ``resume`` needs
    ``path``; otherwise an existing ``path`` or ``protect`` file (the best model) is refused unless ``overwrite``."""
    resume, overwrite = as_bool(resume, "resume"), as_bool(overwrite, "overwrite")
    if resume:
        if not Path(path).is_file():
            raise InputError(f"--resume: {path} does not exist; train once without --resume first")
        return
    existing = [str(p) for p in [path, *protect] if Path(p).is_file()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} exist from an earlier run; pass --resume true to continue it, "
            "--overwrite true to train again from scratch, or another --ckpt_dir"
        )


def random_states(obj, found: list | None = None, seen: set | None = None) -> list:
    """Every ``numpy.random.RandomState`` reachable from ``obj`` (transforms, ``Compose``, lists of them), in a fixed
    order: the generators of MONAI's random transforms."""
    found = [] if found is None else found
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.Tensor, torch.nn.Module, str, bytes, int, float)) or obj is None:
        return found
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            random_states(x, found, seen)
    elif hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if not key.startswith("__"):
                random_states(value, found, seen)
    return found


def _np_state(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.as_tensor(keys.astype(np.int64)), "pos": int(pos), "gauss": [has_gauss, cached]}


def _np_restore(d: dict) -> tuple:
    return (d["name"], d["keys"].cpu().numpy().astype(np.uint32), d["pos"], d["gauss"][0], d["gauss"][1])


class RunState:
    """What a resumed training run needs besides the weights, optimizer and schedule (ignite ``state_dict`` protocol).

    Args:
        trainer: the trainer; its data loader's dataset transform holds the random transforms.
        evaluator: the validation evaluator (``best_metric``, ``best_metric_epoch``), or ``None``.
        saver: the best-model ``CheckpointSaver`` (its key-metric record), or ``None``.
    """

    def __init__(self, trainer: Engine, evaluator=None, saver=None) -> None:
        self.trainer, self.evaluator, self.saver = trainer, evaluator, saver

    def _transform_states(self) -> list:
        loader = getattr(self.trainer, "data_loader", None)
        return random_states(getattr(getattr(loader, "dataset", None), "transform", None))

    def state_dict(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _np_state(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_np_state(r.get_state()) for r in self._transform_states()],
        }
        if self.evaluator is not None:
            s = self.evaluator.state
            state["best_metric"] = [float(s.best_metric), int(s.best_metric_epoch)]
        checkpoint = getattr(self.saver, "_key_metric_checkpoint", None)
        if checkpoint is not None:
            state["saver"] = checkpoint.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        np.random.set_state(_np_restore(state["numpy"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        transforms = self._transform_states()
        if len(transforms) == len(state["transforms"]):
            for r, s in zip(transforms, state["transforms"]):
                r.set_state(_np_restore(s))
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = state["best_metric"]
        if self.saver is not None and "saver" in state:
            self.saver.load_state_dict(state["saver"])


class LastCheckpoint:
    """Save the training state to ``path`` every epoch; resume from it, or refuse to overwrite an earlier run.

    Args:
        path: the "last" checkpoint, e.g. ``models/last_model_<variant>.pt``.
        save_dict: ``{"model": network, "optimizer": ..., "lr_scheduler": ..., "segreg": ...}``; every value has
            ``state_dict`` / ``load_state_dict``. The trainer it is attached to is added as ``"trainer"``.
        resume: continue the run saved in ``path`` (it must exist).
        overwrite: start again although ``path`` or ``protect`` exists.
        protect: other files of this run that a new run would replace (the best-model checkpoint).
        evaluator, saver: the validation evaluator and its best-model ``CheckpointSaver``: their best-metric record is
            saved and restored with the run (:class:`RunState`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        save_dict: Mapping,
        resume: bool = False,
        overwrite: bool = False,
        protect: tuple = (),
        evaluator=None,
        saver=None,
    ) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.evaluator, self.saver = evaluator, saver
        self.resume, self.overwrite = as_bool(resume, "resume"), as_bool(overwrite, "overwrite")
        self.protect = [Path(p) for p in protect]

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)  # the engine it is attached to (a config cannot refer to it here)
        self.save_dict.setdefault("run_state", RunState(engine, self.evaluator, self.saver))
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def start(self, engine: Engine) -> None:
        check_run_folder(self.path, self.protect, self.resume, self.overwrite)
        if self.resume:
            from monai.handlers import CheckpointLoader

            load = dict(self.save_dict)
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            if "run_state" not in saved:  # written by an earlier version: resume without it, and say so
                load.pop("run_state")
                engine.logger.warning(
                    f"{self.path} holds no best-metric record or random states (an earlier version wrote it): the "
                    "resumed run may announce a new best model at the saved score and draws other random samples"
                )
            CheckpointLoader(str(self.path), load, map_location=engine.state.device)(engine)
            engine.logger.info(f"resumed from {self.path} at epoch {engine.state.epoch} of {engine.state.max_epochs}")

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
