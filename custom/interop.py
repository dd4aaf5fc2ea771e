"""Displacements for other toolkits: ITK / SimpleITK / 3D Slicer / ANTs transforms in world space, and back.

SegReg writes Learn2Reg displacements: ``u`` ``(X, Y, Z, 3)`` in voxels of the fixed grid, fixed voxel ``x`` -> moving
file voxel ``x + u(x)``. The toolkits read a *displacement field transform* instead (the conventions are written once in
``README.md``, "Use the result in 3D Slicer, ANTs, SimpleITK, ITK"):

- **mapping**: a point ``p`` of the fixed image (the output grid when resampling) goes to ``T(p) = p + d(p)`` in the
  moving image (the resampling direction: ``sitk.Resample(moving, fixed, T)`` and ``antsApplyTransforms`` warp the
  moving image onto the fixed grid, as ``python -m custom warp`` does);
- **units and frame**: ``d`` in mm, in ITK's physical frame LPS (``d = L (A_m (x + u(x)) - A_f x)`` with
  ``L = diag(-1, -1, 1)`` and the NIfTI affines ``A``, which are RAS);
- **grid**: the fixed image's grid, spacing, origin and direction cosines (oblique ones too).

Containers: NIfTI (``.nii``/``.nii.gz``, written with nibabel: a 5-D ``(X, Y, Z, 1, 3)`` vector image, intent 1007,
the fixed image's header; what ANTs reads as a warp and ITK/SimpleITK/Slicer read as a displacement field), and with
SimpleITK installed (``pip install -e ".[itk]"``) ``.mha``, ``.nrrd`` (vector images) and ``.h5`` (an ITK transform
file).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.io import atomic_path, grid_record, load_nifti, save_displacement
from custom.validation import InputError

LPS = np.diag([-1.0, -1.0, 1.0])
NIFTI = (".nii", ".nii.gz")
SITK_ONLY = (".mha", ".nrrd", ".h5")
FORMS = ("itk", "ants", "learn2reg")
VECTOR_INTENT = 1007  # NIFTI_INTENT_VECTOR


def suffix(path: str | os.PathLike) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def learn2reg_to_world(u: np.ndarray, fixed_affine, moving_affine) -> np.ndarray:
    """``(X, Y, Z, 3)`` Learn2Reg voxels -> ``(X, Y, Z, 3)`` physical displacement in mm, LPS (fixed point -> moving
    point)."""
    import torch

    from custom.inverse import world_displacement

    ras = world_displacement(
        torch.as_tensor(np.moveaxis(np.asarray(u, np.float32), -1, 0)), fixed_affine, moving_affine
    )
    return np.moveaxis(ras.numpy(), 0, -1).astype(np.float64) @ LPS.T


def world_to_learn2reg(d: np.ndarray, fixed_affine, moving_affine) -> np.ndarray:
    """Inverse of :func:`learn2reg_to_world`: LPS mm on the fixed grid -> Learn2Reg voxels of the moving file."""
    fa, ma = np.asarray(fixed_affine, float), np.asarray(moving_affine, float)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in d.shape[:3]], indexing="ij"), -1)
    world = idx @ fa[:3, :3].T + fa[:3, 3] + d @ LPS.T
    return ((world - ma[:3, 3]) @ np.linalg.inv(ma[:3, :3]).T - idx).astype(np.float32)


def itk_geometry(affine) -> dict:
    """ITK ``origin``, ``spacing`` and ``direction`` (row-major 3x3) of a NIfTI (RAS) affine."""
    a = np.asarray(affine, float)
    lin = LPS @ a[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    return {
        "origin": (LPS @ a[:3, 3]).tolist(),
        "spacing": spacing.tolist(),
        "direction": (lin / spacing).ravel().tolist(),
    }


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(
            'writing .mha, .nrrd or .h5 transforms needs SimpleITK: pip install -e ".[itk]" (or write .nii.gz)'
        ) from None
    return sitk


def sitk_field(d: np.ndarray, affine):
    """A SimpleITK vector image (``sitkVectorFloat64``) of ``d`` ``(X, Y, Z, 3)`` LPS mm on the grid of ``affine``."""
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(d, (2, 1, 0, 3))).astype(np.float64), isVector=True)
    geo = itk_geometry(affine)
    img.SetOrigin(geo["origin"])
    img.SetSpacing(geo["spacing"])
    img.SetDirection(geo["direction"])
    return img


def save_world_field(d: np.ndarray, path: str | os.PathLike, fixed_affine, form: str = "itk") -> Path:
    """Write an LPS mm displacement ``(X, Y, Z, 3)`` on the fixed grid as a transform the toolkits read (atomic)."""
    ext = suffix(path)
    if form == "ants" and ext not in NIFTI:
        raise InputError(f"ANTs reads warps as NIfTI: give {path} a .nii.gz name (or use --to itk)")
    if ext in NIFTI:
        img = nib.Nifti1Image(d[:, :, :, None, :].astype(np.float32), np.asarray(fixed_affine, float))
        img.header.set_intent(VECTOR_INTENT)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
        return Path(path)
    if ext not in SITK_ONLY:
        raise InputError(f"{path}: unknown transform container; use .nii.gz, .mha, .nrrd or .h5")
    sitk = _sitk()
    field = sitk_field(d, fixed_affine)
    with atomic_path(path) as tmp:
        if ext == ".h5":
            sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp))
        else:
            sitk.WriteImage(field, str(tmp))
    return Path(path)


def read_field(path: str | os.PathLike) -> tuple[str, np.ndarray, np.ndarray, dict | None]:
    """``(form, array, affine, grid record)`` of a displacement file: ``"learn2reg"`` ``(X, Y, Z, 3)`` voxels, or
    ``"world"`` ``(X, Y, Z, 3)`` LPS mm (a 5-D NIfTI vector image or a SimpleITK-readable field/transform)."""
    ext = suffix(path)
    if ext in NIFTI:
        arr, affine = load_nifti(path)
        arr = np.asarray(arr, np.float64)
        if arr.ndim == 5 and arr.shape[3] == 1 and arr.shape[4] == 3:
            return "world", arr[:, :, :, 0, :], affine, None
        if arr.ndim == 4 and arr.shape[3] == 3:
            return "learn2reg", arr, affine, grid_record(path)
        raise InputError(f"{path} is neither a Learn2Reg displacement (X, Y, Z, 3) nor a vector field (X, Y, Z, 1, 3)")
    sitk = _sitk()
    try:
        if ext == ".h5":
            tx = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(path)))
            img = tx.GetDisplacementField()
        else:
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"cannot read the transform {path}: {e}") from e
    d = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0, 3)).astype(np.float64)
    lin = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = LPS @ lin, LPS @ np.array(img.GetOrigin())
    return "world", d, affine, None


def moving_grid(record: dict | None, moving: str | None, path) -> tuple[np.ndarray, tuple[int, ...]]:
    """The moving image's affine and shape: from ``--moving`` (checked against the file's record) or the record."""
    if moving is not None:
        _, affine = load_nifti(moving)
        shape = nib.load(str(moving)).shape[:3]
        if record and not (np.allclose(record["affine"], affine, atol=1e-3) and list(record["shape"]) == list(shape)):
            raise InputError(
                f"{path} was made for a moving image of shape {record['shape']} and affine "
                f"{np.round(record['affine'], 3).tolist()}, not {moving} ({list(shape)}); pass the moving image of "
                "that registration"
            )
        return np.asarray(affine, float), tuple(int(n) for n in shape)
    if record is None:
        raise InputError(
            f"{path} records no moving grid (a Learn2Reg file from elsewhere); pass --moving MOVING.nii.gz"
        )
    return np.asarray(record["affine"], float), tuple(int(n) for n in record["shape"])


def check_fixed(fixed: str | None, affine, shape, path) -> None:
    """``--fixed`` must be the image the displacement lies on (shape, affine within 1e-3 mm)."""
    if fixed is None:
        return
    _, fa = load_nifti(fixed)
    fs = nib.load(str(fixed)).shape[:3]
    if tuple(fs) != tuple(shape) or not np.allclose(fa, affine, atol=1e-3):
        raise InputError(
            f"{path} lies on a grid of shape {list(shape)} and affine {np.round(affine, 3).tolist()}; {fixed} has "
            f"{list(fs)} and {np.round(fa, 3).tolist()}. Pass the fixed image of that registration (--fixed)"
        )


def open_field(disp, out, fixed, moving, to: str, overwrite, verb: str) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """The checks ``convert`` and ``invert`` share, before any work: a known ``--to``, ``out`` not an input and not an
    existing file (unless ``overwrite``), then the field read (:func:`read_field`), finite, on ``--fixed``'s grid."""
    from custom.flags import as_bool
    from custom.io import check_not_input, check_overwrite
    from custom.validation import check_finite

    if to not in FORMS:
        raise InputError(f"--to must be one of {list(FORMS)}, got {to!r}")
    check_not_input(out, [disp, fixed, moving])
    check_overwrite([out], as_bool(overwrite, "overwrite"), verb)
    form, arr, affine, record = read_field(disp)
    check_finite(arr, str(disp))
    check_fixed(fixed, affine, arr.shape[:3], disp)
    return form, arr, affine, record


