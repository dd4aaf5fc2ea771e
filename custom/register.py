"""``python -m custom register`` / ``warp``: register any NIfTI pair; apply a displacement to images, labels, points.

Displacements are written in the Learn2Reg form on the fixed image's original grid and header (see
``custom.geometry``): ``map_coordinates(moving, identity + disp)`` gives the moving image on the fixed grid.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch

from custom.io import (
    check_not_input,
    check_overwrite,
    file_stem,
    learn2reg_disp_name,
    load_nifti,
    save_displacement,
    save_nifti,
)
from custom.validation import InputError


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


def extra_names(fixed: str, moving: str, disp: Path, transform: str | None, inverse: bool) -> dict:
    """Paths of the optional outputs beside ``disp``: the world-space transform (``<disp stem>_<itk|ants>.nii.gz``), the
    inverse (Learn2Reg form of the reversed pair) and its transform."""
    stem = disp.name[: -len(".nii.gz")]
    names = {}
    if transform:
        names["transform"] = disp.with_name(f"{stem}_{transform}.nii.gz")
    if inverse:
        inv = output_names(moving, fixed, disp.parent)["disp"]
        names["inverse"] = inv
        if transform:
            names["inverse_transform"] = inv.with_name(f"{inv.name[: -len('.nii.gz')]}_{transform}.nii.gz")
    return names


def write_extras(names: dict, disp: Path, transform: str | None) -> dict:
    """Write the outputs of :func:`extra_names` from the displacement file ``disp``; returns what was written."""
    from custom.interop import convert, invert

    written = {}
    if "transform" in names:
        written["transform"] = str(convert(str(disp), str(names["transform"]), to=transform, overwrite=True))
    if "inverse" in names:
        written["inverse"] = invert(str(disp), str(names["inverse"]), overwrite=True)["inverse"]
        if "inverse_transform" in names:
            written["inverse_transform"] = str(
                convert(written["inverse"], str(names["inverse_transform"]), to=transform, overwrite=True)
            )
    return written


def bundle_output_names(fixed: str, moving: str, out_dir: str | os.PathLike) -> dict:
    """What a bundle's ``RegistrationWriter`` (``naming="pair"``) writes for one pair into ``out_dir``."""
    out, pair = Path(out_dir), f"{file_stem(fixed)}__{file_stem(moving)}"
    return {
        "disp": out / "displacements" / f"{pair}.nii.gz",
        "image": out / "warped" / f"{pair}_image.nii.gz",
        "label": out / "warped" / f"{pair}_label.nii.gz",
        "table": out / "metrics.csv",
        "table_json": out / "metrics.json",
    }


def _require(path, what: str) -> str:
    if path is None or not Path(str(path)).is_file():
        raise FileNotFoundError(f"{what} {path} not found; give an existing NIfTI file (--{what.replace(' ', '_')})")
    return str(path)


def report_padding(data: dict, fixed: str, moving: str) -> torch.Tensor | None:
    """Where the loaded fixed image ``data["fixed_image"]`` holds padding outside its field of view
    (:func:`custom.field_of_view.find_padding`; a bool mask), else ``None``; one printed line says which it found,
    and a moving image with padding where the fixed one has none is named (SegReg uses the fixed field of view)."""
    from custom.field_of_view import find_padding

    for role, path in (("fixed", fixed), ("moving", moving)):
        image = data[f"{role}_image"]
        found = find_padding(image)
        if found is None:
            continue
        low, share = found
        line = (
            f"{role} image {path}: {share:.0%} of its voxels hold exactly its lowest value ({low:g}), padding outside "
            "the scanner's field of view"
        )
        if role == "fixed":
            print(f"{line}: regions mostly outside it are registered by their masks (--fov_value none: by the image)")
            return image == low
        print(
            f"{line}; only the fixed image's field of view is taken into account: register the truncated image as "
            "the fixed one (the Learn2Reg ThoraxCBCT direction; python -m custom invert gives the other direction)"
        )
    return None


