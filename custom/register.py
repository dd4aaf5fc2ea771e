"""``python -m custom register`` / ``warp``: register any NIfTI pair; apply a displacement to images, labels, points.

Displacements are written in the Learn2Reg form on the fixed image's original grid and header (see
``custom.geometry``): ``map_coordinates(moving, identity + disp)`` gives the moving image on the fixed grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from custom.io import file_stem, learn2reg_disp_name, load_nifti, save_displacement, save_nifti


def output_names(fixed: str, moving: str, out_dir: str | os.PathLike) -> dict:
    """Output paths: Learn2Reg ``disp_<f>_<m>.nii.gz`` where the names allow it, else ``<fixed>__<moving>_disp``."""
    out = Path(out_dir)
    try:
        stem = learn2reg_disp_name(fixed, moving)[: -len(".nii.gz")]
    except ValueError:
        stem = f"{file_stem(fixed)}__{file_stem(moving)}_disp"
    return {
        "disp": out / f"{stem}.nii.gz",
        "image": out / f"{stem}_warped_image.nii.gz",
        "label": out / f"{stem}_warped_label.nii.gz",
    }


def _require(path, what: str) -> str:
    if path is None or not Path(str(path)).is_file():
        raise FileNotFoundError(f"{what} {path} not found; give an existing NIfTI file (--{what.replace(' ', '_')})")
    return str(path)


def iterative_registration(
    fixed: str,
    moving: str,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    levels=(4, 2, 1),
    iterations=(50, 50, 30),
    level_spacing_mm=None,
    weights=None,
    global_region: bool = False,
    frozen_components=(),
    progress: bool = True,
    device: str | None = None,
    reg_domain: str | int = "box",
    intensity_range=None,
    fov_value: float | None = None,
    sigma: float | None = None,
    noise_gate: float | None = 2.0,
) -> dict:
    """Training-free SegReg of one pair (MIND-SSC + Dice + L2 within regions) in the fixed image's physical space.

    Returns ``{"disp": (3, *S_fixed) Learn2Reg-form displacement on the original fixed grid, "fixed_affine",
    "moving_affine"}``. Without label maps the whole image is one region (plain iterative registration).
    Intensities are scaled to 0..1 between the 0.5 and 99.5 percentiles of each image, or within ``intensity_range``
    (e.g. ``(-1000, 1000)`` HU for CT/CBCT); ``fov_value`` (on that 0..1 scale) marks the fixed image's padding outside
    the scanner's field of view (see ``IterativeSegReg``); ``noise_gate`` leaves out of the similarity the voxels where
    the fixed image is flat up to its noise (see ``MINDSSCLoss``; ``None``: plain MIND-SSC).
    """
    from monai.losses import DiceLoss
    from monai.transforms import Compose, LoadImaged, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    from custom.geometry import displacement_to_grid, original_geometry, voxel_spacing
    from custom.iterative import IterativeSegReg
    from custom.losses import RegionDiffusionLoss, SegRegLoss
    from custom.mind import MINDSSCLoss
    from custom.transforms import AlignPaird

    paths = {"fixed_image": _require(fixed, "fixed"), "moving_image": _require(moving, "moving")}
    if (fixed_label is None) != (moving_label is None):
        raise ValueError("give both --fixed_label and --moving_label, or neither (one region: the whole image)")
    if fixed_label is not None:
        paths["fixed_label"] = _require(fixed_label, "fixed label")
        paths["moving_label"] = _require(moving_label, "moving label")
    keys = list(paths)
    data = Compose(
        [
            LoadImaged(keys, ensure_channel_first=True, image_only=True),
            AlignPaird(),
            (
                ScaleIntensityRangePercentilesd(["fixed_image", "moving_image"], 0.5, 99.5, 0.0, 1.0, clip=True)
                if intensity_range is None
                else ScaleIntensityRanged(["fixed_image", "moving_image"], *intensity_range, 0.0, 1.0, clip=True)
            ),
        ]
    )(paths)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fixed_t, moving_t = (data[k][None].to(dev) for k in ("fixed_image", "moving_image"))
    if fixed_label is None:
        fl = ml = torch.ones_like(fixed_t)
    else:
        fl, ml = (data[k][None].to(dev) for k in ("fixed_label", "moving_label"))
    w = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    w.update(weights or {})
    loss = SegRegLoss(MINDSSCLoss(noise_gate=noise_gate), DiceLoss(include_background=True), RegionDiffusionLoss(), w)
    reg = IterativeSegReg(
        loss=loss,
        levels=tuple(levels),
        iterations=tuple(iterations),
        level_spacing_mm=None if level_spacing_mm is None else tuple(level_spacing_mm),
        global_region=global_region,
        frozen_components=tuple(frozen_components or ()),
        progress=progress,
        reg_domain=reg_domain,
        fov_value=fov_value,
        sigma=sigma,
        num_threads=4,  # small crops: more CPU threads add CPU time, not speed
    )
    reg_affine, fixed_affine, fixed_shape = original_geometry(data["fixed_image"])
    _, moving_affine, _ = original_geometry(data["moving_image"])
    with torch.enable_grad():
        out = reg(fixed_t, moving_t, fl, ml, spacing=voxel_spacing(reg_affine).tolist())
    disp = displacement_to_grid(out["ddf"][0].detach().cpu(), reg_affine, fixed_affine, fixed_shape, moving_affine)
    return {"disp": disp, "fixed_affine": fixed_affine, "moving_affine": moving_affine}


def register(
    fixed: str,
    moving: str,
    fixed_label: str | None = None,
    moving_label: str | None = None,
    out_dir: str = "outputs/register",
    mode: str = "iterative",
    bundle: str | None = None,
    variant: str | None = None,
    ckpt_path: str | None = None,
    save_warped: bool = True,
    levels=(4, 2, 1),
    iterations=(50, 50, 30),
    level_spacing_mm=None,
    in_plane: bool = False,
    reg_domain: str | int = "box",
    sigma: float | None = None,
    noise_gate: float | None = 2.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Register a moving NIfTI image onto a fixed one (any orientation, spacing or origin).

    Args:
        fixed, moving: the images.
        fixed_label, moving_label: optional label maps (same grids as their images); SegReg registers every label
            present in both, separately, and composes the fields. Without them the whole image is one region.
        out_dir: destination: the displacement (Learn2Reg form, fixed grid and header) and, with ``save_warped``,
            the moving image (linear) and label map (nearest) warped onto the fixed grid.
        mode: "iterative" (training-free), "global" (one region, same optimiser) or "bundle" (a trained bundle's
            ``inference.json`` on this pair: ``bundle``, ``variant``, ``ckpt_path``).
        levels, iterations: multi-resolution schedule of the iterative modes.
        level_spacing_mm: the levels as voxel sizes in mm instead of factors, e.g. ``16,8`` (the thorax bundle's):
            large 1 mm CT volumes then register at 16 and 8 mm in minutes.
        in_plane: hold the through-plane component at 0 (thick-slice data; the axis with the largest spacing).
        reg_domain: where each region's field is regularised: "box" (its crop; default), "region" (inside its fixed
            mask only, as the paper) or a dilation in voxels (see ``custom.iterative.IterativeSegReg``).
        sigma: Gaussian smoothing (voxels) of the composition weights, e.g. 2: fewer folds at region borders.
        noise_gate: the similarity ignores voxels where the fixed image is flat up to this multiple of its noise (air
            around an MR body: without it the field there drifts by about a voxel); ``None`` for plain MIND-SSC.
        overwrite: replace existing outputs (otherwise an existing displacement file stops the run).
    """
    from custom.validation import check_output_dir

    check_output_dir(out_dir)  # before any work
    names = output_names(fixed, moving, out_dir)
    if names["disp"].exists() and not overwrite:
        raise FileExistsError(f"{names['disp']} exists; pass --overwrite true to replace it")
    if mode == "bundle":
        return register_with_bundle(fixed, moving, fixed_label, moving_label, out_dir, bundle, variant, ckpt_path)
    if mode not in ("iterative", "global"):
        raise ValueError(f"mode must be 'iterative', 'global' or 'bundle', got {mode!r}")
    frozen = ()
    if in_plane:
        from custom.evaluation import through_plane_axis
        from custom.geometry import voxel_spacing

        axis = through_plane_axis(voxel_spacing(load_affine(fixed)))
        if axis is None:
            raise ValueError(
                f"{fixed} is not thick-slice data (no axis with over twice the others' spacing); drop --in_plane"
            )
        frozen = (axis,)
    res = iterative_registration(
        fixed,
        moving,
        fixed_label,
        moving_label,
        levels=_ints(levels, "levels"),
        iterations=_ints(iterations, "iterations"),
        level_spacing_mm=None if level_spacing_mm is None else _floats(level_spacing_mm, "level_spacing_mm"),
        global_region=mode == "global",
        frozen_components=frozen,
        progress=progress,
        reg_domain=reg_domain,
        sigma=sigma,
        noise_gate=noise_gate,
    )
    save_displacement(res["disp"].numpy(), names["disp"], res["fixed_affine"])
    written = {"displacement": str(names["disp"])}
    if save_warped:
        written["warped_image"] = str(warp(moving, str(names["disp"]), str(names["image"]), kind="image"))
        if moving_label is not None:
            written["warped_label"] = str(warp(moving_label, str(names["disp"]), str(names["label"]), kind="label"))
    for k, v in written.items():
        print(f"{k}: {v}")
    return written


