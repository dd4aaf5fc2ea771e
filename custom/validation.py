"""One validation layer for every entry point (bundle transforms, ``python -m custom``, the Python API).

Bad input gets an :class:`InputError` (a ``ValueError``) that names the file or config id and the fix: non-finite
images, non-integer label maps, wrong dimensionality, implausible spacing, unreadable files, dataset entries missing a
key, config values of the wrong type, output folders that cannot be written. :func:`install_error_summary` makes a
bundle run end its traceback with one line that states the root cause.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from custom.geometry import voxel_spacing
from custom.regions import source_name


class InputError(ValueError):
    """Bad input, with the file or option it concerns and what to do about it."""


def check_finite(x, name: str) -> None:
    """Refuse NaN / Inf values, naming ``name`` and the counts."""
    t = torch.as_tensor(x)
    if not torch.is_floating_point(t) or bool(torch.isfinite(t).all()):  # one pass; counted only to report them
        return
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if n_nan or n_inf:
        raise InputError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values (of {t.numel()}); clean or re-export it "
            "(e.g. replace them with the background intensity) before registration."
        )


def check_integer_labels(x, name: str) -> None:
    """Refuse label maps with non-integer values (e.g. a resampled label map interpolated linearly)."""
    t = torch.as_tensor(x)
    check_finite(t, name)
    if torch.is_floating_point(t):
        off = (t - t.round()).abs() > 1e-3
        if off.any():
            example = float(t[off].flatten()[0])
            raise InputError(
                f"label map {name} has {int(off.sum())} non-integer values (e.g. {example:g}); label maps must hold "
                "integer ids. Resample label maps with nearest-neighbour interpolation."
            )


def check_dims(x, name: str, spatial_dims: int = 3) -> None:
    """Refuse arrays that are not channel-first ``(C, *S)`` with ``spatial_dims`` spatial axes."""
    shape = tuple(torch.as_tensor(x).shape)
    if len(shape) != spatial_dims + 1:
        raise InputError(
            f"{name} has shape {shape[1:] if len(shape) > 1 else shape}, i.e. {len(shape) - 1} spatial dimensions; "
            f"SegReg registers {spatial_dims}-D volumes (one channel). Split 4-D series into 3-D frames first."
        )
    if shape[0] != 1:  # LoadImaged(ensure_channel_first) reads the 4th axis of a NIfTI file as channels
        raise InputError(
            f"{name} has shape {shape[1:] + shape[:1]}, i.e. {len(shape)} spatial dimensions (or {shape[0]} "
            f"channels); SegReg registers {spatial_dims}-D volumes (one channel). Split 4-D series into 3-D frames "
            "first."
        )
    if min(shape[1:]) < 2:
        raise InputError(f"{name} has shape {shape[1:]}: every spatial axis needs at least 2 voxels.")


def check_spacing(x, name: str, spacing_range: Sequence[float] = (1e-2, 100.0)) -> None:
    """Refuse voxel sizes outside ``spacing_range`` (mm); a wrong header unit would otherwise exhaust memory.
    ``x``: a ``MetaTensor`` (its affine is checked; nothing to check without one) or a 4x4 affine."""
    affine = getattr(x, "affine", None) if not isinstance(x, np.ndarray) else x
    if affine is None:
        return
    spacing = voxel_spacing(affine)
    lo, hi = spacing_range
    if not np.all(np.isfinite(spacing)) or spacing.min() < lo or spacing.max() > hi:
        raise InputError(
            f"{name} has voxel spacing {np.round(spacing, 4).tolist()} mm, outside [{lo}, {hi}] mm; check the header "
            "(units, pixdim) and fix it before registration."
        )


def check_volume(array, affine, name: str, label: bool = False, spatial_dims: int = 3) -> None:
    """The checks of :class:`ValidatePaird` on one array as stored (``(*S)``, no channel) with its 4x4 ``affine``:
    dimensionality, spacing, then finite values (images) or integer ids (label maps)."""
    check_dims(np.asarray(array)[None], name, spatial_dims)
    check_spacing(np.asarray(affine, dtype=float), name)
    (check_integer_labels if label else check_finite)(np.asarray(array), name)


class SafeLoadImaged(LoadImaged):
    """MONAI ``LoadImaged`` whose failures name the file: an unreadable, truncated or missing file raises
    :class:`InputError` ``cannot read <file>: <reason>``. Arguments as ``LoadImaged``."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:  # readers raise many types
            bad = [str(data[k]) for k in self.keys if k in data and not _readable(data[k])]
            names = ", ".join(bad) or ", ".join(str(data[k]) for k in self.keys if k in data)
            raise InputError(
                f"cannot read {names}: {type(e).__name__}: {e}. Check that it is a valid NIfTI file."
            ) from e