def unwrap_input_errors(transform, data):
    """``transform(data)``, re-raising the :class:`InputError` inside MONAI's "applying transform" wrapper, so the
    command line reports the file and the fix rather than a traceback."""
    from custom.validation import root_cause

    try:
        return transform(data)
    except RuntimeError as e:
        cause = root_cause(e)
        if isinstance(cause, InputError):
            raise cause from None
        raise


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
    fov_value: float | str | None = None,
    sigma: float | None = None,
    noise_gate: float | None = 2.0,
    in_plane: bool | str = "auto",
    grid_spacing: int = 2,
    mask_only_levels: int | None = None,
    mask_fov: bool | str = "auto",
    sigma_mm: float | None = None,
    sample_stride: int = 1,
) -> dict:
    """Training-free SegReg of one pair (MIND-SSC + Dice + L2 within regions) in the fixed image's physical space.

    Returns ``{"disp": (3, *S_fixed) Learn2Reg-form displacement on the original fixed grid, "fixed_affine",
    "moving_affine", "moving_shape", "frozen_components"}``. Without label maps the whole image is one region (plain
    iterative registration). The files go through the validation layer first (``custom.validation``: readable, 3-D,
    plausible spacing, finite images and integer label maps, counted on the stored values and naming the file).
    Intensities are then scaled to 0..1 between the 0.5 and 99.5 percentiles of each image, or within
    ``intensity_range`` (e.g. ``(-1000, 1000)`` HU for CT/CBCT); ``fov_value`` (on that 0..1 scale) marks the fixed
    image's padding outside the scanner's field of view (see ``IterativeSegReg``; "auto": the fixed image's lowest
    value where it is padding, :func:`report_padding`, said in one printed line; ``None``: none); ``noise_gate`` leaves
    out of the similarity the voxels where the fixed image is flat up to its noise (see ``MINDSSCLoss``; ``None``:
    plain MIND-SSC). ``in_plane`` ("auto", True, False): hold the slice axis' displacement at 0, decided on the
    registration grid (:func:`custom.geometry.in_plane_components`; "auto" says so in one printed line).
    ``sigma`` / ``sigma_mm``: Gaussian smoothing of the composition weights in voxels or in mm (give one).
    ``grid_spacing``: control points every this many voxels of each level; ``mask_only_levels``: the levels at which
    regions outside the field of view are optimised; ``mask_fov``: whether the mask loss counts inside the field of
    view only ("auto": when the fixed labels end at it; see ``IterativeSegReg``); ``sample_stride``: score the large
    regions on every this-many-th voxel per axis at each step (the lattice shifting from step to step; 1: every
    voxel; see ``IterativeSegReg``).
    """
    from monai.losses import DiceLoss
    from monai.transforms import Compose, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    from custom.geometry import displacement_to_grid, in_plane_components, original_geometry, voxel_spacing
    from custom.iterative import IterativeSegReg
    from custom.losses import RegionDiffusionLoss, SegRegLoss
    from custom.mind import MINDSSCLoss
    from custom.transforms import AlignPaird
    from custom.validation import SafeLoadImaged, ValidatePaird

    paths = {"fixed_image": _require(fixed, "fixed"), "moving_image": _require(moving, "moving")}
    if (fixed_label is None) != (moving_label is None):
        raise InputError("give both --fixed_label and --moving_label, or neither (one region: the whole image)")
    if fixed_label is not None:
        paths["fixed_label"] = _require(fixed_label, "fixed label")
        paths["moving_label"] = _require(moving_label, "moving label")
    keys = list(paths)
    loaded = unwrap_input_errors(
        Compose([SafeLoadImaged(keys, ensure_channel_first=True, image_only=True), ValidatePaird(), AlignPaird()]),
        paths,
    )
    padding = report_padding(loaded, fixed, moving) if fov_value == "auto" else None
    scale = (
        ScaleIntensityRangePercentilesd(["fixed_image", "moving_image"], 0.5, 99.5, 0.0, 1.0, clip=True)
        if intensity_range is None
        else ScaleIntensityRanged(["fixed_image", "moving_image"], *intensity_range, 0.0, 1.0, clip=True)
    )
    data = unwrap_input_errors(scale, loaded)
    if fov_value == "auto":  # the padding's value on the 0..1 scale: the field of view is above it
        fov_value = None if padding is None else float(data["fixed_image"][padding].max())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fixed_t, moving_t = (data[k][None].to(dev) for k in ("fixed_image", "moving_image"))
    if fixed_label is None:
        fl = ml = torch.ones_like(fixed_t)
    else:
        fl, ml = (data[k][None].to(dev) for k in ("fixed_label", "moving_label"))
    reg_affine, fixed_affine, fixed_shape = original_geometry(data["fixed_image"])
    _, moving_affine, moving_shape = original_geometry(data["moving_image"])
    spacing = voxel_spacing(reg_affine).tolist()
    frozen, message = in_plane_components(in_plane, spacing, fixed)
    if message:
        print(message)
    frozen = tuple(sorted(set(frozen) | {int(c) for c in (frozen_components or ())}))
    w = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    w.update(weights or {})
    loss = SegRegLoss(MINDSSCLoss(noise_gate=noise_gate), DiceLoss(include_background=True), RegionDiffusionLoss(), w)
    reg = IterativeSegReg(
        loss=loss,
        levels=tuple(levels),
        iterations=tuple(iterations),
        level_spacing_mm=None if level_spacing_mm is None else tuple(level_spacing_mm),
        global_region=global_region,
        frozen_components=frozen,
        progress=progress,
        reg_domain=reg_domain,
        fov_value=fov_value,
        sigma=sigma,
        sigma_mm=sigma_mm,
        grid_spacing=grid_spacing,
        mask_only_levels=mask_only_levels,
        mask_fov=mask_fov,
        sample_stride=sample_stride,
        num_threads=4,  # small crops: more CPU threads add CPU time, not speed
    )
    with torch.enable_grad():
        out = reg(fixed_t, moving_t, fl, ml, spacing=spacing)
    disp = displacement_to_grid(out["ddf"][0].detach().cpu(), reg_affine, fixed_affine, fixed_shape, moving_affine)
    return {
        "disp": disp,
        "fixed_affine": fixed_affine,
        "moving_affine": moving_affine,
        "moving_shape": moving_shape,
        "frozen_components": frozen,
    }


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
    in_plane: bool | str = "auto",
    reg_domain: str | int = "box",
    sigma: float | None = None,
    noise_gate: float | None = 2.0,
    overwrite: bool = False,
    sigma_mm: float | None = None,
    progress: bool = True,
    transform: str | None = None,
    inverse: bool = False,
    sample_stride: int = 1,
    fov_value: float | str | None = "auto",
) -> dict:
    """Register a moving NIfTI image onto a fixed one (any orientation, spacing or origin).

    Args:
        fixed, moving: the images.
        fixed_label, moving_label: optional label maps (same grids as their images); SegReg registers every label
            present in both, separately, and composes the fields. Without them the whole image is one region.
        out_dir: destination: the displacement (Learn2Reg form, fixed grid and header) and, with ``save_warped``,
            the moving image (linear) and label map (nearest) warped onto the fixed grid.
        mode: "iterative" (training-free), "global" (one region, same optimiser) or "bundle" (a bundle's
            ``inference.json`` on this pair with the bundle's own settings, e.g. the thorax bundle's iterative solver:
            ``bundle``, ``variant``, ``ckpt_path``, which the other modes refuse; it refuses the solver options below,
            which its config sets).
        save_warped: also write the warped moving image and label map (true/false).
        levels, iterations: multi-resolution schedule of the iterative modes.
        level_spacing_mm: the levels as voxel sizes in mm instead of factors, e.g. ``16,8`` (the thorax bundle's):
            large 1 mm CT volumes then register at 16 and 8 mm in minutes.
        in_plane: "auto" (default): on thick-slice data (one axis' spacing at least 2.5 times the others', e.g. cine
            MR 1.8 x 1.8 x 10 mm) the through-plane displacement is held at 0, which the thin slices cannot resolve,
            and one printed line says so; true: always (refused where no axis is thick); false: never.
        reg_domain: where each region's field is regularised: "box" (its crop; default), "region" (inside its fixed
            mask only, as the paper), "auto" (the mask, grown by 2 voxels where it is thin at a level) or a dilation in
            voxels (see ``custom.iterative.IterativeSegReg``).
        sigma: Gaussian smoothing (voxels) of the composition weights, e.g. 2: fewer folds at region borders.
        sigma_mm: the same smoothing in mm (``sigma_mm / spacing`` voxels per axis), as the thorax bundle's
            ``composition_sigma_mm``: one width on 1 mm CT and thick-slice MR. Give ``sigma`` or ``sigma_mm``.
        noise_gate: the similarity ignores voxels where the fixed image is flat up to this multiple of its noise (air
            around an MR body: without it the field there drifts by about a voxel); ``none`` for plain MIND-SSC.
        overwrite: replace existing outputs (true/false; default false: existing outputs stop the run before any
            work).
        progress: show progress bars (true/false).
        transform: also write the result as a world-space transform for other toolkits: "itk" (ITK, SimpleITK,
            3D Slicer) or "ants" (``antsApplyTransforms``), ``<displacement stem>_<itk|ants>.nii.gz`` (see
            ``custom.interop``).
        inverse: also write the inverse (moving -> fixed; the Learn2Reg form of the reversed pair, and its
            ``--transform`` form) and print its inverse-consistency error (``custom.inverse``).
        sample_stride: the iterative modes score large regions on every this-many-th voxel per axis at each step,
            the lattice shifting from step to step (1: every voxel, default; the thorax bundle uses 2: about 30 %
            less CPU time per pair at the same errors on CBCT-like data, see ``custom.iterative.IterativeSegReg``).
        fov_value: the fixed image's padding outside the scanner's field of view (a CBCT's cylinder): "auto"
            (default) where at least 2 % of its voxels hold exactly its lowest value (one printed line says so), a
            value on the 0..1 intensity scale, or none. With it, a region whose fixed mask lies mostly outside the field
            of view (on a CBCT pair the background, with the air) is registered by its masks alone, and where the fixed
            labels end at the field of view the mask loss counts inside it only (``IterativeSegReg``'s ``fov_value``
            and ``mask_fov``, as in the thorax bundle). One global region (``--mode global``) is not changed by it.

    Boolean options take true/false, yes/no, on/off or 1/0 in any case (``custom.flags``).
    """
    from custom.flags import as_bool, auto_or_bool, optional, optional_float
    from custom.validation import check_output_dir

    save_warped, overwrite = as_bool(save_warped, "save_warped"), as_bool(overwrite, "overwrite")
    progress, in_plane = as_bool(progress, "progress"), auto_or_bool(in_plane, "in_plane")
    inverse, transform = as_bool(inverse, "inverse"), optional(transform)
    if transform not in (None, "itk", "ants"):
        raise InputError(f"--transform must be itk, ants or none, got {transform!r}")
    sigma, noise_gate = optional_float(sigma, "sigma"), optional_float(noise_gate, "noise_gate")
    sigma_mm = optional_float(sigma_mm, "sigma_mm")
    sample_stride = _stride(sample_stride)
    fov_value = _fov_value(fov_value)
    if sigma is not None and sigma_mm is not None:
        raise InputError("give --sigma (voxels) or --sigma_mm (mm), not both")
    if mode not in ("iterative", "global", "bundle"):
        raise InputError(f"--mode must be 'iterative', 'global' or 'bundle', got {mode!r}")
    solver = dict(levels=levels, iterations=iterations, level_spacing_mm=level_spacing_mm, reg_domain=reg_domain)
    solver.update(
        sigma=sigma, sigma_mm=sigma_mm, noise_gate=noise_gate, sample_stride=sample_stride, fov_value=fov_value
    )
    _refuse_unused_options(mode, dict(bundle=bundle, variant=variant, ckpt_path=ckpt_path), solver)
    check_output_dir(out_dir)  # before any work
    if mode == "bundle":
        names = bundle_output_names(fixed, moving, out_dir)
        extras = extra_names(fixed, moving, names["disp"], transform, inverse)
        planned = [names["disp"], names["table"], names["table_json"], *extras.values()]
        check_overwrite(planned, overwrite, "register --mode bundle")
        written = register_with_bundle(
            fixed, moving, fixed_label, moving_label, out_dir, bundle, variant, ckpt_path, save_warped, overwrite,
            in_plane, progress,
        )  # fmt: skip
        written.update(write_extras(extras, names["disp"], transform))
        return written
    names = output_names(fixed, moving, out_dir)
    extras = extra_names(fixed, moving, names["disp"], transform, inverse)
    planned = [names["disp"]] + ([names["image"]] + ([names["label"]] if moving_label else []) if save_warped else [])
    planned += list(extras.values())
    for out in planned:
        check_not_input(out, [fixed, moving, fixed_label, moving_label])
    check_overwrite(planned, overwrite, f"register --mode {mode}")
    res = iterative_registration(
        fixed,
        moving,
        fixed_label,
        moving_label,
        levels=_ints(levels, "levels"),
        iterations=_ints(iterations, "iterations"),
        level_spacing_mm=None if level_spacing_mm is None else _floats(level_spacing_mm, "level_spacing_mm"),
        global_region=mode == "global",
        progress=progress,
        reg_domain=reg_domain,
        sigma=sigma,
        sigma_mm=sigma_mm,
        noise_gate=noise_gate,
        in_plane=in_plane,
        sample_stride=sample_stride,
        fov_value=fov_value,
    )
    save_displacement(
        res["disp"].numpy(), names["disp"], res["fixed_affine"], res["moving_affine"], res["moving_shape"]
    )
    written = {"displacement": str(names["disp"])}
    if save_warped:
        written["warped_image"] = str(warp(moving, str(names["disp"]), str(names["image"]), "image", overwrite=True))
        if moving_label is not None:
            written["warped_label"] = str(
                warp(moving_label, str(names["disp"]), str(names["label"]), "label", overwrite=True)
            )
    written.update(write_extras(extras, names["disp"], transform))
    for k, v in written.items():
        print(f"{k}: {v}")
    return written


