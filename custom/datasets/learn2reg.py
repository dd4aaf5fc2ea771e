"""Learn2Reg reader: the dataset JSON and folders as published -> pair records (+ keypoints)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from custom.io import file_stem, learn2reg_case_id, learn2reg_disp_name
from custom.validation import InputError


def load_dataset_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read Learn2Reg dataset JSON {path}: {e}") from e


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if rel.startswith(".") else Path(rel)


def _entry_image(entry, n: int, json_path) -> str:
    if not isinstance(entry, dict) or "image" not in entry:
        raise InputError(f"{json_path}: entry {n} of 'training' ({entry!r}) has no 'image' key")
    return entry["image"]


def read_keypoints(path: str | Path) -> np.ndarray:
    """Keypoints ``(K, 3)`` in voxel coordinates (0-based, array index order), one point per CSV row.

    The dataset JSON names keypoint files ``.nii.gz`` while the distributed folders hold ``.csv`` files of the same
    stem; both names are accepted. This is the convention of Learn2Reg's evaluation (``np.loadtxt`` + the
    displacement sampled at the fixed points).
    """
    p = Path(path)
    csv = p if p.suffix == ".csv" else p.with_name(file_stem(p) + ".csv")
    if not csv.exists():
        raise ValueError(f"keypoint file {csv} not found (the JSON named {p.name}).")
    pts = np.loadtxt(csv, delimiter=",", ndmin=2)
    if pts.shape[1] != 3:
        raise ValueError(f"{csv}: expected 3 comma-separated coordinates per row, got {pts.shape[1]}")
    return pts.astype(np.float32)


def keypoint_pair(root: Path, fixed: str, moving: str) -> tuple[Path, Path] | None:
    """(fixed, moving) keypoint CSVs for a pair: ``keypoints0{m}Tr`` for FBCT/CBCT pairs, else ``keypointsTr``."""
    (_, fm), (_, mm) = learn2reg_case_id(fixed), learn2reg_case_id(moving)
    mods = sorted([int(fm), int(mm)])
    folder = root / ("keypointsTr" if fm == mm else f"keypoints{mods[0]}{mods[1]}Tr")
    f, m = (folder / (file_stem(x) + ".csv") for x in (fixed, moving))
    return (f, m) if f.exists() and m.exists() else None


def learn2reg_pairs(
    json_path: str | Path, split: str = "registration_val", label_dir: str = "labelsTr", keypoints: bool = True
) -> list[dict]:
    """Pair records ``{fixed_image, moving_image[, fixed_label, moving_label][, fixed_keypoints, moving_keypoints]
    [, true_displacement]}`` (the last where ``gtdisp/disp_<fixed>_<moving>.nii.gz`` holds the exact motion).

    ``split``: a pair list of the JSON (``registration_val``, ``training_paired_images``, ...) or "training_all" for
    every ordered pair of distinct ``training`` images (inter-subject training). ``label_dir``: folder beside
    ``imagesTr`` with label maps of the same names (``labelsTr``, or ``segmentationsTr`` for automatic ones); it must
    exist (``None``: no labels). An image without a label file in it gets no label keys.
    """
    json_path = Path(json_path)
    spec, root = load_dataset_json(json_path), json_path.parent
    if split == "training_all":
        images = [_entry_image(e, n, json_path) for n, e in enumerate(spec.get("training", []))]
        pairs = [{"fixed": a, "moving": b} for a in images for b in images if a != b]
    elif split in spec:
        pairs = spec[split]
    else:
        options = [k for k, v in spec.items() if isinstance(v, list) and v and "fixed" in v[0]]
        raise ValueError(f"{json_path} has no pair list {split!r}; available: {options + ['training_all']}")
    if label_dir is not None and not (root / label_dir).is_dir():
        raise InputError(
            f"label folder {root / label_dir} does not exist (label_dir={label_dir!r} beside {json_path}); give the "
            "folder of label maps named like the images (labelsTr, segmentationsTr, ...) or label_dir=None."
        )
    records = []
    for n, p in enumerate(pairs):
        missing = [k for k in ("fixed", "moving") if not isinstance(p, dict) or k not in p]
        if missing:
            raise InputError(f"{json_path}: entry {n} of {split!r} ({p!r}) has no {missing} key; each pair needs both")
        rec = {f"{k}_image": str(_resolve(root, p[k])) for k in ("fixed", "moving")}
        for k in ("fixed", "moving"):
            if not Path(rec[f"{k}_image"]).exists():
                raise ValueError(f"{rec[f'{k}_image']} listed in {json_path} does not exist.")
            lab = Path(rec[f"{k}_image"].replace("/imagesTr/", f"/{label_dir}/")) if label_dir else None
            if lab is not None and lab.exists():
                rec[f"{k}_label"] = str(lab)
        truth = root / "gtdisp" / learn2reg_disp_name(rec["fixed_image"], rec["moving_image"])
        if truth.exists():  # exact motion, where a (synthetic) set stores it
            rec["true_displacement"] = str(truth)
        if keypoints:
            kp = keypoint_pair(root, rec["fixed_image"], rec["moving_image"])
            if kp is not None:
                rec["fixed_keypoints"], rec["moving_keypoints"] = str(kp[0]), str(kp[1])
        records.append(rec)
    return records


def learn2reg_split(
    json_path: str | Path,
    part: str = "train",
    n_train: int = 20,
    n_val: int = 3,
    label_dir: str = "labelsTr",
    keypoints: bool = True,
) -> list[dict]:
    """Inter-subject pair records of one part of a split of the JSON's ``training`` images, by subject id.

    The images sorted by name are cut into ``n_train`` train, ``n_val`` validation and the rest test subjects
    (20/3/7 on the 30 AbdomenCTCT scans); each part gives every ordered pair of distinct subjects in it (20 x 19 =
    380 training pairs). ``part`` may also name a pair list of the JSON (e.g. ``registration_val``).
    """
    spec = load_dataset_json(json_path)
    if part not in ("train", "val", "test"):
        return learn2reg_pairs(json_path, part, label_dir, keypoints)
    images = sorted(_entry_image(e, n, json_path) for n, e in enumerate(spec.get("training", [])))
    if n_train + n_val >= len(images) or n_train < 2:
        raise ValueError(
            f"{json_path} lists {len(images)} training images; n_train={n_train} + n_val={n_val} must leave test "
            "subjects and n_train >= 2. Set the config ids n_train / n_val for this data set."
        )
    start, stop = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}[part]
    chosen = set(images[start:stop])
    if len(chosen) < 2:
        raise ValueError(f"the {part} part of {json_path} has {len(chosen)} subject(s); pairs need 2 (n_train/n_val)")
    records = learn2reg_pairs(json_path, "training_all", label_dir, keypoints)
    root = Path(json_path).parent
    names = {str(_resolve(root, i)): i for i in images}
    return [r for r in records if names[r["fixed_image"]] in chosen and names[r["moving_image"]] in chosen]
