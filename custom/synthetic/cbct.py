"""What makes real ThoraxCBCT pairs harder than the simple synthetic thorax (``make_thorax(realism="cbct")``).

Built from the physics and the published descriptions of cone-beam CT, not from any method's weaknesses:

- **Upper abdomen.** A thoracic CBCT covers the liver dome, the stomach (with its gas bubble), the spleen and the
  upper poles of the kidneys (TotalSegmentator v2 ids). They sit under the diaphragm, move with it (cranio-caudally,
  less the further they lie from it: kidneys about half as much) and slide along a chest wall that barely moves.
  Solid organs move rigidly and keep their volume: where one moved away, the space it left shows unlabelled body
  tissue, never a static second copy of the organ (:func:`sliding_state`).
- **Lung density follows inflation.** Lung tissue keeps its mass: ``(HU + 1000)`` scales with the local volume change,
  ``(HU_f + 1000) = (HU_m + 1000) det J`` (``J`` of the fixed -> moving map), so the same lung looks different at
  another breathing state.
- **Breathing blur.** A CBCT is acquired over about a minute, many breaths: the image is the mean of the anatomy over
  a range of breathing amplitudes (0.8 to 1.2 of the mean state); labels, keypoints and the exact motion describe the
  mean state.
- **Cone-beam artefacts.** Cupping (scatter and beam hardening darken the centre), view-aliasing streaks, spatially
  correlated noise, an uncalibrated intensity scale, and a cylindrical field of view narrower than the body (lateral
  truncation) with a limited cranio-caudal extent; outside it the image holds -1000.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from custom.metrics import jacobian_determinant
from custom.synthetic.motion import compose_sliding, ellipsoid, identity_grid, sample, smooth_noise
from custom.synthetic.thorax import HU

# (TotalSegmentator v2 id, centre and radii as fractions of the grid, HU, share of the diaphragm's motion)
ORGANS = {
    "liver": (5, (0.33, 0.50, 0.10), (0.22, 0.30, 0.17), 60.0, 0.9),
    "stomach": (6, (0.68, 0.40, 0.12), (0.12, 0.13, 0.10), 35.0, 0.8),
    "spleen": (1, (0.80, 0.66, 0.12), (0.06, 0.09, 0.08), 50.0, 0.8),
    "kidney_right": (2, (0.36, 0.76, 0.00), (0.06, 0.06, 0.10), 30.0, 0.5),
    "kidney_left": (3, (0.64, 0.76, 0.02), (0.06, 0.06, 0.10), 30.0, 0.5),
}
LUNG_IDS = (10, 11, 12, 13, 14)
PHASES = (0.8, 0.9, 1.0, 1.1, 1.2)  # breathing amplitudes averaged into one CBCT (the mean state is 1.0)


def add_upper_abdomen(label: np.ndarray, image: np.ndarray, body: np.ndarray, rng: np.random.Generator):
    """``(label, image)`` with the upper-abdominal organs painted into the free body voxels under the lungs (so the
    liver and stomach domes follow the lung bases), each with its tissue HU and texture; the stomach gets a gas
    bubble at its top front."""
    label, image = label.copy(), image.copy()
    f = np.array(label.shape, np.float32)
    g = identity_grid(label.shape)
    texture = smooth_noise(label.shape, 1.0, rng)
    for name, (tid, centre, radii, hu, _) in ORGANS.items():
        c = (np.asarray(centre) + rng.uniform(-0.02, 0.02, 3)) * f
        organ = ellipsoid(label.shape, c, np.asarray(radii) * f) & body & (label == 0)
        label[organ] = tid
        image[organ] = hu + 30.0 * texture[organ]
        if name == "stomach":
            gas = organ & (g[2] > c[2] + 0.3 * radii[2] * f[2]) & (g[1] < c[1])
            image[gas] = -900.0
    return label, image


def abdomen_fields(label: np.ndarray, fields: dict) -> dict:
    """Rigid fields of the abdominal organs present in ``label``: the lung base's motion at the organ's centroid
    (the diaphragm above it), scaled by the organ's share (``ORGANS``)."""
    lung = fields[next(i for i in LUNG_IDS if i in fields)]
    out = {}
    for tid, _, _, _, share in ORGANS.values():
        where = np.argwhere(label == tid)
        if len(where) == 0:
            continue
        c = tuple(int(v) for v in where.mean(0).round())
        out[tid] = np.broadcast_to(lung[(slice(None),) + c].reshape(3, 1, 1, 1) * share, lung.shape).astype(np.float32)
    return out


