"""File I/O with atomic writes: NIfTI volumes, Learn2Reg displacement files, JSON and CSV tables."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

TEMP_TAG = ".segreg-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temporary files this tool left in ``folder`` (for ``name`` only, if given) whose writer process is gone
    (e.g. after a SIGKILL); returns what was removed."""
    removed = []
    pattern = f".{name}{TEMP_TAG}*" if name else f".*{TEMP_TAG}*"
    for p in Path(folder).glob(pattern):
        try:
            pid = int(p.name.split(TEMP_TAG, 1)[1].split("-", 1)[0])
            os.kill(pid, 0)  # still running: leave it
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p)
        except (ValueError, IndexError, PermissionError, OSError):
            continue
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the usual permissions (0666 less the umask, like ``open``), and temporary files that an earlier,
    killed run left for the same name are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_TAG}{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def spacing_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Diagonal 4x4 affine for voxel ``spacing`` (mm)."""
    aff = np.diag([float(s) for s in spacing] + [1.0])
    aff[:3, 3] = origin
    return aff


def check_overwrite(paths, overwrite: bool, what: str = "outputs") -> list[Path]:
    """Refuse (``FileExistsError``, before any work) to replace existing ``paths`` unless ``overwrite``; the message
    names them and the fix. Returns the existing ones (to be replaced when ``overwrite``)."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more files" if len(existing) > 1 else ""
        raise FileExistsError(
            f"{existing[0]}{more} {'exist' if more else 'exists'} from an earlier run ({what}); pass --overwrite "
            "true to replace, or choose another output"
        )
    return existing


def check_not_input(out: str | os.PathLike, inputs, option: str = "out") -> None:
    """Refuse an output path that is one of the inputs (inputs are never overwritten)."""
    for p in inputs:
        if p is not None and Path(p).exists() and Path(out).exists() and Path(out).resolve() == Path(p).resolve():
            raise FileExistsError(f"--{option} {out} is an input of this command; inputs are never overwritten")


# a displacement file records the grid of the moving image it indexes (NIfTI comment extension, JSON), so that
# applying it to an image on another grid is refused instead of silently misplacing it
GRID_RECORD = "segreg_moving_grid"
COMMENT_CODE = 6  # NIFTI_ECODE_COMMENT


def grid_record(path: str | os.PathLike) -> dict | None:
    """``{"shape": [...], "affine": 4x4}`` of the moving image a SegReg displacement file indexes, else ``None``."""
    for ext in nib.load(str(path)).header.extensions:
        if ext.get_code() != COMMENT_CODE:
            continue
        try:
            record = json.loads(ext.get_content().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(record, dict) and GRID_RECORD in record:
            return record[GRID_RECORD]
    return None


def save_nifti(
    array: np.ndarray, path: str | os.PathLike, affine: np.ndarray, dtype=None, record: dict | None = None
) -> Path:
    """Write ``array`` (spatial axes first, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, 3)``) atomically; ``record`` is stored
    as JSON in a NIfTI comment extension."""
    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    if record:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(COMMENT_CODE, json.dumps(record).encode("utf-8")))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)``; a clear error naming the file if it cannot be read."""
    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj), img.affine
    except Exception as e:  # nibabel raises several types
        from custom.validation import InputError

        raise InputError(
            f"cannot read NIfTI file {path}: {e}. Check that it exists and is a valid .nii/.nii.gz."
        ) from e


def save_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (a markdown page, a log)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_json(obj, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4, default=float) + "\n")
    return Path(path)


def save_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write dict rows (union of keys as header, in first-seen order) atomically."""
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def file_stem(path: str | os.PathLike) -> str:
    """A file name without folder and without every suffix (``a/b/x.nii.gz`` -> ``x``)."""
    return Path(str(path)).name.split(".")[0]


def learn2reg_case_id(path: str | os.PathLike) -> tuple[str, str]:
    """``(subject, modality)`` from a Learn2Reg name like ``ThoraxCBCT_0011_0001.nii.gz`` -> ("0011", "0001")."""
    stem = file_stem(path)
    parts = stem.split("_")
    if len(parts) < 3 or not (parts[-1].isdigit() and parts[-2].isdigit()):
        raise ValueError(f"{path} is not a Learn2Reg image name (<Task>_<subject>_<modality>.nii.gz)")
    return parts[-2], parts[-1]


def learn2reg_disp_name(fixed: str | os.PathLike, moving: str | os.PathLike) -> str:
    """Displacement file name the Learn2Reg evaluation looks for.

    ``disp_<fixed subject>_<moving subject>.nii.gz`` when the modalities are equal (or fixed 0000 / moving 0001),
    else ``disp_<fixed subject>_<fixed modality>_<moving subject>_<moving modality>.nii.gz`` (e.g. ThoraxCBCT).
    """
    fs, fm = learn2reg_case_id(fixed)
    ms, mm = learn2reg_case_id(moving)
    if fm == mm or (fm == "0000" and mm == "0001"):
        return f"disp_{fs}_{ms}.nii.gz"
    return f"disp_{fs}_{fm}_{ms}_{mm}.nii.gz"


def save_displacement(
    ddf: np.ndarray,
    path: str | os.PathLike,
    affine: np.ndarray,
    moving_affine: np.ndarray | None = None,
    moving_shape: Sequence[int] | None = None,
) -> Path:
    """Save a ``(3, X, Y, Z)`` voxel ddf as Learn2Reg ``(X, Y, Z, 3)`` float32 NIfTI; a non-finite field is refused.

    ``moving_affine``/``moving_shape``: the grid of the moving file the field indexes (default: the fixed grid, as in
    Learn2Reg), recorded in the header (:func:`grid_record`) so that ``warp`` can check what it is applied to.
    """
    ddf = np.asarray(ddf, np.float32)
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"expected a (3, X, Y, Z) displacement, got {ddf.shape}")
    bad = int((~np.isfinite(ddf)).sum())
    if bad:
        raise ValueError(f"the displacement for {path} has {bad} non-finite values; it is not written")
    moving_affine = np.asarray(affine if moving_affine is None else moving_affine, dtype=float)
    moving_shape = ddf.shape[1:] if moving_shape is None else moving_shape
    record = {GRID_RECORD: {"shape": [int(n) for n in moving_shape], "affine": moving_affine.tolist()}}
    return save_nifti(np.moveaxis(ddf, 0, -1), path, affine, dtype=np.float32, record=record)
