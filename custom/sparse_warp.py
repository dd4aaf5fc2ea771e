"""Warp a region stack only where it can differ from its background: the sparse step of the iterative solver.

A region's moving stack (the MIND-SSC descriptors of the masked moving image, then its mask) is constant away from the
region: there it holds the descriptors of a flat patch and a zero mask, its *background*. A voxel whose bilinear
sample falls where the stack and all its neighbours hold the background warps to the background, with zero gradient,
whatever the field. So the loss of :class:`~custom.iterative.IterativeSegReg` (similarity + Dice, both sums over
voxels) is a constant over those voxels plus a sum over the others, the *active* points. For a region whose box is
most of the grid (the lungs, the rib cage of a thorax pair) most voxels are not active, and warping only the active
ones gives the same loss and gradient (to float rounding) for a fraction of the ``grid_sample`` work.

Shapes: a batch of ``G`` regions padded to ``S`` (``N`` voxels), stacks ``(G, C, *S)``, grids ``(G, *S, D)``
(``grid_sample`` coordinates, ``align_corners=True``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


def background_of(features: Callable[[torch.Tensor], torch.Tensor] | None, n_masks: int, like: torch.Tensor):
    """``(C,)``: what a region's moving stack holds far from the region: ``features`` of a flat zero patch (MIND-SSC:
    1 in every channel; the image itself: 0), then 0 for each of ``n_masks`` mask channels. ``like`` gives the
    spatial dimensionality, dtype and device. ``features=None``: masks only."""
    nd = like.ndim - 2
    parts = []
    if features is not None:
        flat = features(like.new_zeros((1, 1) + (7,) * nd))
        parts.append(flat[(0, slice(None)) + (3,) * nd])
    parts.append(like.new_zeros(n_masks))
    return torch.cat(parts)


def background_interior(stack: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``(G, 1, *S)``, 1 where the voxel and its ``3^d`` neighbours all hold ``background`` ``(C,)`` in every channel
    of ``stack`` ``(G, C, *S)``; 0 on the outermost layer of the grid (a sample there can read the zero padding)."""
    nd = stack.ndim - 2
    differs = (stack != background.view((1, -1) + (1,) * nd)).any(1, keepdim=True).float()
    pool = F.max_pool3d if nd == 3 else F.max_pool2d
    return 1.0 - pool(F.pad(differs, (1, 1) * nd, value=1.0), 3, stride=1)


def active_points(interior: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``(G, N)`` bool: voxels whose sample position in ``grid`` ``(G, *S, D)`` is not in ``interior`` ``(G, 1, *S)``.

    The bilinear corners of a position p lie within one voxel of its nearest voxel round(p) on every axis, so a
    position whose nearest voxel is interior reads the background only."""
    near = F.grid_sample(interior, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return near.flatten(1) < 0.5


def gather_points(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``(G, K)`` of each element's active voxels (``active`` ``(G, N)`` bool), padded with index 0 to
    the largest count ``K``, and ``(G, K)`` bool, True for the real ones."""
    g, n = active.shape
    rows, cols = active.nonzero(as_tuple=True)
    counts = active.sum(1)
    k = int(counts.max()) if g else 0
    pos = torch.arange(rows.numel(), device=active.device) - (counts.cumsum(0) - counts)[rows]
    index = torch.zeros((g, k), dtype=torch.long, device=active.device)
    real = torch.zeros((g, k), dtype=torch.bool, device=active.device)
    index[rows, pos] = cols
    real[rows, pos] = True
    return index, real


def sample_points(stack: torch.Tensor, grid: torch.Tensor, index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(G, C, K)`` of ``stack`` ``(G, C, *S)`` at the grid positions ``index`` ``(G, K)``
    (0 where ``real`` is False); differentiable in ``grid`` ``(G, *S, D)``."""
    g, d = grid.shape[0], grid.shape[-1]
    flat = grid.reshape(g, -1, d)
    points = flat.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
    points = torch.where(real.unsqueeze(-1), points, points.new_full((), -3.0))  # padding: far outside, samples 0
    points = points.view((g,) + (1,) * (d - 1) + (-1, d))
    out = F.grid_sample(stack, points, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(g, stack.shape[1], -1)


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(G, C, *S)`` at the flat voxel indices ``index`` ``(G, K)`` -> ``(G, C, K)``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.gather(2, index.unsqueeze(1).expand(-1, x.shape[1], -1))


def dice_from_sums(dice: DiceLoss, tp: torch.Tensor, pred_sum: torch.Tensor, target_sum: torch.Tensor):
    """MONAI ``DiceLoss`` per sample and channel from its sums (``(G, C)`` each): ``1 - (2 tp + smooth_nr) /
    (sum pred + sum target + smooth_dr)``, the loss of a :func:`linear_dice` ``DiceLoss``."""
    return 1.0 - (2.0 * tp + dice.smooth_nr) / (pred_sum + target_sum + dice.smooth_dr)


def linear_dice(dice) -> bool:
    """Whether ``dice`` is a MONAI ``DiceLoss`` whose value per sample is :func:`dice_from_sums` of its inputs (no
    activation, one-hot conversion, squared or soft-label terms, Jaccard, ignored index, class weights or batch
    reduction)."""
    if type(dice) is not DiceLoss:
        return False
    off = ("sigmoid", "softmax", "squared_pred", "jaccard", "soft_label", "batch", "to_onehot_y")
    return (
        not any(getattr(dice, name, False) for name in off)
        and getattr(dice, "other_act", None) is None
        and getattr(dice, "ignore_index", None) is None
        and getattr(dice, "class_weight", None) is None
        and bool(dice.include_background)
    )