def register_with_bundle(
    fixed,
    moving,
    fixed_label,
    moving_label,
    out_dir,
    bundle,
    variant=None,
    ckpt_path=None,
    save_warped: bool = True,
    overwrite: bool = False,
    in_plane: bool | str = "auto",
    progress: bool = True,
):
    """Run a bundle's ``configs/inference.json`` on one pair; its writer puts the files in ``out_dir``.

    ``progress=False`` sets the bundle's ``progress`` id, which turns off the solver's bar and the ignite
    ``ProgressBar``; a bundle without that id gets its ``handlers`` without the ``ProgressBar``.

    A bundle with an ``in_plane`` config id (the iterative ``segreg_thorax``) gets ``in_plane``; a trained bundle
    keeps the field components it was trained with (``frozen_components``, e.g. ``segreg_acdc``'s in-plane field),
    so an explicit ``in_plane`` that disagrees with it is refused.
    """
    from monai.bundle import ConfigParser, ConfigWorkflow

    if bundle is None or not (Path(bundle) / "configs" / "inference.json").is_file():
        raise InputError(f"--bundle {bundle} is not a bundle folder with configs/inference.json")
    if fixed_label is None or moving_label is None:
        raise InputError("a SegReg bundle needs --fixed_label and --moving_label")
    record = {
        "fixed_image": _require(fixed, "fixed"),
        "moving_image": _require(moving, "moving"),
        "fixed_label": _require(fixed_label, "fixed label"),
        "moving_label": _require(moving_label, "moving label"),
    }
    config = str(Path(bundle) / "configs" / "inference.json")
    override = {"bundle_root": str(bundle), "datalist": [record], "output_dir": str(out_dir), "writer#naming": "pair"}
    override.update(num_workers=0, save_warped=save_warped, overwrite=overwrite)
    if variant:
        override["variant"] = variant
    if ckpt_path:
        override["ckpt_path"] = ckpt_path
    parser = ConfigParser()
    parser.read_config(config)
    if not progress:
        if "progress" in parser:  # our bundles: the solver's bar and ignite's ProgressBar (disabled by show_progress)
            override["progress"] = False
        elif "handlers" in parser:  # a bundle without the id: leave its ProgressBar out
            override["handlers"] = [h for h in parser["handlers"] if not _is_progress_bar(h)]
    if "in_plane" in parser:
        override["in_plane"] = in_plane
    elif in_plane != "auto":
        frozen = parser.get("frozen_components", [])
        if bool(frozen) != bool(in_plane):
            raise InputError(
                f"--in_plane {in_plane}: bundle {bundle} was trained with frozen_components {frozen} and keeps them; "
                "drop --in_plane, or use --mode iterative"
            )
    wf = ConfigWorkflow(config_file=config, workflow_type="infer", **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return {"output_dir": str(out_dir)}


def _is_progress_bar(handler) -> bool:
    """Whether a bundle config's handler entry builds an ignite ``ProgressBar``."""
    return isinstance(handler, dict) and str(handler.get("_target_", "")).endswith("ProgressBar")


def _refuse_unused_options(mode: str, bundle_options: dict, solver_options: dict) -> None:
    """Options the mode would ignore stop the run: ``bundle_options`` (``--bundle`` and co.) set outside ``--mode
    bundle``; in it, the iterative modes' ``solver_options`` that differ from :func:`register`'s defaults (the
    bundle's config sets its solver)."""
    chosen = [f"--{k}" for k, v in bundle_options.items() if v is not None]
    if mode != "bundle" and chosen:
        verb = "applies" if len(chosen) == 1 else "apply"
        raise InputError(
            f"{', '.join(chosen)} {verb} to --mode bundle only (--mode bundle --bundle bundles/segreg_thorax runs that "
            f"bundle's own settings on the pair); --mode {mode} takes its settings from --levels or "
            "--level_spacing_mm, --iterations, --reg_domain, --sigma_mm and --sample_stride"
        )
    if mode != "bundle":
        return
    default = {k: p.default for k, p in inspect.signature(register).parameters.items()}

    def value(k, v):  # schedules compare as parsed: "4,2,1" and (4, 2, 1) are the default
        return _ints(v, k) if k in ("levels", "iterations") else v

    ignored = [f"--{k}" for k, v in solver_options.items() if value(k, v) != value(k, default[k])]
    if ignored:
        raise InputError(
            f"{', '.join(ignored)} set the iterative modes; --mode bundle runs the bundle's own settings (change "
            "them in its configs/inference.json, or on `python -m monai.bundle run`, e.g. --sample_stride 1)"
        )


def _ints(values, name: str) -> tuple[int, ...]:
    try:
        values = [values] if isinstance(values, (int, str)) else list(values)
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"--{name} takes whole numbers, e.g. --{name} '[4,2,1]'; got {values!r}") from None


