"""Synthetic inter-subject abdominal CT in the Learn2Reg AbdomenCTCT layout (13 organs).

Each subject is a template anatomy pulled through its own piecewise field (every organ its own smooth shift, the
body a smoother one, so organs slide against each other). An organ appears only where its own field brought it; where
the body's field reaches into the place an organ left, the surrounding tissue fills the gap. Writes ``imagesTr/``,
``labelsTr/``, ``masksTr/``, ``AbdomenCTCT_dataset.json`` (with the generator's recipe), ``gtdisp/AbdomenCTCT_XXXX_
template.nii.gz`` (subject -> template displacement) and, for the ``registration_val`` pairs,
``gtdisp/disp_XXXX_YYYY.nii.gz``: the fixed -> moving truth, exact inside every organ (``exact_pair_truth``: each
subject's organ fields are regenerated from ``(seed, subject)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates
from tqdm.auto import tqdm

from custom.io import save_displacement, save_json, save_nifti, spacing_affine
from custom.synthetic.motion import (
    compose_sliding,
    ellipsoid,
    identity_grid,
    render,
    sample,
    smooth_field,
    smooth_noise,
)

LABELS = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gall bladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
# organ: (centre, radii) as fractions of the grid (x: patient right->left, y: anterior->posterior, z: feet->head)
ORGANS = {
    6: ((0.30, 0.45, 0.70), (0.20, 0.22, 0.18)),
    1: ((0.75, 0.58, 0.70), (0.09, 0.10, 0.10)),
    7: ((0.62, 0.35, 0.72), (0.12, 0.10, 0.10)),
    2: ((0.30, 0.68, 0.45), (0.07, 0.07, 0.12)),
    3: ((0.70, 0.68, 0.47), (0.07, 0.07, 0.12)),
    4: ((0.36, 0.30, 0.58), (0.05, 0.05, 0.06)),
    11: ((0.52, 0.50, 0.55), (0.14, 0.05, 0.05)),
    8: ((0.53, 0.68, 0.50), (0.035, 0.035, 0.45)),
    9: ((0.44, 0.66, 0.50), (0.04, 0.035, 0.40)),
    10: ((0.58, 0.56, 0.62), (0.12, 0.03, 0.03)),
    5: ((0.52, 0.62, 0.90), (0.03, 0.03, 0.12)),
    12: ((0.36, 0.64, 0.62), (0.03, 0.02, 0.04)),
    13: ((0.64, 0.64, 0.63), (0.03, 0.02, 0.04)),
}
HU = {0: -100.0, 1: 110, 2: 160, 3: 160, 4: 10, 5: 40, 6: 90, 7: 30, 8: 220, 9: 150, 10: 180, 11: 80, 12: 60, 13: 60}
PRIORITY = (8, 9, 10, 12, 13, 5, 4, 11, 2, 3, 1, 7, 6)


def template(shape) -> tuple[np.ndarray, np.ndarray]:
    """(label map, body mask) of the template anatomy."""
    shape = np.asarray(shape, np.float32)
    label = np.zeros(tuple(int(s) for s in shape), np.int16)
    body = ellipsoid(label.shape, shape / 2, shape * np.array([0.47, 0.42, 10.0]))
    for lab in PRIORITY[::-1]:  # large organs first, small ones painted over them
        c, r = ORGANS[lab]
        label[ellipsoid(label.shape, shape * np.array(c), np.maximum(shape * np.array(r), 1.2))] = lab
    label[~body] = 0
    return label, body


def subject_motion(shape, seed: int, k: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Subject ``k``'s motion from the template: one smooth field per organ (an organ shift plus a local
    deformation) and a smoother background field, ``(3, *shape)`` voxels each. Regenerated exactly from
    ``(seed, k)``, which is how the pairwise truth is computed (``write_pair_truths``)."""
    rng = np.random.default_rng([int(seed), int(k)])
    scale = min(shape) / 56.0
    fields = {
        lab: (smooth_field(shape, 3.0 * scale, 6.0, rng) + rng.uniform(-3, 3, (3, 1, 1, 1)) * scale).astype(np.float32)
        for lab in ORGANS
    }
    return fields, smooth_field(shape, 2.0 * scale, 10.0, rng)


