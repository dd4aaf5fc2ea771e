"""Automatic segmentation before registration: run a MONAI segmentation bundle, or use a folder of label maps.

The bundle is run through its own ``inference.json`` (its preprocessing, sliding window and ``SaveImaged``), one
image at a time, then its label ids are mapped to ours with a merge-map JSON (``custom.regions.load_merge_map``),
resampled (nearest) onto the image grid if its output grid differs, and written as ``<label_dir>/<image name>``.
Existing label maps are reused unless ``overwrite``; the ground-truth labels stay in the records as ``*_gt``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch
from tqdm.auto import tqdm

from custom.flags import as_bool, optional
from custom.io import load_nifti, save_nifti
from custom.regions import load_merge_map, merge_labels

logger = logging.getLogger(__name__)


def run_segmentation_bundle(
    bundle_dir: str | Path,
    image: str | Path,
    config: str = "inference.json",
    overrides: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label map ``(X, Y, Z)`` and affine that the segmentation bundle at ``bundle_dir`` writes for ``image``.

    The bundle's config must accept the Model Zoo ids ``bundle_root``, ``datalist`` (image paths) and ``output_dir``.
    """
    from monai.bundle import ConfigWorkflow

    bundle_dir = Path(bundle_dir)
    cfg = bundle_dir / "configs" / config
    if not cfg.is_file():
        raise ValueError(f"segmentation bundle {bundle_dir} has no configs/{config}; point seg_bundle at a bundle root")
    with tempfile.TemporaryDirectory(prefix="segreg_seg_") as tmp:
        wf = ConfigWorkflow(
            config_file=str(cfg),
            workflow_type="infer",
            logging_file=False,
            bundle_root=str(bundle_dir),
            datalist=[str(image)],
            output_dir=tmp,
            **(overrides or {}),
        )
        wf.initialize()
        wf.run()
        wf.finalize()
        outputs = sorted(Path(tmp).rglob("*.nii*"))
        if len(outputs) != 1:
            raise RuntimeError(f"segmentation bundle {bundle_dir} wrote {len(outputs)} files for {image}, expected 1")
        return load_nifti(outputs[0])


def segment_images(
    images: Sequence[str],
    bundle_dir: str | Path,
    label_dir: str | Path,
    label_map: str | Path | None = None,
    config: str = "inference.json",
    overwrite: bool = False,
    overrides: dict | None = None,
) -> dict[str, str]:
    """Segment each image with the bundle, map its ids, save ``<label_dir>/<image name>``; ``{image: label path}``."""
    mapping = load_merge_map(label_map)["map"] if label_map else None
    out = {}
    for image in tqdm(sorted(set(map(str, images))), desc="segmentation", leave=False):
        dst = Path(label_dir) / Path(image).name
        out[image] = str(dst)
        if dst.exists() and not overwrite:
            continue
        label, aff = run_segmentation_bundle(bundle_dir, image, config, overrides)
        label = np.squeeze(np.asarray(label))
        if mapping is not None:
            label = merge_labels(label.astype(np.int64), mapping, unknown="warn", name=f"segmentation of {image}")
        ref = nib.load(str(image))
        if label.shape != ref.shape[:3] or not np.allclose(aff, ref.affine, atol=1e-3):
            label = resample_nearest(label, aff, ref.shape[:3], ref.affine)
        save_nifti(label.astype(np.int16), dst, ref.affine, dtype=np.int16)
    return out


def resample_nearest(label: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of ``label`` (grid ``affine``) onto the grid ``(shape, target_affine)``
    (MONAI ``ResampleToMatch``; voxels outside the source become 0)."""
    src = MetaTensor(torch.as_tensor(np.asarray(label), dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    dst = MetaTensor(torch.zeros((1,) + tuple(shape)), affine=torch.as_tensor(target_affine))
    out = ResampleToMatch(mode="nearest", padding_mode="zeros")(src, dst)
    return np.asarray(out[0].as_tensor()).round().astype(np.int64)


def with_automatic_labels(
    records: list[dict],
    bundle_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    label_map: str | Path | None = None,
    config: str = "inference.json",
    overwrite: bool = False,
) -> list[dict]:
    """Records whose ``fixed_label``/``moving_label`` are automatic segmentations, the originals kept as ``*_gt``.

    ``bundle_dir`` set: segment every image with that bundle into ``label_dir``. Only ``label_dir`` set: take the
    precomputed label maps named like the images from it. Neither: return ``records`` unchanged (ground truth).
    """
    overwrite = as_bool(overwrite, "seg_overwrite")
    bundle_dir, label_dir = optional(bundle_dir), optional(label_dir)
    if bundle_dir is None and label_dir is None:
        return records
    if label_dir is None:
        raise ValueError("set seg_label_dir: the folder the automatic label maps are written to / read from")
    images = [r[k] for r in records for k in ("fixed_image", "moving_image")]
    if bundle_dir is not None:
        labels = segment_images(images, bundle_dir, label_dir, label_map, config, overwrite)
    else:
        labels = {i: str(Path(label_dir) / Path(i).name) for i in images}
        missing = [p for p in labels.values() if not Path(p).exists()]
        if missing:
            raise ValueError(f"{len(missing)} automatic label maps are missing in {label_dir}, e.g. {missing[0]}")
    out = []
    for r in records:
        r = dict(r)
        for side in ("fixed", "moving"):
            if f"{side}_label" in r:
                r.setdefault(f"{side}_gt", r[f"{side}_label"])
            r[f"{side}_label"] = labels[r[f"{side}_image"]]
        out.append(r)
    return out
