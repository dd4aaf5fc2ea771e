"""MONAI Label infer task: propagate the moving image's label map onto the requested (fixed) image with a SegReg bundle.

Request (``POST /infer/<bundle>?image=<fixed id>``, params as JSON):

- ``image``: the fixed image (datastore id); the result lives on its original grid and header.
- ``moving_image``: datastore id of the moving image (default: the bundle's pairing rule, ``lib.pairing``).
- ``label_tag``: tag of the moving image's label map (default ``final``).
- ``fixed_label_tag``: tag of the fixed image's label map in the datastore (default ``final``); without one the
  bundle's automatic segmentation chain (``seg_bundle``) segments the fixed image; without either the request is
  refused (SegReg composes its fields with the fixed image's regions).
- ``result``: ``label`` (default: the moving label map warped onto the fixed image, bundle label ids) or ``ddf``
  (the displacement, Learn2Reg form ``(X, Y, Z, 3)`` in fixed-grid voxels).

The bundle runs through its own ``configs/inference.json`` (as exported by ``python -m custom export``), so the app
serves exactly what the bundle computes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from fastapi import HTTPException
from lib.pairing import PairingError, PairingRule
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)


class BadRequest(HTTPException):
    """A request SegReg cannot serve as given: HTTP 400 with the reason and the fix (not a bare 500)."""

    def __init__(self, msg: str):
        super().__init__(status_code=400, detail=msg)

    def __str__(self) -> str:
        return str(self.detail)


def bundle_labels(bundle_dir: Path) -> dict[str, int]:
    """MONAI Label label dict ``{name: id}`` (background left out) from the bundle's ``metadata.json`` ``labels``."""
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    return {name: int(i) for i, name in meta["labels"].items() if int(i) != 0}