def _stride(value) -> int:
    try:
        stride = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        stride = -1
    if stride < 1 or str(stride) != str(value).strip():
        raise InputError(f"--sample_stride takes one whole number >= 1 (1: every voxel), got {value!r}")
    return stride


def _fov_value(value) -> float | str | None:
    from custom.flags import optional_float

    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return optional_float(value, "fov_value")
    except InputError:
        raise InputError(
            f"--fov_value takes auto, none or a number on the 0..1 intensity scale (e.g. 0), got {value!r}"
        ) from None


def _floats(values, name: str) -> tuple[float, ...]:
    try:
        values = [values] if isinstance(values, (int, float, str)) else list(values)
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"--{name} takes numbers, e.g. --{name} '[16,8]'; got {values!r}") from None
    if not out or min(out) <= 0:
        raise InputError(f"--{name} takes positive numbers, e.g. --{name} '[16,8]'; got {values!r}")
    return out


def check_grid(disp_path: str, disp_shape, disp_affine, image_path: str, image_shape, image_affine) -> None:
    """Refuse to apply a displacement to an image it was not made for: the grid recorded in the displacement file
    (``custom.io.grid_record``), else the displacement's own grid (Learn2Reg: both images share one), must be the
    image's (shape, and affine within 1e-3 mm)."""
    from custom.geometry import same_grid
    from custom.io import grid_record

    record = grid_record(disp_path)
    shape, affine = (record["shape"], np.asarray(record["affine"])) if record else (disp_shape, disp_affine)
    if not same_grid(affine, shape, image_affine, image_shape):
        whose = "the moving image it was made for" if record else "its own grid (no grid record: Learn2Reg form)"
        raise InputError(
            f"{disp_path} indexes {whose}, shape {list(shape)}, affine {np.round(affine, 3).tolist()}; {image_path} "
            f"has shape {list(image_shape)}, affine {np.round(image_affine, 3).tolist()}. Apply it to the moving "
            "image (or its label map) of the registration that wrote it, or register this image again."
        )


