"""MIND-SSC descriptors (Heinrich et al. 2013, self-similarity context) and the MIND-SSC similarity loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from custom.utils import reduce


def ssc_offset_pairs(spatial_dims: int = 3) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of 6-neighbourhood (2D: 4-neighbourhood) offsets at distance sqrt(2): 12 pairs in 3D, 4 in 2D."""
    neighbours = []
    for axis in range(spatial_dims):
        for sign in (-1, 1):
            o = [0] * spatial_dims
            o[axis] = sign
            neighbours.append(tuple(o))
    return [(p, q) for p, q in itertools.combinations(neighbours, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2]


def _pair_differences(padded: torch.Tensor, shape, dilation: int) -> torch.Tensor:
    """``(B, P, *S)`` with channel k = I(x + d p_k) - I(x + d q_k), read from ``padded`` (``I`` padded by ``d``).

    Plain shifted slices, so the differences are exact on every device (a convolution would run in TF32 on
    recent GPUs and lose about 3 decimal digits).
    """
    out = []
    for p, q in ssc_offset_pairs(len(shape)):
        a = tuple(slice(dilation * (1 + c), dilation * (1 + c) + n) for c, n in zip(p, shape))
        b = tuple(slice(dilation * (1 + c), dilation * (1 + c) + n) for c, n in zip(q, shape))
        out.append(padded[(slice(None), slice(None)) + a] - padded[(slice(None), slice(None)) + b])
    return torch.cat(out, 1)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps_ratio: float = 1e-3) -> torch.Tensor:
    """MIND-SSC descriptor of a single-channel image.

    Args:
        image: ``(B, 1, *S)``, 2D or 3D.
        radius: patch radius r; patch distances are averaged over a (2r+1)^d box.
        dilation: distance (voxels) between the centre and the neighbours that form the pairs.
        eps_ratio: the per-voxel variance estimate is clamped to [eps_ratio, 1/eps_ratio] x its image mean.

    Returns:
        ``(B, P, *S)`` descriptors in (0, 1], P = 12 in 3D (4 in 2D). Borders use replicate padding.
    """
    if image.ndim not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (B, 1, H, W[, D]), got {tuple(image.shape)}")
    spatial = image.ndim - 2
    pool = F.avg_pool3d if spatial == 3 else F.avg_pool2d
    image = image.float()
    padded = F.pad(image, (dilation,) * (2 * spatial), mode="replicate")
    diff = _pair_differences(padded, image.shape[2:], dilation)
    ssd = pool(F.pad(diff * diff, (radius,) * (2 * spatial), mode="replicate"), 2 * radius + 1, stride=1)
    mind = ssd - ssd.amin(1, keepdim=True)
    var = mind.mean(1, keepdim=True)
    var_mean = var.flatten(1).mean(1).view((-1,) + (1,) * (spatial + 1))
    var = torch.clamp(var, var_mean * eps_ratio, var_mean / eps_ratio).clamp_min(1e-12)
    return torch.exp(-mind / var)


class MINDSSCLoss(_Loss):
    """Mean squared difference of MIND-SSC descriptors: ``forward(pred, target)``, both ``(B, 1, *S)``.

    Modality independent (used for FBCT -> CBCT). ``radius``/``dilation`` as in :func:`mind_ssc`.
    ``reduction="none"`` returns the squared descriptor differences ``(B, P, *S)``.
    """

    def __init__(self, radius: int = 1, dilation: int = 2, reduction: str = "mean") -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.radius = radius
        self.dilation = dilation

    def descriptors(self, image: torch.Tensor) -> torch.Tensor:
        """MIND-SSC descriptors ``(B, P, *S)`` of ``image`` ``(B, 1, *S)`` with this loss's radius and dilation."""
        return mind_ssc(image, self.radius, self.dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reduce((self.descriptors(pred) - self.descriptors(target)) ** 2, self.reduction)
