"""MONAI Label train task: build fixed/moving pair records from the labelled datastore images and run the bundle's
``configs/train.json`` (``python -m monai.bundle run training`` with the datastore pairs as its data lists).

Request params: ``max_epochs`` (default 20; validation runs at least once, at the end), ``val_fraction`` (share of
subjects held out for validation, default 0.2), ``label_tag`` (default ``final``), ``device``. Training starts from
scratch; the weights with the best validation score replace the bundle's checkpoint (``models/model.pt`` in an
exported bundle), so the next inference request uses them. ``GET /info`` shows the last run's figures
(``train_stats``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from lib.infer import BadRequest, config_values, label_uri
from lib.pairing import PairingError, PairingRule, split_by_subject
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

logger = logging.getLogger(__name__)


def pair_records(datastore, pairs, tag: str) -> list[dict]:
    """``{fixed_image, moving_image, fixed_label, moving_label}`` file records for ``(fixed id, moving id)`` pairs."""
    records = []
    for f, m in pairs:
        rec = {}
        for side, image_id in (("fixed", f), ("moving", m)):
            rec[f"{side}_image"] = datastore.get_image_uri(image_id)
            rec[f"{side}_label"] = label_uri(datastore, image_id, tag)
        records.append(rec)
    return records


class SegRegTrainTask(TrainTask):
    """Train one SegReg bundle (a folder with ``configs/train.json``) on the datastore's labelled pairs."""

    def __init__(self, bundle_dir: str | Path, rule: PairingRule, description: str = ""):
        super().__init__(description or f"Train SegReg ({Path(bundle_dir).name}) on labelled datastore pairs")
        self.bundle_dir = Path(bundle_dir)
        self.rule = rule
        self.stats_file = self.bundle_dir / "train_runs" / "last.json"

    def config(self):
        return {
            "max_epochs": 20,
            "val_fraction": 0.2,
            "label_tag": "final",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }

    def stats(self):
        return json.loads(self.stats_file.read_text()) if self.stats_file.is_file() else {}

    def __call__(self, request, datastore):
        from monai.bundle import ConfigWorkflow

        tag = request.get("label_tag", "final")
        ids = datastore.get_labeled_images(label_tag=tag)
        try:
            train, val = split_by_subject(ids, self.rule, float(request.get("val_fraction", 0.2)))
        except PairingError as e:
            raise BadRequest(str(e)) from None
        held_out = not set(train) & set(val)
        if not held_out:
            logger.warning("too few labelled subjects for a held-out validation: it reuses the training pairs")
        device = name_to_device(request.get("device", "cuda"))  # cuda -> cpu on a machine without one
        epochs = int(request.get("max_epochs", 20))
        # validate at least once: the bundle writes models/model.pt at its best validation score
        val_interval = config_values(self.bundle_dir, ("val_interval",), "train.json")["val_interval"]
        val_interval = max(1, min(int(val_interval or 1), epochs))
        run_dir = self.bundle_dir / "train_runs" / time.strftime("%Y%m%d_%H%M%S")
        logger.info(
            "%s: %d training and %d validation pairs -> %s", self.bundle_dir.name, len(train), len(val), run_dir
        )
        start = time.time()
        wf = ConfigWorkflow(
            config_file=str(self.bundle_dir / "configs" / "train.json"),
            meta_file=str(self.bundle_dir / "configs" / "metadata.json"),
            workflow_type="train",
            bundle_root=str(self.bundle_dir),
            train_datalist=pair_records(datastore, train, tag),
            val_datalist=pair_records(datastore, val, tag),
            epochs=epochs,
            val_interval=val_interval,
            output_dir=str(run_dir),
            overwrite=True,
            num_workers=0,
            device=torch.device(device),
        )
        wf.initialize()
        wf.run()
        best = wf.parser.get_parsed_content("validate#evaluator").state.best_metric
        checkpoint = Path(wf.parser.get_parsed_content("ckpt_dir")) / wf.parser.get_parsed_content("model_name")
        wf.finalize()
        stats = {
            "train_pairs": len(train),
            "val_pairs": len(val),
            "validation_held_out": held_out,
            "epochs": epochs,
            "best_metric": None if best is None or best == -1 else float(best),
            "seconds": round(time.time() - start, 1),
            "checkpoint": str(checkpoint),
            "run_dir": str(run_dir),
        }
        self.stats_file.parent.mkdir(parents=True, exist_ok=True)
        self.stats_file.write_text(json.dumps(stats, indent=4) + "\n")
        return stats