def _readable(path) -> bool:
    """Whether nibabel reads ``path`` completely (used only to name the culprit after a load failed)."""
    try:
        import nibabel as nib

        nib.load(str(path)).get_fdata()
        return True
    except Exception:
        return False


class ValidatePaird(MapTransform):
    """Check a loaded pair before anything else touches it: finite images, integer label maps, 3-D (or ``spatial_dims``)
    channel-first arrays, plausible spacing. Each failure names the file (:class:`InputError`).

    Args:
        image_keys: image keys (finite, dims, spacing).
        label_keys: label-map keys (also integer-valued).
        spatial_dims: expected number of spatial axes.
        spacing_range: allowed voxel size per axis, mm.
    """

    def __init__(
        self,
        image_keys: KeysCollection = ("fixed_image", "moving_image"),
        label_keys: KeysCollection = ("fixed_label", "moving_label", "fixed_gt", "moving_gt"),
        spatial_dims: int = 3,
        spacing_range: Sequence[float] = (1e-2, 100.0),
    ) -> None:
        self.image_keys, self.label_keys = list(_tuple(image_keys)), list(_tuple(label_keys))
        super().__init__(self.image_keys + self.label_keys, allow_missing_keys=True)
        self.spatial_dims, self.spacing_range = int(spatial_dims), tuple(spacing_range)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            name = source_name(d[k], str(k))
            check_dims(d[k], name, self.spatial_dims)
            check_spacing(d[k], name, self.spacing_range)
            if k in self.label_keys:
                check_integer_labels(d[k], name)
            else:
                check_finite(d[k], name)
        return d


def _tuple(keys) -> tuple:
    return (keys,) if isinstance(keys, str) else tuple(keys)


def require_types(values: Mapping[str, object], types: Mapping[str, type | tuple]) -> None:
    """Refuse config values of the wrong type, naming the id, the value and the expected type."""
    for key, expected in types.items():
        value = values.get(key)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, float, (int, float)))
        if not ok:
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise InputError(
                f"config id '{key}' must be {names}, got {value!r} ({type(value).__name__}); e.g. --{key} 10"
            )


def require_positive(values: Mapping[str, object]) -> None:
    """Refuse config values below 1, naming the id."""
    for key, value in values.items():
        if value < 1:
            raise InputError(f"config id '{key}' must be at least 1, got {value!r}")


def check_output_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Create ``path`` if needed and check that files can be written there, before any work is done.

    ``create=False`` leaves the file system as it is (a check before a run that may still be refused): the nearest
    existing folder on the way to ``path`` must be a folder this process may write to.
    """
    path = Path(path)
    if not create:
        existing = next(p for p in [path, *path.absolute().parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(
                f"cannot write to the output folder {path}: {existing} is not a writable folder; choose another "
                "--output_dir"
            )
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".segreg-write-test-"):
            pass
    except OSError as e:
        raise InputError(
            f"cannot write to the output folder {path}: {e.strerror or e}; choose another --output_dir"
        ) from e
    return path


def root_cause(err: BaseException) -> BaseException:
    """The innermost :class:`InputError` of an exception chain, else the innermost exception. An error raised
    ``from None`` ends the chain: it replaced what it hides (e.g. a message listing more accepted values)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    for e in reversed(chain):
        if isinstance(e, InputError):
            return e
    return chain[-1]


def install_error_summary() -> None:
    """End uncaught tracebacks with one line stating the root cause (MONAI wraps errors in several layers)."""
    if getattr(sys.excepthook, "_segreg", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        cause = root_cause(exc)
        if cause is not exc:
            print(f"SegReg error: {type(cause).__name__}: {cause}", file=sys.stderr)

    hook._segreg = True
    sys.excepthook = hook


def warn_if_no_validation(epochs: int, val_interval: int) -> None:
    """Warn when training will never validate (so no best checkpoint is saved)."""
    if val_interval > epochs:
        import warnings

        warnings.warn(
            f"val_interval ({val_interval}) > epochs ({epochs}): no validation runs, so no checkpoint is saved; "
            "set --val_interval to at most --epochs.",
            stacklevel=2,
        )