def warp(
    image: str, disp: str, out: str, kind: str = "image", overwrite: bool = False, direction: str = "fixed_to_moving"
) -> Path:
    """Apply a Learn2Reg-form displacement to an image (linear), a label map (nearest) or a keypoint CSV.

    Args:
        image: the moving image / label map (NIfTI), or a keypoint CSV (``x,y,z`` voxel coordinates of the *fixed*
            image per row) for ``kind="points"``: each point is moved to its moving-image voxel coordinate.
        disp: displacement file ``(X, Y, Z, 3)`` on the fixed grid (its header is the output's).
        out: output path (NIfTI, or CSV for points); written atomically. Never one of the inputs.
        kind: "image", "label" or "points".
        overwrite: replace an existing ``out`` (true/false; default false).
        direction: for points: "fixed_to_moving" (default: fixed-image voxel coordinates in, moving-image ones out)
            or "moving_to_fixed" (moving-image points go to the fixed image through the inverse of ``disp``,
            computed at the points by ``custom.inverse.invert_points``; needs the moving grid the file records).

    Every input is validated first (``custom.validation``): a finite 3-D displacement with plausible spacing; a
    finite image or an integer label map on the grid the displacement indexes (the moving grid recorded in files
    SegReg writes, else the displacement's own grid); finite ``(N, 3)`` points.
    """
    from custom.flags import as_bool
    from custom.geometry import warp_volume
    from custom.io import atomic_path
    from custom.metrics import sample_field
    from custom.validation import check_dims, check_finite, check_spacing, check_volume

    if kind not in ("image", "label", "points"):
        raise InputError(f"--kind must be 'image', 'label' or 'points', got {kind!r}")
    check_not_input(out, [image, disp])
    check_overwrite([out], as_bool(overwrite, "overwrite"), "warp")
    arr, affine = load_nifti(_require(disp, "disp"))
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"{disp} is not a displacement field (X, Y, Z, 3); its shape is {arr.shape}")
    check_dims(np.asarray(arr[None, ..., 0]), str(disp))
    check_spacing(affine, str(disp))
    check_finite(np.asarray(arr, np.float32), str(disp))
    field = torch.as_tensor(np.moveaxis(np.asarray(arr, np.float32), -1, 0))
    if kind == "points":
        from custom.datasets.learn2reg import read_keypoints

        pts = np.asarray(read_keypoints(_require(image, "points")), dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
            raise InputError(f"{image} must hold finite x,y,z voxel coordinates, one point per row; got {pts.shape}")
        pts = torch.as_tensor(pts)
        if direction == "moving_to_fixed":
            from custom.inverse import invert_points
            from custom.io import grid_record

            record = grid_record(disp)
            if record is None:
                raise InputError(
                    f"{disp} records no moving grid; invert it first (python -m custom invert DISP INV --moving "
                    "MOVING) and warp the points with the inverse"
                )
            moved = invert_points(field, affine, np.asarray(record["affine"]), pts)[0].float()
        elif direction == "fixed_to_moving":
            moved = pts + sample_field(field[None], pts)
        else:
            raise InputError(f"--direction must be fixed_to_moving or moving_to_fixed, got {direction!r}")
        with atomic_path(out) as tmp:
            np.savetxt(tmp, moved.numpy(), delimiter=",", fmt="%.4f")
        return Path(out)
    volume, image_affine = load_nifti(_require(image, "image"))
    check_volume(volume, image_affine, str(image), label=kind == "label")
    check_grid(str(disp), arr.shape[:3], affine, str(image), volume.shape, image_affine)
    volume = torch.as_tensor(np.asarray(volume, np.float32))
    warped = warp_volume(volume, field, "bilinear" if kind == "image" else "nearest").numpy()
    return save_nifti(warped, out, affine, dtype=np.float32 if kind == "image" else np.int16)