def convert(
    disp: str,
    out: str,
    fixed: str | None = None,
    moving: str | None = None,
    to: str = "itk",
    overwrite: bool = False,
) -> Path:
    """Convert a displacement between the Learn2Reg form and world-space transforms (ITK, 3D Slicer, ANTs).

    Args:
        disp: a Learn2Reg displacement (``disp_*.nii.gz``) or a world-space field written by this command / ITK.
        out: destination; its extension picks the container (``.nii.gz``; ``.mha``, ``.nrrd``, ``.h5`` with
            SimpleITK).
        fixed: the fixed image (checked against the displacement's grid; optional).
        moving: the moving image; needed where ``disp`` records no moving grid (Learn2Reg files from elsewhere) and
            for ``--to learn2reg`` from a world-space field.
        to: "itk" (also 3D Slicer), "ants" (NIfTI warp for ``antsApplyTransforms``) or "learn2reg".
        overwrite: replace an existing ``out`` (true/false).
    """
    form, arr, affine, record = open_field(disp, out, fixed, moving, to, overwrite, "convert")
    if form == "learn2reg":
        moving_affine, _ = moving_grid(record, moving, disp)
        if to == "learn2reg":
            raise InputError(f"{disp} is already in the Learn2Reg form")
        d = learn2reg_to_world(arr, affine, moving_affine)
        return save_world_field(d, out, affine, to)
    if to != "learn2reg":
        return save_world_field(arr, out, affine, to)
    if moving is None:
        raise InputError("--to learn2reg from a world-space field needs --moving (the voxels it indexes)")
    moving_affine, moving_shape = moving_grid(None, moving, disp)
    if suffix(out) not in NIFTI:
        raise InputError(f"the Learn2Reg form is a NIfTI file: give {out} a .nii.gz name")
    u = world_to_learn2reg(arr, affine, moving_affine)
    return save_displacement(np.moveaxis(u, -1, 0), out, affine, moving_affine, moving_shape)


