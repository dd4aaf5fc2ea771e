"""Synthetic cine-MR in the ACDC layout: a heart that contracts and twists against static tissue.

Writes ``<out>/training/patientXXX/patientXXX_frameYY[_gt].nii.gz`` and ``Info.cfg`` (ED/ES frame numbers), labels
1 RV, 2 myocardium, 3 LV cavity, plus ``patientXXX_disp_ES_ED.nii.gz``: the exact ES (fixed) -> ED (moving)
displacement, Learn2Reg form ``(X, Y, Z, 3)`` in voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from custom.io import save_displacement, save_nifti, spacing_affine
from custom.synthetic.motion import compose_sliding, ellipsoid, identity_grid, render, sample, smooth_noise

LABELS = {0: "background", 1: "RV", 2: "myocardium", 3: "LV cavity"}
HEART = (1, 2, 3)


def heart_anatomy(shape, rng: np.random.Generator, variety: float = 0.0) -> np.ndarray:
    """ED label map: body (background 0), RV crescent (1), myocardium ring (2), LV cavity (3); ``variety`` (0..1)
    widens the ranges of position, size, wall thickness and RV shape across subjects."""
    X, Y, Z = shape
    s = X / 128.0
    c = np.array([X * 0.5, Y * 0.47, Z * 0.5]) + rng.uniform(-1, 1, 3) * (3 + 5 * variety) * np.array([s, s, 0])
    r_lv = (13 + rng.uniform(-1, 1) * (1.5 + 3.5 * variety)) * s
    wall = (6 + rng.uniform(-1, 1) * (1 + 1.5 * variety)) * s
    rv_scale = 1.0 + rng.uniform(-0.25, 0.25) * variety
    zr = Z * 0.42
    label = np.zeros(shape, np.int16)
    rv_radii = [(r_lv + wall) * 1.3 * rv_scale, r_lv * 1.2 * rv_scale, zr * 0.9]
    rv = ellipsoid(shape, c + np.array([0, (r_lv + wall) * 0.9, 0]), rv_radii)
    label[rv] = 1
    label[ellipsoid(shape, c, [r_lv + wall, r_lv + wall, zr])] = 2
    label[ellipsoid(shape, c, [r_lv, r_lv, zr - 1])] = 3
    return label, c


def heart_fields(shape, centre, rng: np.random.Generator, r_heart: float, variety: float = 0.0):
    """(heart field, background field): radial contraction + twist inside; radial part only outside (sliding).
    ``variety`` (0..1) widens the ranges of contraction and twist."""
    g = identity_grid(shape)
    dx, dy = g[0] - centre[0], g[1] - centre[1]
    r = np.sqrt(dx**2 + dy**2) + 1e-6
    expand = rng.uniform(0.18 - 0.08 * variety, 0.28 + 0.07 * variety)  # ES -> ED: points move outwards
    radial = expand * r * np.exp(-r / (2.5 * r_heart))  # voxels, outward
    twist = np.deg2rad(rng.uniform(6 - 4 * variety, 12 + 4 * variety)) * (g[2] - centre[2]) / max(shape[2] / 2, 1)
    heart = np.zeros((3,) + tuple(shape), np.float32)
    heart[0] = radial * dx / r + (np.cos(twist) - 1) * dx - np.sin(twist) * dy
    heart[1] = radial * dy / r + np.sin(twist) * dx + (np.cos(twist) - 1) * dy
    radial_edge = expand * r_heart * np.exp(-1 / 2.5)
    background = np.zeros_like(heart)
    bg = np.where(r <= r_heart, radial, radial_edge * np.exp(-(r - r_heart) / (0.6 * r_heart)))
    background[0], background[1] = bg * dx / r, bg * dy / r
    return heart, background


def make_acdc(
    out_dir: str,
    n_subjects: int = 6,
    shape=(128, 128, 16),
    spacing=(1.8, 1.8, 10.0),
    seed: int = 0,
    first_id: int = 1,
    n_test: int = 0,
    variety: float = 1.0,
) -> Path:
    """Generate ``n_subjects`` synthetic ACDC patients under ``out_dir/training`` and ``n_test`` more under
    ``out_dir/testing`` (the next ids); returns the training folder.

    ``variety`` (0..1, default 1) varies the subjects the way scanners and patients do: tissue intensities and
    texture, a smooth coil-sensitivity (bias) field, noise level, a frame-to-frame gain change, and wider ranges of
    heart position, size, wall thickness, RV shape, contraction and twist. 0 gives the narrow set of earlier
    versions (same ranges, not the same random draws).
    """
    rng = np.random.default_rng(seed)
    root = Path(out_dir) / "training"
    affine = spacing_affine(spacing)
    shape = tuple(int(s) for s in shape)
    for k in tqdm(range(n_subjects + n_test), desc="synthetic ACDC", leave=False):
        pid = f"patient{first_id + k:03d}"
        pdir = (root if k < n_subjects else root.with_name("testing")) / pid
        v = float(variety)
        ed_label, centre = heart_anatomy(shape, rng, v)
        body = ellipsoid(shape, [shape[0] / 2, shape[1] / 2, shape[2] / 2], [shape[0] * 0.45, shape[1] * 0.38, 1e3])
        texture = smooth_noise(shape, 2.0 + rng.uniform(-1, 1) * v, rng)
        tissue = {0: 0.25, 1: 0.85, 2: 0.35, 3: 0.95}
        tissue = {k: t + rng.uniform(-0.08, 0.08) * v for k, t in tissue.items()}
        ed_image = render(ed_label, tissue, texture, 0.15 + rng.uniform(-0.07, 0.07) * v) * body
        bias = 1.0 + 0.3 * v * (smooth_noise(shape, shape[0] / 4, rng) - 0.5)  # coil sensitivity, +-15 %
        r_heart = float(np.sqrt((ed_label > 0).sum() / max(shape[2] * 0.84, 1) / np.pi))
        heart, background = heart_fields(shape, centre, rng, r_heart, v)
        ddf = compose_sliding(ed_label, {lab: heart for lab in HEART}, background, priority=(3, 2, 1))
        es_label = sample(ed_label, ddf, order=0).astype(np.int16)
        noise = 0.02 + rng.uniform(-0.01, 0.02) * v
        gain = 1.0 + rng.uniform(-0.08, 0.08) * v  # the ES frame a little brighter or darker
        es_image = gain * sample(ed_image, ddf, order=1) * bias + rng.normal(0, noise, shape).astype(np.float32)
        ed_image = ed_image * bias + rng.normal(0, noise, shape).astype(np.float32)
        ed, es = 1, int(rng.integers(8, 15))
        for frame, img, lab in ((ed, ed_image, ed_label), (es, es_image, es_label)):
            save_nifti(img.astype(np.float32), pdir / f"{pid}_frame{frame:02d}.nii.gz", affine)
            save_nifti(lab, pdir / f"{pid}_frame{frame:02d}_gt.nii.gz", affine, dtype=np.uint8)
        save_displacement(ddf, pdir / f"{pid}_disp_ES_ED.nii.gz", affine)
        (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 175.0\nNbFrame: 30\nWeight: 70.0\n")
    return root