def config_values(bundle_dir: Path, keys, config: str = "inference.json") -> dict:
    """The parsed values of config ids ``keys`` of the bundle (``None`` where the config lacks one); one parse."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / config))
    parser["bundle_root"] = str(bundle_dir)
    return {k: parser.get_parsed_content(k) if k in parser else None for k in keys}


def image_id_of(datastore, image_ids, path: str) -> str:
    """Datastore id (among ``image_ids``) of the image file at ``path`` (the server hands the task a file path)."""
    target = os.path.realpath(path)
    for image_id in image_ids:
        if os.path.realpath(datastore.get_image_uri(image_id)) == target:
            return image_id
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def label_uri(datastore, image_id: str, tag: str) -> str | None:
    label_id = datastore.get_label_by_image_id(image_id, tag)
    if not label_id:
        return None
    uri = datastore.get_label_uri(label_id, tag)
    return uri if uri and os.path.exists(uri) else None


class SegRegInferTask(BasicInferTask):
    """Label propagation with one SegReg bundle (a folder with ``configs/inference.json`` and, if trained,
    ``models/model.pt``)."""

    def __init__(self, bundle_dir: str | Path, datastore: Callable, rule: PairingRule, description: str = ""):
        self.bundle_dir = Path(bundle_dir)
        self.rule = rule
        self.datastore = datastore
        cfg = config_values(self.bundle_dir, ("ckpt_path", "merge_map", "seg_bundle", "seg_label_map"))
        self.ckpt_path = cfg["ckpt_path"]  # None: a training-free bundle
        self.training_free = self.ckpt_path is None
        self.merge_map, self.seg_bundle, self.seg_label_map = cfg["merge_map"], cfg["seg_bundle"], cfg["seg_label_map"]
        super().__init__(
            path=self.ckpt_path,
            network=None,
            type=InferType.SEGMENTATION,
            labels=bundle_labels(self.bundle_dir),
            dimension=3,
            description=description or f"SegReg label propagation ({self.bundle_dir.name})",
            config={"moving_image": "", "label_tag": "final", "fixed_label_tag": "final", "result": "label"},
        )

    def is_valid(self) -> bool:
        return self.training_free or Path(self.ckpt_path).is_file()

    def pre_transforms(self, data=None):
        return [self.resolve_pair]

    def post_transforms(self, data=None):
        return []

    def resolve_pair(self, data: dict[str, Any]) -> dict[str, Any]:
        """Fill ``fixed_image``, ``moving_image``, ``moving_label`` and (where one exists) ``fixed_label`` paths.
        ``data`` holds the request over the task's ``config`` defaults (``label_tag``, ``fixed_label_tag``, ...)."""
        ds = self.datastore()
        image_ids = ds.list_images()
        fixed = str(data["image"])
        if not fixed:
            raise BadRequest("the requested image is not in the datastore: pass an image id that GET /datastore lists")
        if not os.path.isfile(fixed):
            raise BadRequest(f"image {fixed} is not a file; SegReg takes NIfTI volumes (not DICOM series)")
        fixed_id = image_id_of(ds, image_ids, fixed)
        try:
            moving_id = data["moving_image"] or self.rule.default_moving(fixed_id, image_ids)
        except PairingError as e:
            raise BadRequest(str(e)) from None
        if moving_id not in image_ids:
            raise BadRequest(f"moving image {moving_id!r} is not in the datastore (params.moving_image)")
        moving_label = label_uri(ds, moving_id, data["label_tag"])
        if moving_label is None:
            raise BadRequest(
                f"moving image {moving_id} has no label map with tag {data['label_tag']!r}: save one "
                "(that is the label map to propagate) or pass params.label_tag"
            )
        if data["result"] not in ("label", "ddf"):
            raise BadRequest(f"params.result must be 'label' or 'ddf', got {data['result']!r}")
        fixed_label = label_uri(ds, fixed_id, data["fixed_label_tag"])
        source = f"datastore ({data['fixed_label_tag']})" if fixed_label else None
        data.update(
            fixed_id=fixed_id,
            moving_id=moving_id,
            fixed_image=fixed,
            moving_image=ds.get_image_uri(moving_id),
            moving_label=moving_label,
            fixed_label=fixed_label,
            fixed_label_source=source,
        )
        return data

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda") -> dict[str, Any]:
        if not self.is_valid():
            raise BadRequest(
                f"{self.bundle_dir.name} has no trained weights ({self.ckpt_path}); "
                f"run POST /train/{self.bundle_dir.name} first"
            )
        work = Path(tempfile.mkdtemp(prefix="segreg_label_"))
        try:
            if data["fixed_label"] is None and self.seg_bundle:
                data["fixed_label"] = self.segment(data["fixed_image"], work)
                data["fixed_label_source"] = f"automatic segmentation ({self.seg_bundle})"
            if data["fixed_label"] is None:
                raise BadRequest(
                    f"image {data['fixed_id']} has no label map with tag {data['fixed_label_tag']!r}: "
                    "SegReg composes its per-region fields with the fixed image's regions. Save a segmentation of "
                    "it (any tag, then params.fixed_label_tag), or set seg_bundle in the bundle's inference.json"
                )
            disp = self.run_bundle(data, work, device)
            data["pred"] = self.make_result(data, disp, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return data

    def run_bundle(self, data: dict[str, Any], work: Path, device) -> Path:
        """Run the bundle's ``inference.json`` on the pair; returns the displacement file it wrote."""
        from monai.bundle import ConfigWorkflow

        record = {k: data[k] for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")}
        override = {
            "bundle_root": str(self.bundle_dir),
            "datalist": [record],
            "output_dir": str(work / "bundle"),
            "writer#naming": "pair",
            "save_warped": False,
            "num_workers": 0,
            "device": torch.device(device),
        }
        if self.training_free:
            override["progress"] = False
        wf = ConfigWorkflow(
            config_file=str(self.bundle_dir / "configs" / "inference.json"),
            meta_file=str(self.bundle_dir / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type="infer",
            **override,
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        found = sorted((work / "bundle" / "displacements").glob("*.nii.gz"))
        if len(found) != 1:
            raise RuntimeError(f"{self.bundle_dir.name} wrote {len(found)} displacement files, expected 1")
        return found[0]

    def segment(self, image: str, work: Path) -> str:
        from custom.segmentation import segment_images

        return segment_images([image], self.seg_bundle, work / "seg", self.seg_label_map)[image]

    def make_result(self, data: dict[str, Any], disp: Path, work: Path) -> str:
        """The requested result as a file outside ``work``: the warped label map in bundle ids, or the displacement."""
        from custom.io import load_nifti, save_nifti
        from custom.register import warp

        fd, out = tempfile.mkstemp(suffix=".nii.gz", prefix="segreg_result_")
        os.close(fd)
        if data["result"] == "ddf":
            shutil.copyfile(disp, out)
            return out
        warp(data["moving_label"], str(disp), out, kind="label", overwrite=True)  # mkstemp made the file
        if self.merge_map:  # the bundle reads source ids (e.g. TotalSegmentator) and registers merged regions
            from custom.regions import load_merge_map, merge_labels

            label, affine = load_nifti(out)
            label = merge_labels(np.asarray(label).astype(np.int64), load_merge_map(self.merge_map)["map"], "ignore")
            save_nifti(label.astype(np.int16), out, affine, dtype=np.int16)
        return out

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[str, dict[str, Any]]:
        result = {
            "fixed_image": data["fixed_id"],
            "moving_image": data["moving_id"],
            "fixed_label_source": data.get("fixed_label_source") or "none",
            "bundle": self.bundle_dir.name,
            "result": data["result"],
        }
        return data["pred"], result