def invert(
    disp: str,
    out: str,
    fixed: str | None = None,
    moving: str | None = None,
    to: str = "learn2reg",
    iterations: int = 50,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Invert a Learn2Reg displacement: the moving-to-fixed field, and its inverse-consistency error.

    Args:
        disp: a Learn2Reg displacement (fixed grid, indexing the moving file).
        out: destination. ``--to learn2reg`` (default): the Learn2Reg form of the reversed pair, on the moving grid,
            indexing the fixed file (``warp`` applies it to the fixed image or its labels); ``--to itk|ants``: the
            world-space transform of the reversed pair (moving point -> fixed point, LPS mm, on the moving grid).
        fixed, moving: the images of the registration (checked against the file; ``--moving`` is needed where the
            file records no moving grid).
        iterations: most fixed-point steps per voxel.
        device: "cpu" or "cuda" (default: CUDA where available); the same code runs on both.
        overwrite: replace an existing ``out`` (true/false).

    Prints the inverse-consistency error (mean and 95th percentile, mm, over voxels where det J > 0) and the share of
    voxels without an inverse (folds, dis-occlusion at the field of view, sliding gaps). Returns the report.
    """
    import torch

    from custom.inverse import format_report, invert_displacement

    if to == "learn2reg" and suffix(out) not in NIFTI:
        raise InputError(f"the Learn2Reg form is a NIfTI file: give {out} a .nii.gz name")
    form, arr, affine, record = open_field(disp, out, fixed, moving, to, overwrite, "invert")
    if form != "learn2reg":
        raise InputError(
            f"{disp} is a world-space field; invert its Learn2Reg form (python -m custom convert --to learn2reg)"
        )
    moving_affine, moving_shape = moving_grid(record, moving, disp)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    u = torch.as_tensor(np.moveaxis(arr, -1, 0).astype(np.float32), device=dev)
    inv, report = invert_displacement(u, affine, moving_affine, moving_shape, iterations=int(iterations))
    v = inv.cpu().numpy()
    if to == "learn2reg":
        save_displacement(v, out, moving_affine, affine, arr.shape[:3])
    else:
        save_world_field(learn2reg_to_world(np.moveaxis(v, 0, -1), moving_affine, affine), out, moving_affine, to)
    print(f"{format_report(report)}\ninverse: {out}")
    return {"inverse": str(out), **report}
