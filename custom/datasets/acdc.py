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
    """Pair records ``{fixed_image, moving_image, fixed_label, moving_label, patient, direction, pair_id}``
    (+ ``fixed_gt``/``moving_gt``, + ``true_displacement`` where ``patientXXX_disp_<direction>.nii.gz`` exists).

    ``directions``: "ES_ED" = fixed ES, moving ED; "ED_ES" the reverse. ``patients``: restrict to these ids.
    ``label_dir``: take label maps from this folder (e.g. nnU-Net predictions named like the images,
    ``patientXXX_frameYY.nii.gz``) instead of the ground-truth ``_gt`` files; ``fixed_gt``/``moving_gt`` keep the
    ground truth (where it exists) for scoring.
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
        gts = {k: f.with_name(f.name.replace(".nii.gz", "_gt.nii.gz")) for k, f in frames.items()}
        for d in directions:
            if d not in ("ES_ED", "ED_ES"):
                raise ValueError(f"direction must be 'ES_ED' or 'ED_ES' (fixed_moving), got {d!r}")
            fixed, moving = d.split("_")
            rec = {
                "fixed_image": str(frames[fixed]),
                "moving_image": str(frames[moving]),
                "fixed_label": str(labels[fixed]),
                "moving_label": str(labels[moving]),
                "patient": pid,
                "direction": d,
                "pair_id": f"{pid}_{d}",
            }
            if gts[fixed].exists() and gts[moving].exists():
                rec["fixed_gt"], rec["moving_gt"] = str(gts[fixed]), str(gts[moving])
            truth = pdir / f"{pid}_disp_{d}.nii.gz"  # exact motion, where a (synthetic) set stores it
            if truth.exists():
                rec["true_displacement"] = str(truth)
            records.append(rec)
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


def acdc_split(
    root: str | Path,
    part: str = "train",
    train_fraction: float = 0.8,
    directions=("ES_ED", "ED_ES"),
    label_dir: str | Path | None = None,
) -> list[dict]:
    """Records of one part of the ACDC split by patient id: "train", "val" or "test".

    "train"/"val": the patients of ``root/training`` (or of ``root`` itself), sorted by id, the first
    ``train_fraction`` for training and the rest for validation (80/20 on the 100 ACDC training patients).
    "test": the patients of ``root/testing`` (the 50 ACDC test patients).
    """
    root = Path(root)
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be 'train', 'val' or 'test', got {part!r}")
    if part == "test":
        if not (root / "testing").is_dir():
            raise ValueError(f"{root / 'testing'} does not exist; the ACDC test patients are read from there.")
        return acdc_pairs(root / "testing", directions=directions, label_dir=label_dir)
    folder = root / "training" if (root / "training").is_dir() else root
    train, val = split_patients(acdc_pairs(folder, directions=directions, label_dir=label_dir), (train_fraction,))
    chosen = train if part == "train" else val
    if not chosen:
        raise ValueError(f"the {part} part of {folder} is empty with train_fraction={train_fraction}")
    return chosen
