"""MIND-SSC descriptors (Heinrich et al. 2013, self-similarity context) and the MIND-SSC similarity loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from custom.flags import optional_float
from custom.utils import box_extreme, reduce


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


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^d`` box of ``x`` ``(B, C, *S)`` padded by ``radius`` on every side -> ``(B, C, *s)``,
    ``s = S - 2r``: ``avg_pool`` with stride 1, as sums of shifted slices one axis at a time (on a CPU 2 to 3 times
    faster than pooling, which visits the whole box per voxel; the same values to float rounding)."""
    out = x
    for d in range(2, x.ndim):
        n = out.shape[d] - 2 * radius
        total = out.narrow(d, 0, n)
        for k in range(1, 2 * radius + 1):
            total = total + out.narrow(d, k, n)
        out = total
    return out / float((2 * radius + 1) ** (x.ndim - 2))


def patch_distances(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """``(B, P, *S)`` patch distances of the SSC pairs: squared pair differences averaged over a (2r+1)^d box."""
    spatial = image.ndim - 2
    padded = F.pad(image.float(), (dilation,) * (2 * spatial), mode="replicate")
    diff = _pair_differences(padded, image.shape[2:], dilation)
    return box_mean(F.pad(diff * diff, (radius,) * (2 * spatial), mode="replicate"), radius)


def _second_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    return x.narrow(dim, 2, n - 2) - 2 * x.narrow(dim, 1, n - 2) + x.narrow(dim, 0, n - 2)


def grow_one_voxel(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, C, *S)`` mask grown by one voxel (the ``3^d`` box), as max-pooling with kernel 3 and padding 1 gives,
    one axis at a time on bytes (:func:`~custom.utils.box_extreme`): a quarter of the memory traffic of pooling a float
    copy, and no unfolded windows."""
    return box_extreme(mask, largest=True)


def noise_variance(image: torch.Tensor) -> torch.Tensor:
    """Variance of white noise in ``image`` ``(B, 1, *S)``, per batch element ``(B,)`` (intensity units squared).

    Immerkaer's estimator (1996), made robust: the image is filtered with the separable second-difference mask
    [1 -2 1] x [1 -2 1] in each plane of two axes (ramps and smooth shading give 0, white noise of std s gives std
    6 s), and the median absolute response is read as 0.6745 x 6 s; the smallest estimate over the planes is kept (a
    thick-slice axis mixes anatomy into its planes). Voxels next to the image's lowest value are left out: clipped air,
    scanner padding and the outside of a region mask carry no noise. A noise-free image gives about 0.
    """
    if image.ndim not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"noise_variance expects (B, 1, H, W[, D]), got {tuple(image.shape)}")
    image = image.float()
    floor = image.flatten(1).amin(1).view((-1,) + (1,) * (image.ndim - 1))
    near_floor = grow_one_voxel(image <= floor)
    dims = [d for d in range(2, image.ndim) if image.shape[d] >= 3]
    estimates = []
    for a, b in itertools.combinations(dims, 2):
        response = _second_difference(_second_difference(image, a), b).abs()
        keep = ~near_floor.narrow(a, 1, image.shape[a] - 2).narrow(b, 1, image.shape[b] - 2)
        per_item = []
        for row, ok in zip(response.flatten(1), keep.flatten(1)):
            values = row[ok]
            per_item.append(values.median() if values.numel() else row.new_zeros(()))
        estimates.append(torch.stack(per_item) / (0.6745 * 6.0))
    if not estimates:
        return image.new_zeros(image.shape[0])
    return torch.stack(estimates).amin(0) ** 2


def structure_weight(
    image: torch.Tensor, noise_var: torch.Tensor, gate: float = 2.0, radius: int = 1, dilation: int = 2
) -> torch.Tensor:
    """``(B, 1, *S)`` weight in [0, 1]: 0 where ``image`` is flat up to its noise, 1 where it has structure.

    The mean SSC patch distance of pure noise of variance ``noise_var`` ``(B,)`` is ``2 noise_var``; the weight
    ramps linearly from 0 at ``gate`` times that to 1 at ``2 gate`` times that. Exactly constant patches (the outside
    of a region mask, clipped air, padding) carry no noise and keep the weight 1: moving content warped there is a
    real mismatch.
    """
    level = patch_distances(image, radius, dilation).mean(1, keepdim=True)
    threshold = (2.0 * gate * noise_var).view((-1,) + (1,) * (image.ndim - 1))
    weight = ((level - threshold) / threshold.clamp_min(1e-12)).clamp(0.0, 1.0)
    return torch.where(level <= 1e-12, torch.ones_like(weight), weight)


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
    ssd = patch_distances(image, radius, dilation)
    mind = ssd - ssd.amin(1, keepdim=True)
    var = mind.mean(1, keepdim=True)
    var_mean = var.flatten(1).mean(1).view((-1,) + (1,) * (spatial + 1))
    var = torch.clamp(var, var_mean * eps_ratio, var_mean / eps_ratio).clamp_min(1e-12)
    return torch.exp(-mind / var)


class MINDSSCLoss(_Loss):
    """Mean squared difference of MIND-SSC descriptors: ``forward(pred, target)``, both ``(B, 1, *S)``.

    Modality independent (used for FBCT -> CBCT). ``radius``/``dilation`` as in :func:`mind_ssc`.
    ``reduction="none"`` returns the squared descriptor differences ``(B, P, *S)``.

    ``noise_gate`` (``None`` = plain MIND-SSC, as ConvexAdam computes it): the squared differences are weighted by
    :func:`structure_weight` of the target (fixed) image, so voxels where it is flat up to its noise (air around an
    MR body, a homogeneous organ) do not count. MIND normalises every patch to unit contrast, so pure noise gets
    full-contrast descriptors, and linear interpolation of warped descriptors lowers their variance most at
    half-voxel shifts: without the gate the field in noise drifts by about half a voxel of every level (1.2 voxels on
    two independent noise images, 0 with ``noise_gate=2``). The noise variance is estimated from the target
    (:func:`noise_variance`) unless given.
    """

    def __init__(
        self, radius: int = 1, dilation: int = 2, reduction: str = "mean", noise_gate: float | None = None
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        noise_gate = optional_float(noise_gate, "noise_gate")
        if noise_gate is not None and noise_gate <= 0:
            raise ValueError(f"noise_gate must be a positive multiple of the noise level or None, got {noise_gate!r}")
        self.radius = radius
        self.dilation = dilation
        self.noise_gate = noise_gate

    def descriptors(self, image: torch.Tensor) -> torch.Tensor:
        """MIND-SSC descriptors ``(B, P, *S)`` of ``image`` ``(B, 1, *S)`` with this loss's radius and dilation."""
        return mind_ssc(image, self.radius, self.dilation)

    def weight(self, target: torch.Tensor, noise_var: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-voxel weight ``(B, 1, *S)`` of the squared differences (``None`` without ``noise_gate``)."""
        if self.noise_gate is None:
            return None
        if noise_var is None:
            noise_var = noise_variance(target)
        return structure_weight(target, noise_var, self.noise_gate, self.radius, self.dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sq = (self.descriptors(pred) - self.descriptors(target)) ** 2
        weight = self.weight(target)
        return reduce(sq if weight is None else sq * weight, self.reduction)
