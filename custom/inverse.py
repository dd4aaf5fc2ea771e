"""Inverse of a displacement by fixed-point iteration in world space, on the device the field lives on.

A Learn2Reg displacement ``u`` ``(3, *S_f)`` on the fixed grid (affine ``A_f``) maps fixed voxel ``x`` to moving voxel
``x + u(x)`` of the moving file (affine ``A_m``). In world space (mm) that is ``T(p) = p + D(p)`` with
``D = A_m (x + u(x)) - A_f x``. The inverse maps moving world points ``q`` back: ``p = q - D(p)``, solved per point by
``p <- q - D(p)`` (``D`` sampled linearly), which converges where ``T`` is a contraction-perturbed identity (no folds,
``|grad D| < 1``). The result is the Learn2Reg form of the reversed pair: on the moving grid, indexing the fixed file,
``v(y) = A_f^{-1} p(A_m y) - y``.

Where the inverse does not exist the report says so: moving points whose preimage falls outside the fixed image
(dis-occlusion at the field of view), lies in folded voxels (``det J <= 0``), or where the iteration does not settle
(sliding borders can leave a gap that no fixed point maps to).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from custom.geometry import as_affine
from custom.metrics import jacobian_determinant


def _lin(affine: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(as_affine(affine), dtype=torch.float64, device=device)
    return a[:3, :3], a[:3, 3]


def _sample(field: torch.Tensor, vox: torch.Tensor) -> torch.Tensor:
    """``field`` ``(C, *S)`` at voxel coordinates ``vox`` ``(N, 3)`` (linear, border clamp) -> ``(N, C)``."""
    shape = field.shape[1:]
    norm = torch.stack([vox[:, d] * 2 / max(shape[d] - 1, 1) - 1 for d in range(3)], -1).flip(-1)
    out = F.grid_sample(
        field[None].float(), norm.float().view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
        align_corners=True,
    )  # fmt: skip
    return out.view(field.shape[0], -1).T.double()


def world_displacement(disp: torch.Tensor, fixed_affine, moving_affine) -> torch.Tensor:
    """``D`` ``(3, *S_f)`` mm (RAS world): where each fixed voxel's point goes, minus where it is."""
    lf, tf = _lin(fixed_affine, disp.device)
    lm, tm = _lin(moving_affine, disp.device)
    shape = disp.shape[1:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, device=disp.device, dtype=torch.float64) for n in shape],
                                     indexing="ij")).reshape(3, -1)  # fmt: skip
    moved = lm @ (idx + disp.double().reshape(3, -1)) + tm[:, None]
    return (moved - (lf @ idx + tf[:, None])).reshape((3,) + tuple(shape)).float()


def fixed_voxel_displacement(disp: torch.Tensor, fixed_affine, moving_affine) -> torch.Tensor:
    """``E = A_f^{-1} D`` ``(3, *S_f)``: the world displacement in fixed-voxel units (``x + E(x)`` is where fixed voxel
    ``x`` goes, as a fixed-grid voxel coordinate), float32 on ``disp``'s device."""
    lf, _ = _lin(fixed_affine, disp.device)
    D = world_displacement(disp, fixed_affine, moving_affine)
    return (torch.linalg.inv(lf).float() @ D.reshape(3, -1)).reshape(D.shape)


