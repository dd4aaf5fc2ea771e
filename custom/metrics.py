"""Registration metrics as plain functions (torch, CPU or CUDA): Dice %, HD95 mm, Jacobian / SDlogJ, TRE mm.

Conventions follow Learn2Reg's evaluation (and are listed in ``custom.evaluation.CONVENTIONS``): a label absent from
the fixed or the moving map scores NaN; HD95 is the larger of the two directed 95th-percentile surface distances; the
Jacobian uses central differences of the displacement plus identity and, by default, drops a 2-voxel border on every
axis (configurable per axis: 0 on the through-plane axis of thick-slice data keeps all slices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import compute_hausdorff_distance
from monai.networks.blocks import Warp


def _as_map(label) -> torch.Tensor:
    """An integer label map ``(X, Y, Z)`` of ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` (rounded)."""
    label = torch.as_tensor(label)
    if label.ndim == 3:
        label = label[None, None]
    elif label.ndim == 4:
        label = label[None]
    label = label[0, 0]
    return (label.round() if label.is_floating_point() else label).long()


def _binned(label: torch.Tensor, top: int) -> torch.Tensor:
    """``label`` with every value outside ``0 .. top - 1`` moved to one spare bin, ``top`` (for ``bincount``)."""
    return torch.where((label >= 0) & (label < top), label, top)


def _counts(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(L,)`` int64: voxels of each id in the map ``label`` (from :func:`_as_map`), one pass (``bincount``)."""
    ids = torch.as_tensor(list(label_ids), dtype=torch.long, device=label.device)
    top = int(ids.max()) + 1 if len(ids) else 1
    return torch.bincount(_binned(label, top).reshape(-1), minlength=top + 1)[ids]


def _missing(fixed_counts: torch.Tensor, moving_label, label_ids) -> torch.Tensor:
    """``(L,)`` bool: ids with no voxel in the fixed map (``fixed_counts``, from :func:`_counts`) or, if given, in the
    moving map."""
    missing = fixed_counts == 0
    if moving_label is not None:
        missing = missing | (_counts(_as_map(moving_label), label_ids) == 0)
    return missing


def dice_per_label(warped_label, fixed_label, label_ids: Sequence[int], moving_label=None) -> torch.Tensor:
    """Dice in % per label id, ``(L,)``; NaN where the label is absent in the fixed (or moving) map.

    Label maps ``(X, Y, Z)``, ``(1, X, Y, Z)`` or ``(1, 1, X, Y, Z)`` with integer ids (warped with nearest neighbour).
    MONAI's ``compute_dice`` (``ignore_empty=True``) from voxel counts, without one-hot stacks: a 390 x 280 x 300 pair
    with 19 labels took 17 s and several GiB that way.
    """
    pred, gt = _as_map(warped_label), _as_map(fixed_label)
    both = torch.where(pred == gt, gt, -1)  # the voxels where the two maps agree, with their id
    tp, p, g = (_counts(m, label_ids) for m in (both, pred, gt))
    dice = (200.0 * tp.double() / (p + g).clamp_min(1).double()).float()
    dice[_missing(g, moving_label, label_ids)] = float("nan")
    return dice


def mean_dice(warped_label, fixed_label, label_ids: Sequence[int]) -> float:
    """Mean Dice in % of :func:`dice_per_label` over the ids present in ``fixed_label``; label maps as there, torch
    or numpy."""
    dice = dice_per_label(torch.as_tensor(warped_label), torch.as_tensor(fixed_label), label_ids)
    return float(torch.nanmean(dice))


def _extent(label: torch.Tensor, top: int) -> torch.Tensor:
    """``(top, D, 2)``: per id below ``top`` the first and last index along each axis where it occurs (``[n, -1]``
    where it does not), one ``bincount`` per axis."""
    out = []
    values = _binned(label, top)
    for a, n in enumerate(label.shape):
        coord = torch.arange(n, device=label.device).view([-1 if d == a else 1 for d in range(label.ndim)])
        seen = torch.bincount((values * n + coord).reshape(-1), minlength=(top + 1) * n).view(top + 1, n)[:top] > 0
        index = torch.arange(n, device=label.device)
        first = torch.where(seen, index, n).amin(1)
        last = torch.where(seen, index, -1).amax(1)
        out.append(torch.stack([first, last], 1))
    return torch.stack(out, 1)


def hd95_per_label(warped_label, fixed_label, label_ids: Sequence[int], spacing=None, moving_label=None):
    """95th percentile Hausdorff distance in mm per label id, ``(L,)`` (MONAI, spacing-aware); NaN if absent.

    Each label is scored by MONAI's ``compute_hausdorff_distance`` on the box that holds it in both maps, one voxel
    wider: MONAI crops each class to that box itself, so the values are the same as on the whole grid, without a
    one-hot stack of every label over it.
    """
    pred, gt = _as_map(warped_label), _as_map(fixed_label)
    ids = [int(i) for i in label_ids]
    absent = _missing(_counts(gt, ids), moving_label, ids) | (_counts(pred, ids) == 0)
    hd = torch.full((len(ids),), float("nan"), device=pred.device)
    if not len(ids) or bool(absent.all()):
        return hd
    sp = None if spacing is None else [float(s) for s in spacing]
    top = max(ids) + 1
    ext_p, ext_g = _extent(pred, top), _extent(gt, top)
    lo = torch.minimum(ext_p[..., 0], ext_g[..., 0]).tolist()
    hi = torch.maximum(ext_p[..., 1], ext_g[..., 1]).tolist()
    for k, i in enumerate(ids):
        if bool(absent[k]):
            continue
        box = tuple(slice(max(a - 1, 0), min(b + 2, n)) for a, b, n in zip(lo[i], hi[i], pred.shape))
        p, g = ((m[box] == i)[None, None].float() for m in (pred, gt))
        hd[k] = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)[0, 0].float()
    return hd


def _border(border: int | Sequence[int], dims: int = 3) -> list[int]:
    out = [int(border)] * dims if isinstance(border, (int, float)) else [int(b) for b in border]
    if len(out) != dims or min(out) < 0:
        raise ValueError(f"border must be one non-negative int or one per axis ({dims}), got {border}")
    return out


def jacobian_determinant(ddf: torch.Tensor, border: int | Sequence[int] = 2) -> torch.Tensor:
    """det J of ``x + u(x)`` for ``ddf`` ``(B, 3, X, Y, Z)`` (voxels) -> ``(B, X-2bx, Y-2by, Z-2bz)``.

    Central differences inside the grid (one-sided at its faces, as ``numpy.gradient``); ``border`` voxels are
    dropped per axis (one int for all axes or one per axis). ``border=2`` is what Learn2Reg's evaluation computes;
    use 0 on the through-plane axis of thick-slice data (16 cine-MR slices would otherwise lose 4).
    Always float32, outside autocast.
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"jacobian_determinant expects a 3D ddf (B, 3, X, Y, Z), got {tuple(ddf.shape)}")
    b = _border(border)
    if any(n - 2 * k < 1 for n, k in zip(ddf.shape[2:], b)):
        raise ValueError(f"border {b} leaves nothing of a grid of shape {tuple(ddf.shape[2:])}")
    u = ddf.float()
    # grads[k][:, c] = d u_c / d x_k
    grads = [torch.gradient(u, dim=2 + k)[0] if u.shape[2 + k] > 1 else torch.zeros_like(u) for k in range(3)]
    crop = (slice(None),) + tuple(slice(k, n - k) for k, n in zip(b, u.shape[2:]))
    j = [[grads[k][:, c][crop] + (1.0 if c == k else 0.0) for c in range(3)] for k in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[1][0] * (j[0][1] * j[2][2] - j[0][2] * j[2][1])
        + j[2][0] * (j[0][1] * j[1][2] - j[0][2] * j[1][1])
    )


def jacobian_stats(ddf: torch.Tensor, det_offset: float = 0.0, border: int | Sequence[int] = 2) -> dict:
    """SDlogJ and folding of ``ddf`` ``(1, 3, X, Y, Z)``.

    Returns ``{"sdlogj", "neg_jac_count", "neg_jac_percent"}``: std of log(clip(det J + det_offset, 1e-9, 1e9)) and
    the count / % of voxels with det J <= 0, over the grid less ``border`` voxels per axis. ``det_offset=3``
    reproduces the +3 that Learn2Reg's published evaluation script (v2) adds before the clip; the default 0 is the
    textbook SDlogJ.
    """
    det = jacobian_determinant(ddf, border)
    log_det = torch.log((det + det_offset).clamp(1e-9, 1e9))
    neg = (det <= 0).sum()
    return {
        "sdlogj": float(log_det.std(unbiased=False)),
        "neg_jac_count": int(neg),
        "neg_jac_percent": float(neg) * 100.0 / det.numel(),
    }


def warp_labels(label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Label map ``(1, 1, *S)`` warped by ``ddf`` ``(1, D, *S)`` with nearest neighbour (border clamp): the one warp
    every label metric uses."""
    return Warp(mode="nearest", padding_mode="border")(label.float(), ddf.float())


def sample_field(ddf: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``ddf`` ``(1, D, *S)`` at voxel coordinates ``points`` ``(K, D)`` -> ``(K, D)``."""
    spatial = ddf.shape[2:]
    pts = points.to(ddf.device, torch.float32)
    norm = torch.stack([pts[:, d] * 2 / max(spatial[d] - 1, 1) - 1 for d in range(len(spatial))], -1)
    grid = norm.flip(-1).view((1, -1) + (1,) * (len(spatial) - 1) + (len(spatial),))
    out = F.grid_sample(ddf.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(ddf.shape[1], -1).t()


def tre_mm(ddf: torch.Tensor, fixed_points, moving_points, spacing=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Target registration error in mm per keypoint, ``(K,)``.

    ``fixed_points``/``moving_points`` ``(K, 3)`` voxel coordinates (0-based, array index order); the fixed point
    is moved by the displacement sampled at it (linear interpolation) and compared with the moving point,
    scaled by ``spacing`` (moving image voxel size), as Learn2Reg does.
    """
    fp = torch.as_tensor(fixed_points, dtype=torch.float32, device=ddf.device)
    mp = torch.as_tensor(moving_points, dtype=torch.float32, device=ddf.device)
    if fp.shape != mp.shape or fp.ndim != 2 or fp.shape[1] != ddf.shape[1]:
        raise ValueError(f"keypoints must both be (K, {ddf.shape[1]}), got {tuple(fp.shape)} and {tuple(mp.shape)}")
    sp = torch.as_tensor([float(s) for s in spacing], device=ddf.device)
    return torch.linalg.norm((fp + sample_field(ddf, fp) - mp) * sp, dim=1)