def register_with_bundle(fixed, moving, fixed_label, moving_label, out_dir, bundle, variant=None, ckpt_path=None):
    """Run a trained bundle's ``configs/inference.json`` on one pair; its writer puts the files in ``out_dir``."""
    from monai.bundle import ConfigWorkflow

    if bundle is None or not (Path(bundle) / "configs" / "inference.json").is_file():
        raise ValueError(f"--bundle {bundle} is not a bundle folder with configs/inference.json")
    if fixed_label is None or moving_label is None:
        raise ValueError("a trained SegReg bundle needs --fixed_label and --moving_label")
    record = {
        "fixed_image": _require(fixed, "fixed"),
        "moving_image": _require(moving, "moving"),
        "fixed_label": _require(fixed_label, "fixed label"),
        "moving_label": _require(moving_label, "moving label"),
    }
    override = {"bundle_root": str(bundle), "datalist": [record], "output_dir": str(out_dir), "writer#naming": "pair"}
    override["num_workers"] = 0
    if variant:
        override["variant"] = variant
    if ckpt_path:
        override["ckpt_path"] = ckpt_path
    wf = ConfigWorkflow(config_file=str(Path(bundle) / "configs" / "inference.json"), workflow_type="infer", **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return {"output_dir": str(out_dir)}


def load_affine(path) -> np.ndarray:
    return load_nifti(_require(path, "image"))[1]


def _ints(values, name: str) -> tuple[int, ...]:
    try:
        values = [values] if isinstance(values, (int, str)) else list(values)
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} takes whole numbers, e.g. --{name} '[4,2,1]'; got {values!r}") from None