def make_abdomen(
    out_dir: str, n_subjects: int = 8, shape=(64, 56, 80), spacing=(2.0, 2.0, 2.0), seed: int = 0, n_val_pairs: int = 4
) -> Path:
    """Generate the synthetic AbdomenCTCT set; returns the dataset JSON path."""
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    affine = spacing_affine(spacing)
    shape = tuple(int(s) for s in shape)
    t_label, t_body = template(shape)
    texture = smooth_noise(shape, 1.5, rng)
    t_image = np.where(t_body, render(t_label, HU, texture, 60.0), -1000.0).astype(np.float32)
    # the tissue around the organs (fat, muscle) continues behind them: it fills the gap where an organ slid away
    t_tissue = np.where(t_body, render(np.zeros_like(t_label), HU, texture, 60.0), -1000.0).astype(np.float32)
    training = []
    for k in tqdm(range(n_subjects), desc="synthetic AbdomenCTCT", leave=False):
        name = f"AbdomenCTCT_{k + 1:04d}_0000.nii.gz"
        fields, background = subject_motion(shape, seed, k + 1)
        ddf, owner = compose_sliding(t_label, fields, background, PRIORITY, return_owner=True)
        label = owner.astype(np.uint8)  # an organ shows only where its own field brought it (no second copy)
        body = sample(t_body.astype(np.uint8), ddf, order=0)
        image = np.where(owner > 0, sample(t_image, ddf, order=1), sample(t_tissue, ddf, order=1))
        image = image + rng.normal(0, 15, shape).astype(np.float32)
        save_nifti(image.astype(np.float32), root / "imagesTr" / name, affine)
        save_nifti(label, root / "labelsTr" / name, affine, dtype=np.uint8)
        save_nifti(body, root / "masksTr" / name, affine, dtype=np.uint8)
        save_displacement(ddf, root / "gtdisp" / name.replace("_0000.nii.gz", "_template.nii.gz"), affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "mask": f"./masksTr/{name}"})
    val_ids = list(range(max(0, n_subjects - 3), n_subjects))
    pairs = [
        {"fixed": training[a]["image"], "moving": training[b]["image"]} for a in val_ids for b in val_ids if a != b
    ][:n_val_pairs]
    spec = {
        "name": "AbdomenCTCT",
        "description": "Synthetic stand-in for Learn2Reg AbdomenCTCT generated by SegReg (python -m custom make-data)",
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "modality": {"0": "CT"},
        "pairings": "unpaired",
        "provided_data": {"0": ["image", "label", "mask"]},
        "registration_direction": {"fixed": 0, "moving": 0},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training),
        "training": training,
        "numRegistration_val": len(pairs),
        "registration_val": pairs,
        "numTest": 0,
        "test": [],
        # how the subjects were made: write_pair_truths regenerates each subject's organ fields from these
        "synthetic": {"generator": "custom.synthetic.abdomen", "seed": int(seed), "shape": list(shape)},
    }
    path = save_json(spec, root / "AbdomenCTCT_dataset.json")
    write_pair_truths(path, [{"fixed_image": p["fixed"], "moving_image": p["moving"]} for p in pairs])
    return path


def invert_at(field: np.ndarray, points: np.ndarray, iterations: int) -> np.ndarray:
    """``z`` ``(3, N)`` with ``z + field(z) = points`` (linear interpolation of ``field`` ``(3, *S)``), by fixed-point
    iteration: converges for the small, smooth fields of the generators."""

    def u(q):
        return np.stack([map_coordinates(field[c], q, order=1, mode="nearest") for c in range(3)])

    z = points.copy()
    for _ in range(int(iterations)):
        z = points - u(z)
    return z


