"""Synthetic FBCT/CBCT thorax in the Learn2Reg ThoraxCBCT layout, lungs sliding along the chest wall.

Per subject: ``imagesTr/ThoraxCBCT_XXXX_0000`` (fan-beam CT, moving) and ``_0001``/``_0002`` (cone-beam CTs at two
breathing states: other intensity mapping, more noise, smaller field of view), keypoints
(``keypoints01Tr``/``keypoints02Tr``, CSV, voxel coordinates), TotalSegmentator-style label maps
(``segmentationsTr/``, class ids of TotalSegmentator v2 "total"), ``gtdisp/disp_XXXX_000k_XXXX_0000.nii.gz``
(exact CBCT -> FBCT displacement) and ``ThoraxCBCT_dataset.json`` shaped like the published one.

``realism="cbct"`` adds what real ThoraxCBCT pairs have and the simple set lacks (:mod:`custom.synthetic.cbct`): the
upper abdomen under the diaphragm (liver dome, stomach with its gas bubble, spleen, upper kidneys; TotalSegmentator
ids), moving with the diaphragm and sliding along the chest wall; lung density that follows inflation (mass
conservation); and the artefacts of cone-beam imaging (cupping, view-aliasing streaks, breathing blur, spatially
correlated noise, a field of view that truncates the body).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from custom.io import atomic_path, save_displacement, save_json, save_nifti, spacing_affine
from custom.synthetic.motion import compose_sliding, ellipsoid, identity_grid, sample, smooth_noise

TOTALSEG_IDS = json.loads((Path(__file__).parent / "totalsegmentator_total_v2.json").read_text())["classes"]
# the upper-abdominal classes of TotalSegmentator v2 'total' that realism="cbct" adds (custom.synthetic.cbct)
ABDOMEN_IDS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6}
LUNG = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
HU = {"lung": -850.0, "soft": 40.0, "fat": -90.0, "bone": 650.0, "air": -1000.0, "blood": 60.0}


def _tube(shape, cx, cy, r, z0, z1) -> np.ndarray:
    g = identity_grid(shape)
    return ((g[0] - cx) ** 2 + (g[1] - cy) ** 2 <= r**2) & (g[2] >= z0) & (g[2] < z1)


def thorax_anatomy(shape, rng: np.random.Generator):
    """(TotalSegmentator-style label map, FBCT image in HU, body mask)."""
    X, Y, Z = shape
    f = np.array(shape, np.float32)
    ids = TOTALSEG_IDS
    lab = np.zeros(shape, np.int16)
    body = ellipsoid(shape, f / 2, f * np.array([0.46, 0.40, 10.0]))
    g = identity_grid(shape)
    jitter = rng.uniform(-0.02, 0.02, 2)
    for side, cx in (("right", 0.29 + jitter[0]), ("left", 0.71 + jitter[1])):
        lung = ellipsoid(shape, f * np.array([cx, 0.50, 0.55]), f * np.array([0.15, 0.26, 0.40]))
        z = g[2] / Z
        if side == "left":
            lab[lung & (z >= 0.55)] = ids["lung_upper_lobe_left"]
            lab[lung & (z < 0.55)] = ids["lung_lower_lobe_left"]
        else:
            lab[lung & (z >= 0.62)] = ids["lung_upper_lobe_right"]
            lab[lung & (z >= 0.45) & (z < 0.62)] = ids["lung_middle_lobe_right"]
            lab[lung & (z < 0.45)] = ids["lung_lower_lobe_right"]
    lab[ellipsoid(shape, f * [0.55, 0.36, 0.34], f * [0.15, 0.13, 0.16])] = ids["heart"]
    lab[ellipsoid(shape, f * [0.50, 0.40, 0.55], f * [0.12, 0.03, 0.03])] = ids["pulmonary_vein"]
    lab[_tube(shape, 0.57 * X, 0.62 * Y, 0.035 * X, 0.2 * Z, 0.85 * Z)] = ids["aorta"]
    lab[_tube(shape, 0.45 * X, 0.46 * Y, 0.03 * X, 0, 0.32 * Z)] = ids["inferior_vena_cava"]
    lab[_tube(shape, 0.50 * X, 0.33 * Y, 0.03 * X, 0.62 * Z, Z)] = ids["trachea"]
    lab[_tube(shape, 0.50 * X, 0.60 * Y, 0.022 * X, 0, Z)] = ids["esophagus"]
    lab[_tube(shape, 0.50 * X, 0.80 * Y, 0.06 * X, 0, Z)] = ids["vertebrae_T8"]
    for k, name in enumerate(("vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4")):
        z0 = (0.3 + 0.17 * k) * Z
        lab[_tube(shape, 0.50 * X, 0.80 * Y, 0.06 * X, z0, z0 + 0.17 * Z)] = ids[name]
    lab[_tube(shape, 0.50 * X, 0.80 * Y, 0.02 * X, 0, Z)] = ids["spinal_cord"]
    ring = ellipsoid(shape, f / 2, f * np.array([0.43, 0.37, 10.0])) & ~ellipsoid(
        shape, f / 2, f * np.array([0.40, 0.34, 10.0])
    )
    for k in range(5):
        z0 = (0.15 + 0.15 * k) * Z
        slab = ring & (g[2] >= z0) & (g[2] < z0 + 0.05 * Z + 1) & (g[1] > 0.3 * Y)
        lab[slab & (g[0] < X / 2)] = ids[f"rib_right_{k + 3}"]
        lab[slab & (g[0] >= X / 2)] = ids[f"rib_left_{k + 3}"]
    lab[ellipsoid(shape, f * [0.24, 0.86, 0.74], f * [0.10, 0.025, 0.14])] = ids["scapula_right"]
    lab[ellipsoid(shape, f * [0.76, 0.86, 0.74], f * [0.10, 0.025, 0.14])] = ids["scapula_left"]
    lab[ellipsoid(shape, f * [0.32, 0.22, 0.93], f * [0.12, 0.02, 0.02])] = ids["clavicula_right"]
    lab[ellipsoid(shape, f * [0.68, 0.22, 0.93], f * [0.12, 0.02, 0.02])] = ids["clavicula_left"]
    lab[ellipsoid(shape, f * [0.50, 0.14, 0.55], f * [0.03, 0.02, 0.30])] = ids["sternum"]
    lab[~body] = 0

    names = {v: k for k, v in ids.items()}
    img = np.full(shape, HU["air"], np.float32)
    img[body] = HU["fat"]
    texture = smooth_noise(shape, 1.0, rng)
    for v in np.unique(lab):
        if v == 0:
            continue
        n = names[int(v)]
        kind = (
            "lung"
            if n.startswith("lung")
            else (
                "air"
                if n == "trachea"
                else (
                    "bone"
                    if n.startswith(("rib", "vert", "scap", "clav", "stern"))
                    else "blood" if n in ("heart", "aorta", "inferior_vena_cava", "pulmonary_vein") else "soft"
                )
            )
        )
        img[lab == v] = HU[kind]
    is_lung = np.isin(lab, [ids[n] for n in LUNG])
    img = img + np.where(is_lung, 250.0 * texture**3, 40.0 * texture).astype(np.float32)
    return lab, img * body + HU["air"] * ~body, body


def breathing_fields(shape, ids, rng: np.random.Generator, amplitude: float, shift):
    """(per-label fields, background field): lungs and heart move cranio-caudally, the chest wall barely."""
    g = identity_grid(shape)
    Z = shape[2]
    w = np.clip(1.0 - g[2] / Z, 0.0, 1.0) ** 1.5  # diaphragm end moves most
    lung = np.zeros((3,) + tuple(shape), np.float32)
    lung[2] = amplitude * w
    lung[1] = 0.15 * amplitude * w
    wall = np.zeros_like(lung)
    wall[1] = 0.1 * amplitude * (g[1] / shape[1] - 0.5)  # slight AP expansion, no cranio-caudal motion
    shift = np.asarray(shift, np.float32).reshape(3, 1, 1, 1)
    fields = {ids[n]: lung + shift for n in LUNG}
    for n in ("heart", "pulmonary_vein", "inferior_vena_cava"):
        fields[ids[n]] = 0.5 * lung + shift
    return fields, wall + shift


def save_keypoints(points: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        np.savetxt(tmp, points, delimiter=",", fmt="%.4f")


def make_thorax(
    out_dir: str,
    n_subjects: int = 3,
    shape=(80, 64, 64),
    spacing=(4.0, 4.0, 4.0),
    seed: int = 0,
    n_keypoints: int = 100,
    n_val: int = 1,
    realism: str = "simple",
) -> Path:
    """Generate the synthetic ThoraxCBCT set; returns the dataset JSON path.

    ``realism``: "simple" (the set every table so far was measured on) or "cbct" (upper abdomen, lung density,
    cone-beam artefacts: see the module docstring; its random draws come from a second stream, so "simple" sets stay
    the same).
    """
    if realism not in ("simple", "cbct"):
        raise ValueError(f"realism must be 'simple' or 'cbct', got {realism!r}")
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng([seed, 1]) if realism == "cbct" else None
    root = Path(out_dir)
    affine = spacing_affine(spacing)
    shape = tuple(int(s) for s in shape)
    ids = TOTALSEG_IDS
    training, paired, val = [], [], []
    for k in tqdm(range(n_subjects), desc="synthetic ThoraxCBCT", leave=False):
        sid = f"{k:04d}"
        label, fbct, body = thorax_anatomy(shape, rng)
        if extra is not None:
            from custom.synthetic.cbct import add_upper_abdomen

            label, fbct = add_upper_abdomen(label, fbct, body, extra)
        stem = f"ThoraxCBCT_{sid}"
        save_nifti(
            fbct + rng.normal(0, 10, shape).astype(np.float32), root / "imagesTr" / f"{stem}_0000.nii.gz", affine
        )
        save_nifti(label, root / "segmentationsTr" / f"{stem}_0000.nii.gz", affine, dtype=np.uint8)
        entry0 = {"image": f"./imagesTr/{stem}_0000.nii.gz"}
        entries = []
        for t in (1, 2):
            amp = rng.uniform(2.0, 4.0) * min(shape) / 64.0
            shift = rng.uniform(-1, 1, 3) * (t - 1)  # set-up change at the end of therapy
            fields, wall = breathing_fields(shape, ids, rng, amp, shift)
            order = [ids[n] for n in LUNG] + [ids["heart"], ids["pulmonary_vein"], ids["inferior_vena_cava"]]
            if extra is None:
                ddf = compose_sliding(label, fields, wall, order)
                cb_label = sample(label, ddf, order=0).astype(np.uint8)
                cb = sample(fbct, ddf, order=1)
                fov = ellipsoid(shape, np.array(shape) / 2, np.array(shape) * np.array([0.40, 0.40, 0.42]))
                cb = np.where(fov, 0.85 * cb + 60 + rng.normal(0, 40, shape), -1000.0).astype(np.float32)
            else:
                from custom.synthetic.cbct import cone_beam_pair

                rng.normal(0, 40, shape)  # the simple set's noise draw, kept so the two sets share every other draw
                ddf, cb_label, cb, fov = cone_beam_pair(label, fbct, fields, wall, order, amp, extra)
            name = f"{stem}_000{t}.nii.gz"
            save_nifti(cb, root / "imagesTr" / name, affine)
            save_nifti(cb_label, root / "segmentationsTr" / name, affine, dtype=np.uint8)
            save_displacement(ddf, root / "gtdisp" / f"disp_{sid}_000{t}_{sid}_0000.nii.gz", affine)
            lung = np.isin(cb_label, [ids[n] for n in LUNG]) & fov
            pts = np.argwhere(lung)
            pts = pts[rng.choice(len(pts), size=min(n_keypoints, len(pts)), replace=False)].astype(np.float32)
            moving_pts = pts + ddf[:, pts[:, 0].astype(int), pts[:, 1].astype(int), pts[:, 2].astype(int)].T
            kdir = root / f"keypoints0{t}Tr"
            save_keypoints(pts, kdir / f"{stem}_000{t}.csv")
            save_keypoints(moving_pts, kdir / f"{stem}_0000.csv")
            entry0[f"keypoints0{t}"] = f"./keypoints0{t}Tr/{stem}_0000.nii.gz"
            entries.append({"image": f"./imagesTr/{name}", f"keypoints0{t}": f"./keypoints0{t}Tr/{stem}_000{t}.nii.gz"})
            pair = {"fixed": f"./imagesTr/{name}", "moving": f"./imagesTr/{stem}_0000.nii.gz"}
            (val if k >= n_subjects - n_val else paired).append(pair)
        training += [entry0] + entries
    spec = {
        "name": "ThoraxCBCT",
        "release": "synthetic",
        "description": "Synthetic stand-in for Learn2Reg ThoraxCBCT generated by SegReg (python -m custom make-data)",
        "pairings": "paired",
        "provided_data": {"0": ["image", "keypoints01", "keypoints02"]},
        "registration_direction": {"fixed": 1, "moving": 0},
        "modality": {"0": "FBCT", "1": "CBCT", "2": "CBCT"},
        "img_shift": {"fixed": "followup", "moving": "baseline"},
        "labels": {},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "numPairedTraining": len(paired),
        "training_paired_images": paired,
        "numPairedTest": 0,
        "test_paired_images": [],
        "numRegistration_val": len(val),
        "registration_val": val,
        "numRegistration_test": 0,
        "registration_test": [],
    }
    return save_json(spec, root / "ThoraxCBCT_dataset.json")
