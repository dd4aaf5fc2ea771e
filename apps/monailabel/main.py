"""MONAI Label app serving the SegReg bundles: label propagation for annotators (3D Slicer, OHIF).

Start (after ``pip install -e ".[label]"``)::

    monailabel start_server --app apps/monailabel --studies <folder of NIfTI images> \\
        --conf models segreg_acdc,segreg_thorax --host 127.0.0.1 --port 8000

``--conf`` keys: ``models`` (bundle names, comma-separated; default all three), ``bundle_dir`` (folder of exported
bundles, default ``<app>/model``; a bundle missing there is exported from this repository with
``python -m custom export`` at start-up, with its trained weights where the repository has them), ``skip_trainers``.
See ``apps/monailabel/README.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lib.infer import SegRegInferTask
from lib.pairing import pairing_rule
from lib.train import SegRegTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

BUNDLES = ("segreg_acdc", "segreg_thorax", "segreg_abdomen")


def bundle_folders(app_dir: str, conf: dict) -> dict[str, Path]:
    """``{name: exported bundle folder}`` for the bundles named in ``conf["models"]``, exporting the missing ones."""
    names = [n.strip() for n in conf.get("models", ",".join(BUNDLES)).split(",") if n.strip()]
    unknown = [n for n in names if n not in BUNDLES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown} in --conf models; choose from {list(BUNDLES)}")
    root = Path(conf.get("bundle_dir") or Path(app_dir) / "model")
    out = {}
    for name in names:
        folder = root / name
        if not (folder / "configs" / "inference.json").is_file():
            from custom.export import export_bundle

            logger.info("exporting bundle %s into %s", name, root)
            export_bundle(name, str(root), require_weights=False)
        out[name] = folder
    return out


class SegRegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundles = bundle_folders(app_dir, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SegReg label propagation",
            description="Segmentation-driven deformable registration: propagate a label map to another image",
            version="0.3.1",
        )

    def init_infers(self):
        infers = {}
        for name, folder in self.bundles.items():
            infers[name] = SegRegInferTask(folder, self.datastore, pairing_rule(name))
            logger.info("+++ infer task %s (%s)", name, "ready" if infers[name].is_valid() else "train it first")
        return infers

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {
            name: SegRegTrainTask(folder, pairing_rule(name))
            for name, folder in self.bundles.items()
            if (folder / "configs" / "train.json").is_file()
        }