def pair_truth(
    fixed_to_template: np.ndarray,
    moving_to_template: np.ndarray,
    fixed_label: np.ndarray | None = None,
    moving_label: np.ndarray | None = None,
    iterations: int = 30,
):
    """Fixed -> moving displacement ``(3, *S)`` (voxels) of two synthetic subjects from their composite fields (the
    fallback for sets without a recipe; see ``exact_pair_truth``).

    Each subject is the template sampled at ``x + u_s(x)``, so fixed voxel x shows template point
    ``y = x + u_F(x)``, and the moving voxel showing it solves ``z + u_M(z) = y``. ``u_M`` jumps where organs slide, so
    with the label maps given the iteration for a fixed voxel of region i samples ``u_M`` of the moving subject's
    region i only (extended outside it by its nearest value). Returns ``(z - x, residual)`` with the residual
    ``|z + u_M(z) - y|`` in voxels (of the field the iteration used).
    """
    from scipy.ndimage import distance_transform_edt

    g = identity_grid(fixed_to_template.shape[1:])
    y = g + fixed_to_template
    z = y.copy()
    residual = np.zeros(y.shape[1:], np.float32)
    parts = [(np.ones(y.shape[1:], bool), moving_to_template)]
    if fixed_label is not None and moving_label is not None:
        parts = []
        for lab in np.unique(fixed_label):
            inside = moving_label == lab
            field = moving_to_template  # a region that vanished in the moving subject: the composite field
            if inside.any():
                idx = distance_transform_edt(~inside, return_distances=False, return_indices=True)
                field = moving_to_template[:, idx[0], idx[1], idx[2]]
            parts.append((fixed_label == lab, field))
    for sel, field in parts:
        z[:, sel] = invert_at(field, y[:, sel], iterations)
        back = np.stack([map_coordinates(field[c], z[:, sel], order=1, mode="nearest") for c in range(3)])
        residual[sel] = np.linalg.norm(z[:, sel] + back - y[:, sel], axis=0)
    return (z - g).astype(np.float32), residual


def exact_pair_truth(
    fixed_to_template: np.ndarray,
    fixed_label: np.ndarray,
    moving_fields: dict[int, np.ndarray],
    moving_background: np.ndarray,
    iterations: int = 50,
) -> np.ndarray:
    """Fixed -> moving displacement ``(3, *S)`` (voxels) from the moving subject's own organ fields.

    Fixed voxel x shows template point ``y = x + u_F(x)`` of organ ``i = fixed_label(x)``. That organ's material sits,
    in the moving subject, at the z with ``z + f_i(z) = y`` (``f_i`` the smooth field organ i was moved with;
    the background field for label 0). This holds across sliding borders and for thin organs, where inverting the
    composite field (``pair_truth``) lands on a neighbouring organ.
    """
    g = identity_grid(fixed_to_template.shape[1:])
    out = np.zeros_like(fixed_to_template, dtype=np.float32)
    for lab in np.unique(fixed_label):
        sel = fixed_label == lab
        y = g[:, sel] + fixed_to_template[:, sel]
        out[:, sel] = invert_at(moving_fields.get(int(lab), moving_background), y, iterations) - g[:, sel]
    return out


def write_pair_truths(json_path, pairs, overwrite: bool = False) -> list[Path]:
    """Write ``gtdisp/disp_<fixed>_<moving>.nii.gz`` (Learn2Reg names) for ``pairs`` of ``{fixed_image, moving_image}``
    records of a synthetic AbdomenCTCT set; the readers then attach them as ``true_displacement``. Existing files are
    kept unless ``overwrite`` (sets made before 2026-11-26 hold truths inverted across sliding borders: rewrite)."""
    import json
    import re

    from custom.io import learn2reg_disp_name, load_nifti

    root = Path(json_path).parent
    recipe = json.loads(Path(json_path).read_text()).get("synthetic")
    written = []
    for p in pairs:
        out = root / "gtdisp" / learn2reg_disp_name(p["fixed_image"], p["moving_image"])
        if out.exists() and not overwrite:
            continue
        fields, labels = [], []
        for k in ("fixed_image", "moving_image"):
            arr, affine = load_nifti(root / "gtdisp" / Path(p[k]).name.replace("_0000.nii.gz", "_template.nii.gz"))
            fields.append(np.moveaxis(np.asarray(arr, np.float32), -1, 0))
            labels.append(np.asarray(load_nifti(root / "labelsTr" / Path(p[k]).name)[0]))
        if recipe:  # exact: the moving subject's organ fields, regenerated
            k = int(re.search(r"_(\d{4})_0000", Path(p["moving_image"]).name).group(1))
            truth = exact_pair_truth(fields[0], labels[0], *subject_motion(tuple(recipe["shape"]), recipe["seed"], k))
        else:  # a set made before the recipe was stored: invert the composite field region by region
            truth, _ = pair_truth(*fields, *labels)
        written.append(save_displacement(truth, out, affine))
    return written
