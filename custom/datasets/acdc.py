"""ACDC reader: ``patientXXX/patientXXX_frameYY[_gt].nii.gz`` + ``Info.cfg`` -> ED/ES pair records."""

from __future__ import annotations

import re
from pathlib import Path


def read_info(path: Path) -> dict:
    """ED/ES frame numbers (and the other ``key: value`` lines) of an ACDC ``Info.cfg``."""
    try:
        info = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    info = {k.strip(): v.strip() for k, v in info.items()}
    for key in ("ED", "ES"):
        if key not in info or not info[key].isdigit():
            raise ValueError(f"{path} has no '{key}: <frame number>' line; it is needed to pick the ED/ES frames.")
    return info


def patient_dirs(root: str | Path) -> list[Path]:
    """Patient folders under ``root`` (itself, or its ``training``/``testing`` subfolders), sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ACDC folder {root} does not exist; point data_dir at the folder holding patientXXX/.")
    dirs = [p for p in root.glob("patient*") if p.is_dir()]
    dirs += [p for sub in ("training", "testing") for p in (root / sub).glob("patient*") if p.is_dir()]
    if not dirs:
        raise ValueError(f"no patientXXX folders found in {root} (or its training/ and testing/ subfolders).")
    return sorted(dirs, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def acdc_pairs(
    root: str | Path,
    patients: list[str] | None = None,
    directions=("ES_ED", "ED_ES"),
    label_dir: str | Path | None = None,
) -> list[dict]:
    """Pair records ``{fixed, moving, fixed_label, moving_label, patient, direction}``.

    ``directions``: "ES_ED" = fixed ES, moving ED; "ED_ES" the reverse. ``patients``: restrict to these ids.
    ``label_dir``: take label maps from this folder (e.g. nnU-Net predictions named like the images,
    ``patientXXX_frameYY.nii.gz``) instead of the ground-truth ``_gt`` files.
    """
    records = []
    for pdir in patient_dirs(root):
        pid = pdir.name
        if patients is not None and pid not in patients:
            continue
        info = read_info(pdir / "Info.cfg")
        frames = {k: pdir / f"{pid}_frame{int(info[k]):02d}.nii.gz" for k in ("ED", "ES")}
        labels = {
            k: (Path(label_dir) / f.name if label_dir else f.with_name(f.name.replace(".nii.gz", "_gt.nii.gz")))
            for k, f in frames.items()
        }
        for p in list(frames.values()) + list(labels.values()):
            if not p.exists():
                raise ValueError(f"{p} is missing (needed for {pid}); check the ACDC folder or label_dir.")
        for d in directions:
            fixed, moving = d.split("_")
            records.append(
                {
                    "fixed": str(frames[fixed]),
                    "moving": str(frames[moving]),
                    "fixed_label": str(labels[fixed]),
                    "moving_label": str(labels[moving]),
                    "patient": pid,
                    "direction": d,
                }
            )
    return records


def split_patients(records: list[dict], fractions=(0.8, 0.2)) -> tuple[list[dict], ...]:
    """Split records by patient id (sorted) into consecutive parts of the given fractions (rest = last part)."""
    ids = sorted({r["patient"] for r in records})
    bounds, start = [], 0
    for f in fractions:
        n = int(round(f * len(ids)))
        bounds.append(set(ids[start : start + n]))
        start += n
    bounds.append(set(ids[start:]))
    return tuple([r for r in records if r["patient"] in b] for b in bounds)