def scaled(fields: dict, wall: np.ndarray, s: float) -> dict:
    """Each field's motion relative to the chest wall times ``s`` (another breathing amplitude, same set-up)."""
    return {k: wall + s * (v - wall) for k, v in fields.items()}


def det_jacobian(ddf: np.ndarray) -> np.ndarray:
    """``det J`` ``(*S)`` of ``x + ddf(x)`` (the metrics' central differences, no border dropped)."""
    return jacobian_determinant(torch.as_tensor(np.asarray(ddf, np.float32))[None], border=0)[0].numpy()


def render_state(label: np.ndarray, fbct: np.ndarray, ddf: np.ndarray, gap: np.ndarray | None = None) -> np.ndarray:
    """The anatomy at the state ``ddf`` maps to: the FBCT sampled at ``x + ddf(x)``, lung density by mass
    conservation, the ``gap`` voxels (see :func:`sliding_state`) filled with the body's unlabelled tissue (fat)."""
    img = sample(fbct, ddf, order=1)
    lung = np.isin(sample(label, ddf, order=0), LUNG_IDS)
    density = np.clip(det_jacobian(ddf), 0.5, 2.0)
    img[lung] = (img[lung] + 1000.0) * density[lung] - 1000.0
    if gap is not None:
        img[gap] = HU["fat"]
    return img


def sliding_state(
    label: np.ndarray, fields: dict, wall: np.ndarray, order
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ddf, label, gap)`` of one breathing state: every organ with a field of its own shows only where that field
    brought it. Where an organ moved away (the liver under a descending diaphragm) the chest wall's field would
    sample the organ a second time, a static copy that breaks its rigid motion and grows its volume; those ``gap``
    voxels become unlabelled body tissue instead, with the wall's motion (``custom.synthetic.abdomen`` does the same).
    """
    ddf, owner = compose_sliding(label, fields, wall, order, return_owner=True)
    state = sample(label, ddf, order=0).astype(np.uint8)
    gap = (owner == 0) & np.isin(state, list(fields))
    state[gap] = 0
    return ddf, state, gap


def cone_beam_pair(label, fbct, fields: dict, wall, order, amplitude: float, rng: np.random.Generator):
    """``(ddf, CBCT label, CBCT image, field of view)`` of one cone-beam scan of the moving anatomy.

    ``fields``/``wall``/``order``: the thoracic breathing fields (``breathing_fields``) and their priority; the
    abdominal organs are added here. ``ddf`` is the exact CBCT -> FBCT displacement of the mean breathing state.
    """
    shape = label.shape
    fields = {**fields, **abdomen_fields(label, fields)}
    order = list(order) + [v[0] for v in ORGANS.values() if v[0] in fields]
    ddf, cb_label, gap = sliding_state(label, fields, wall, order)
    img = np.zeros(shape, np.float32)
    for s in PHASES:  # breathing blur: the scan averages the amplitudes it saw
        state = (ddf, cb_label, gap) if s == 1.0 else sliding_state(label, scaled(fields, wall, s), wall, order)
        img += render_state(label, fbct, state[0], state[2]) / len(PHASES)
    g = identity_grid(shape)
    X, Y, Z = shape
    radius = 0.40 * X
    r = np.sqrt((g[0] - X / 2) ** 2 + (g[1] - Y / 2) ** 2) / radius
    fov = (r <= 1.0) & (np.abs(g[2] - Z / 2) <= 0.45 * Z)
    cupping = rng.uniform(0.08, 0.15)
    img = (img + 1000.0) * (1.0 - cupping * (1.0 - np.clip(r, 0, 1) ** 2)) - 1000.0
    theta = np.arctan2(g[1] - Y / 2, g[0] - X / 2)
    m, phase0, strength = int(rng.integers(18, 37)), rng.uniform(0, 2 * np.pi), rng.uniform(15.0, 35.0)
    img += strength * np.clip(r, 0, 1) * np.cos(m * theta + phase0 + 0.05 * g[2])
    noise = gaussian_filter(rng.standard_normal(shape), 1.0)
    img += rng.uniform(25.0, 45.0) * noise / max(noise.std(), 1e-8)
    gain, offset = rng.uniform(0.8, 0.9), rng.uniform(40.0, 80.0)  # uncalibrated CBCT numbers
    cb = np.where(fov, gain * img + offset, -1000.0).astype(np.float32)
    return ddf, cb_label, cb, fov
