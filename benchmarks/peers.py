"""The peer registration methods of the benchmarks, each returning one displacement in SegReg's convention.

Every function takes the fixed and moving arrays ``(X, Y, Z)`` on one grid (intensities already scaled to about
0..1), the voxel spacing (mm) and optional fixed/moving masks (bool arrays, the data set's field-of-view or body mask),
and returns the displacement ``(3, X, Y, Z)`` float32 in voxels of that grid, in the Learn2Reg sense: the fixed voxel
``x`` corresponds to the moving point ``x + disp[:, x]``.

- :func:`convexadam`: ``convexadam`` (PyPI): MIND-SSC, coupled convex optimisation, Adam refinement; works in voxels.
- :func:`ants_syn`: ``antspyx`` SyN (``SyNOnly``: the pairs share one space, as they do for the other methods; no
  affine stage), mutual information, in mm.
- :func:`elastix_bspline`: ``itk-elastix`` B-spline (the default ``bspline`` parameter map: advanced Mattes mutual
  information + bending-energy penalty, 4 resolutions), in mm; the fixed mask only; one thread (two threads
  segfault in this build).

ANTs and elastix get images whose direction is the identity and whose origin is 0, so their physical displacement
divided by the spacing is the voxel displacement along the array axes (no RAS/LPS sign flips to undo).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

PEERS = ("convexadam", "ants_syn", "elastix_bspline")


def convexadam(fixed, moving, spacing, fixed_mask=None, moving_mask=None, grid_sp: int = 6, device: str = "cpu"):
    """ConvexAdam with its defaults, except ``grid_sp`` (lowered for thin volumes: 16 slices need 4 or less)."""
    import nibabel as nib
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    kwargs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if fixed_mask is not None:  # its mask API reads NIfTI files
            paths = []
            for name, mask in (("fixed", fixed_mask), ("moving", moving_mask)):
                m = np.ones(fixed.shape, np.uint8) if mask is None else mask.astype(np.uint8)
                paths.append(Path(tmp) / f"{name}_mask.nii.gz")
                nib.save(nib.Nifti1Image(m, np.eye(4)), paths[-1])
            kwargs = {"use_mask": True, "path_fixed_mask": paths[0], "path_moving_mask": paths[1]}
        disp = convex_adam_pt(
            np.asarray(fixed, np.float32),
            np.asarray(moving, np.float32),
            grid_sp=grid_sp,
            device=torch.device(device),
            **kwargs,
        )
    return np.ascontiguousarray(np.moveaxis(np.asarray(disp, np.float32), -1, 0))


def ants_syn(fixed, moving, spacing, fixed_mask=None, moving_mask=None, threads: int = 1, reg_iterations=None):
    """ANTs SyN (``SyNOnly``, antspyx defaults otherwise: mutual information, iterations (40, 20, 0), i.e. the last
    level at half resolution) on ``threads`` ITK threads (read when ``ants`` is first imported in the process);
    ``reg_iterations`` e.g. ``(100, 70, 50)`` runs every level, the finest at full resolution."""
    import os

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(threads))
    import ants

    def image(a):
        return ants.from_numpy(np.asarray(a, np.float32), origin=(0.0,) * 3, spacing=tuple(map(float, spacing)))

    kwargs = {}
    if fixed_mask is not None:
        kwargs["mask"] = image(fixed_mask)
    if moving_mask is not None:
        kwargs["moving_mask"] = image(moving_mask)
    with tempfile.TemporaryDirectory(prefix="segreg_ants_") as tmp:  # ANTs writes its transforms to files
        if reg_iterations is not None:
            kwargs["reg_iterations"] = tuple(int(i) for i in reg_iterations)
        reg = ants.registration(
            image(fixed), image(moving), type_of_transform="SyNOnly", outprefix=str(Path(tmp) / "syn_"), **kwargs
        )
        warps = [t for t in reg["fwdtransforms"] if t.endswith((".nii", ".nii.gz"))]
        for path in reg["fwdtransforms"]:  # SyNOnly also writes its (identity) initial affine: make sure it is one
            if path not in warps and not np.allclose(ants.read_transform(path).parameters, np.eye(3, 4).T.ravel()):
                raise RuntimeError(f"ANTs SyNOnly returned a non-identity affine {path}")
        if len(warps) != 1:
            raise RuntimeError(f"expected one SyN warp field, ANTs returned {reg['fwdtransforms']}")
        field = ants.image_read(warps[0]).numpy()  # (X, Y, Z, 3), mm along the array axes (identity direction)
    disp = np.moveaxis(field, -1, 0) / np.asarray(spacing, np.float32).reshape(3, 1, 1, 1)
    return np.ascontiguousarray(disp, np.float32)


def elastix_bspline(fixed, moving, spacing, fixed_mask=None, moving_mask=None):
    """elastix B-spline (the default ``bspline`` parameter map), one thread."""
    import itk

    def image(a, dtype=np.float32):
        # ITK arrays are (Z, Y, X): transpose so that ITK's index (i, j, k) is the array's [i, j, k]
        img = itk.image_from_array(np.ascontiguousarray(np.asarray(a, dtype).T))
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([0.0] * 3)
        return img

    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    params.SetParameter("MaximumNumberOfThreads", "1")
    f_img, m_img = image(fixed), image(moving)
    elastix = itk.ElastixRegistrationMethod.New(f_img, m_img)
    elastix.SetParameterObject(params)
    elastix.SetNumberOfThreads(1)
    elastix.SetLogToConsole(False)
    if fixed_mask is not None:
        elastix.SetFixedMask(image(fixed_mask, np.uint8))
    # the fixed mask only: with a moving mask too, samples of the fixed mask that map outside it stop the
    # registration ("too many samples map outside moving image buffer"); elastix's manual advises fixed masks
    elastix.UpdateLargestPossibleRegion()
    with tempfile.TemporaryDirectory() as tmp:  # transformix also writes the field as a file (cwd by default)
        transformix = itk.TransformixFilter.New(m_img)
        transformix.SetTransformParameterObject(elastix.GetTransformParameterObject())
        transformix.SetComputeDeformationField(True)
        transformix.SetLogToConsole(False)
        transformix.SetOutputDirectory(tmp)
        transformix.UpdateLargestPossibleRegion()
    field = np.asarray(itk.array_from_image(transformix.GetOutputDeformationField()))  # (Z, Y, X, 3), mm
    disp = np.moveaxis(field.transpose(2, 1, 0, 3), -1, 0) / np.asarray(spacing, np.float32).reshape(3, 1, 1, 1)
    return np.ascontiguousarray(disp, np.float32)


def run_peer(name: str, fixed, moving, spacing, fixed_mask=None, moving_mask=None, **kwargs) -> np.ndarray:
    """Dispatch to the peer ``name`` (one of :data:`PEERS`)."""
    funcs = {"convexadam": convexadam, "ants_syn": ants_syn, "elastix_bspline": elastix_bspline}
    if name not in funcs:
        raise ValueError(f"unknown peer {name!r}: one of {PEERS}")
    return funcs[name](fixed, moving, spacing, fixed_mask, moving_mask, **kwargs)