def invert_points(
    disp: torch.Tensor,
    fixed_affine,
    moving_affine,
    points: torch.Tensor,
    iterations: int = 50,
    tolerance: float = 1e-2,
    field: torch.Tensor | None = None,
    check_every: int = 5,
    settled: float = 5e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed voxel coordinates ``(N, 3)`` of moving voxel coordinates ``points`` ``(N, 3)`` under the inverse of
    ``disp``, and the residual ``|T(p) - q|`` (mm) of each.

    The iteration runs in fixed-voxel units, ``x <- x_q - E(x)`` (:func:`fixed_voxel_displacement`; ``field`` if
    already computed), one linear sample per step, and stops when fewer than ``settled`` of the points still move by
    more than ``tolerance`` (mm), or when that share no longer falls (by a tenth between two checks): the points left
    lie in folds or in the gaps sliding opens, which have no preimage to settle on, and their residual says so.
    Checked every ``check_every`` steps (one device sync per check).
    """
    E = fixed_voxel_displacement(disp, fixed_affine, moving_affine) if field is None else field
    lf, tf = _lin(fixed_affine, disp.device)
    lm, tm = _lin(moving_affine, disp.device)
    to_fixed = torch.linalg.inv(lf)
    x_q = ((points.to(disp.device).double() @ lm.T + tm - tf) @ to_fixed.T).float()  # q in fixed voxels
    shape = torch.tensor(E.shape[1:], device=E.device, dtype=torch.float32)
    scale = 2 / (shape - 1).clamp(min=1)
    # normalised grid_sample coordinates (x, y, z reversed) of the field's voxels: n = x * scale - 1
    E_norm = (E * scale.view(3, 1, 1, 1)).flip(0)[None]
    n_q = (x_q * scale - 1).flip(1).view(1, -1, 1, 1, 3)
    n = n_q.clone()
    voxel_mm = float(lf.norm(dim=0).max())
    unsettled = 1.0
    for k in range(int(iterations)):
        step = n_q - F.grid_sample(E_norm, n, mode="bilinear", padding_mode="border", align_corners=True).permute(
            0, 2, 3, 4, 1
        )
        if (k + 1) % check_every == 0 or k + 1 == int(iterations):
            moved = ((step - n).flip(-1).view(-1, 3) / scale).abs().amax(1) * voxel_mm
            n = step
            share = float((moved > tolerance).float().mean())
            if share < settled or share > 0.9 * unsettled:
                break
            unsettled = share
        else:
            n = step
    x = ((n.view(-1, 3).flip(1) + 1) / scale).double()
    residual = ((x + _sample(E, x) - x_q.double()) @ lf.T).norm(dim=1)
    return x, residual


def invert_displacement(
    disp: torch.Tensor,
    fixed_affine,
    moving_affine,
    moving_shape: Sequence[int],
    iterations: int = 50,
    tolerance: float = 1e-2,
    chunk: int = 2**21,
) -> tuple[torch.Tensor, dict]:
    """Inverse of a Learn2Reg displacement, in the Learn2Reg form of the reversed pair, and a report.

    Args:
        disp: ``(3, *S_f)`` voxels (Learn2Reg form on the fixed grid), on the device to compute on.
        fixed_affine, moving_affine: the two files' 4x4 affines (mm).
        moving_shape: the moving grid, on which the inverse is returned.
        iterations: most fixed-point steps; tolerance: a point has settled when it moves less than this (mm) per
            step (see :func:`invert_points`).
        chunk: points processed at once (bounds memory).

    Returns:
        ``(inverse (3, *moving_shape), report)``; the report (:func:`inverse_report`) gives the inverse-consistency
        error and where the inverse does not exist.
    """
    disp = disp.float()
    E = fixed_voxel_displacement(disp, fixed_affine, moving_affine)
    shape = tuple(int(n) for n in moving_shape)
    n = int(np.prod(shape))
    inv = torch.empty((3, n), dtype=torch.float32, device=disp.device)
    residual = torch.empty(n, dtype=torch.float64, device=disp.device)
    for start in range(0, n, chunk):
        flat = torch.arange(start, min(start + chunk, n), device=disp.device)
        y = torch.stack(torch.unravel_index(flat, shape), 1).double()
        x, r = invert_points(disp, fixed_affine, moving_affine, y, iterations, tolerance, field=E)
        inv[:, start : start + len(flat)] = (x - y).T.float()
        residual[start : start + len(flat)] = r
    inv = inv.view((3,) + shape)
    return inv, inverse_report(disp, inv, fixed_affine, moving_affine, residual.view(shape))


def physical_det(disp: torch.Tensor, fixed_affine, moving_affine, border: int = 0) -> torch.Tensor:
    """``det J`` ``(*S_f)`` of the world map ``T`` (orientation-preserving > 0) from the voxel map ``x + u(x)``: the
    voxel Jacobian's determinant times ``det(A_m) / det(A_f)``'s sign (an LPS-stored file flips it)."""
    sign = float(
        np.sign(np.linalg.det(as_affine(moving_affine)[:3, :3]) * np.linalg.det(as_affine(fixed_affine)[:3, :3]))
    )
    return sign * jacobian_determinant(disp[None].float(), border=border)[0]


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (nearest rank) of a 1-D tensor of any length (``torch.quantile`` stops at 2**24)."""
    k = min(values.numel(), max(1, int(np.ceil(q / 100 * values.numel()))))
    return float(torch.kthvalue(values.flatten().double().cpu(), k).values)


def inverse_report(disp, inv, fixed_affine, moving_affine, residual: torch.Tensor | None = None) -> dict:
    """Inverse-consistency of a field ``disp`` (fixed grid) and its inverse ``inv`` (moving grid), in mm.

    - ``ic_mean_mm``, ``ic_p95_mm``: ``|A_f (x + u(x) + v(x + u(x))) - A_f x|`` (forward, then back) over the fixed
      voxels where ``det J > 0`` whose image lies inside the moving grid;
    - ``folded_percent``: fixed voxels with ``det J <= 0`` (no inverse there);
    - ``outside_percent``: fixed voxels mapped outside the moving grid (their inverse cannot be stored);
    - ``unresolved_percent`` (with ``residual``): moving voxels whose preimage did not settle within 0.5 of a fixed
      voxel, or fell outside the fixed image: dis-occlusion, folds and sliding gaps.
    """
    fixed_affine, moving_affine = as_affine(fixed_affine), as_affine(moving_affine)
    shape_f, shape_m = disp.shape[1:], inv.shape[1:]
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, device=disp.device, dtype=torch.float64) for n in shape_f],
                                     indexing="ij")).reshape(3, -1).T  # fmt: skip
    y = idx + disp.double().reshape(3, -1).T
    inside = ((y >= 0) & (y <= torch.tensor(shape_m, device=y.device, dtype=y.dtype) - 1)).all(1)
    back = y + _sample(inv, y)
    lf = torch.as_tensor(fixed_affine[:3, :3], device=disp.device)
    err = ((back - idx) @ lf.T).norm(dim=1)
    det = physical_det(disp, fixed_affine, moving_affine).reshape(-1)
    valid = (det > 0) & inside
    e = err[valid]
    report = {
        "ic_mean_mm": float(e.mean()) if e.numel() else float("nan"),
        "ic_p95_mm": percentile(e, 95) if e.numel() else float("nan"),
        "folded_percent": float((det <= 0).double().mean() * 100),
        "outside_percent": float((~inside).double().mean() * 100),
    }
    if residual is not None:
        voxel = float(np.linalg.norm(fixed_affine[:3, :3], axis=0).min())
        p = torch.stack(torch.meshgrid(*[torch.arange(n, device=disp.device, dtype=torch.float64) for n in shape_m],
                                       indexing="ij")).reshape(3, -1).T + inv.double().reshape(3, -1).T  # fmt: skip
        out = ~((p >= -0.5) & (p <= torch.tensor(shape_f, device=p.device, dtype=p.dtype) - 0.5)).all(1)
        bad = (residual.reshape(-1) > 0.5 * voxel) | out
        report["unresolved_percent"] = float(bad.double().mean() * 100)
    return report


def format_report(report: dict) -> str:
    """One line for the command line."""
    text = (
        f"inverse consistency: mean {report['ic_mean_mm']:.3f} mm, 95th percentile {report['ic_p95_mm']:.3f} mm "
        f"(voxels with det J > 0); folded {report['folded_percent']:.2f} %, mapped outside the moving image "
        f"{report['outside_percent']:.2f} %"
    )
    if "unresolved_percent" in report:
        text += (
            f"; moving voxels without a preimage (outside, folds, sliding gaps) {report['unresolved_percent']:.2f} %"
        )
    return text