def _floats(values, name: str) -> tuple[float, ...]:
    try:
        values = [values] if isinstance(values, (int, float, str)) else list(values)
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"--{name} takes numbers, e.g. --{name} '[16,8]'; got {values!r}") from None
    if not out or min(out) <= 0:
        raise ValueError(f"--{name} takes positive numbers, e.g. --{name} '[16,8]'; got {values!r}")
    return out


def warp(image: str, disp: str, out: str, kind: str = "image", overwrite: bool = True) -> Path:
    """Apply a Learn2Reg-form displacement to an image (linear), a label map (nearest) or a keypoint CSV.

    Args:
        image: the moving image / label map (NIfTI), or a keypoint CSV (``x,y,z`` voxel coordinates of the *fixed*
            image per row) for ``kind="points"``: each point is moved to its moving-image voxel coordinate.
        disp: displacement file ``(X, Y, Z, 3)`` on the fixed grid (its header is the output's).
        out: output path (NIfTI, or CSV for points); written atomically.
        kind: "image", "label" or "points".
    """
    from custom.geometry import warp_volume
    from custom.io import atomic_path
    from custom.metrics import sample_field

    if kind not in ("image", "label", "points"):
        raise ValueError(f"kind must be 'image', 'label' or 'points', got {kind!r}")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite true to replace it")
    arr, affine = load_nifti(_require(disp, "disp"))
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{disp} is not a displacement field (X, Y, Z, 3); its shape is {arr.shape}")
    field = torch.as_tensor(np.moveaxis(np.asarray(arr, np.float32), -1, 0))
    if kind == "points":
        from custom.datasets.learn2reg import read_keypoints

        pts = torch.as_tensor(read_keypoints(_require(image, "points")))
        moved = pts + sample_field(field[None], pts)
        with atomic_path(out) as tmp:
            np.savetxt(tmp, moved.numpy(), delimiter=",", fmt="%.4f")
        return Path(out)
    volume = torch.as_tensor(np.asarray(load_nifti(_require(image, "image"))[0], np.float32))
    if volume.ndim != 3:
        raise ValueError(f"{image} has {volume.ndim} dimensions; warp takes a 3-D image or label map")
    warped = warp_volume(volume, field, "bilinear" if kind == "image" else "nearest").numpy()
    return save_nifti(warped, out, affine, dtype=np.float32 if kind == "image" else np.int16)
