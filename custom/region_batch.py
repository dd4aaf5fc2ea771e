"""Region crops at one resolution level, padded into one batch: what the iterative solver optimises together.

The iterative solver (:class:`custom.iterative.IterativeSegReg`) prepares, once per level and region, everything its
loss compares: the fixed and moving masks, their EDT maps and the *features* of the masked images (MIND-SSC
descriptors for :class:`~custom.mind.MINDSSCLoss`, the image itself for ``MSELoss``). During the iterations only the
moving stack is warped (one ``grid_sample`` per step for all regions of a batch), never re-described. Regions of
similar crop shape are zero-padded to one shape and stacked along the batch axis (:func:`group_by_shape`), so one
Adam step updates all their fields.

Shapes: a region's level crop is ``(1, C, *s)``; a batch is ``(G, C, *S)`` with ``S`` the largest ``s`` per axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from custom.mind import MINDSSCLoss


def level_shape(
    shape: Sequence[int],
    spacing: Sequence[float],
    factor: int | None = None,
    target_mm: float | None = None,
    min_size: int = 8,
) -> list[int]:
    """Voxel counts of a crop of ``shape`` (``spacing`` mm) at one level: ``shape / factor`` or, with ``target_mm``,
    about ``target_mm`` mm per voxel on each axis (never finer than the data, never below ``min_size`` voxels)."""
    out = []
    for n, sp in zip(shape, spacing):
        m = math.ceil(n * sp / target_mm) if target_mm is not None else math.ceil(n / max(int(factor or 1), 1))
        out.append(int(max(min(n, m), min(n, min_size))))
    return out


def level_spacing(shape: Sequence[int], size: Sequence[int], spacing: Sequence[float]) -> list[float]:
    """Voxel size (mm) of a crop of ``shape`` voxels of ``spacing`` mm resized to ``size`` (``align_corners=True``)."""
    return [float(sp) * (n - 1) / max(m - 1, 1) if m > 1 else float(sp) * n for sp, n, m in zip(spacing, shape, size)]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Tri/bi)linear resize with ``align_corners=True`` (voxel i of n maps to i * (m - 1) / (n - 1))."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


def resize_field(u: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a voxel displacement ``(B, D, *s)`` to ``size`` and rescale each component to the new voxel units."""
    old = u.shape[2:]
    if tuple(old) == tuple(size):
        return u
    scale = [(n - 1) / max(o - 1, 1) for n, o in zip(size, old)]
    out = resize(u, size)
    return out * torch.tensor(scale, device=u.device, dtype=u.dtype).view(1, -1, *([1] * len(old)))


def pad_to(x: torch.Tensor, size: Sequence[int], mode: str = "constant") -> torch.Tensor:
    """``x`` ``(B, C, *s)`` padded at the far end of each axis to ``size`` (zeros, or ``mode="replicate"``)."""
    pads = []
    for n, m in zip(reversed(x.shape[2:]), reversed(tuple(size))):
        pads += [0, int(m) - int(n)]
    return F.pad(x, pads, mode=mode) if any(pads) else x


def valid_slices(shape: Sequence[int]) -> tuple[slice, ...]:
    """Index of the unpadded part ``(b, :, :s0, :s1, ...)`` of a padded batch element."""
    return (slice(None),) + tuple(slice(0, int(n)) for n in shape)


def feature_extractor(similarity: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``features(image)`` for a similarity that is the mean squared difference of fixed per-voxel features, so the
    features can be computed once and warped (MIND-SSC: its descriptors; ``MSELoss``: the image); ``None`` for
    similarities that must see the warped image itself (e.g. local NCC)."""
    if isinstance(similarity, MINDSSCLoss):
        return similarity.descriptors
    if isinstance(similarity, torch.nn.MSELoss) and similarity.reduction == "mean":
        return lambda x: x
    return None


@dataclass
class RegionLevel:
    """One region's crop at one level (unpadded, ``(1, C, *s)``).

    ``fixed`` holds the fixed features (or the masked fixed image when the similarity needs the warped image);
    ``moving`` stacks what is warped: moving features (or image), then the masks and EDT maps the mask loss needs.
    ``fixed_masks`` / ``fixed_edt`` are the mask-loss targets, ``reg_mask`` the regulariser's domain (``None`` = the
    whole crop), ``spacing`` the level's voxel size (mm), ``sim_weight`` ``(1, 1, *s)`` the per-voxel weight of the
    similarity (``None`` = 1; see :meth:`custom.mind.MINDSSCLoss.weight`), ``mask_domain`` ``(1, 1, *s)`` where the
    mask loss counts (``None`` = everywhere; the fixed field of view for segmentations that end at it).
    """

    index: int
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_masks: torch.Tensor
    fixed_edt: torch.Tensor | None
    reg_mask: torch.Tensor | None
    spacing: list[float]
    use_similarity: bool = True
    sim_weight: torch.Tensor | None = None
    mask_domain: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed.shape[2:])


@dataclass
class RegionBatch:
    """Regions of one level padded to one shape and stacked: ``fixed`` ``(G, F, *S)``, ``moving`` ``(G, M, *S)``,
    ``fixed_masks`` ``(G, C, *S)``, ``fixed_edt`` or ``None``, ``valid`` ``(G, 1, *S)`` (1 inside each region's real
    crop), ``reg_domain`` ``(G, 1, *S)`` (each regulariser domain: its ``reg_mask``, or its whole crop), ``sim_weight``
    ``(G, 1, *S)`` (each voxel's similarity weight, 0 in the padding: ``valid`` where no region is weighted),
    ``mask_domain`` ``(G, 1, *S)`` or ``None`` (see :class:`RegionLevel`), ``regions`` the list of
    :class:`RegionLevel` in batch order, ``cache`` what a solver derives from them once
    (e.g. the regulariser's border weights)."""

    regions: list[RegionLevel]
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_masks: torch.Tensor
    fixed_edt: torch.Tensor | None
    valid: torch.Tensor
    reg_domain: torch.Tensor
    sim_weight: torch.Tensor
    mask_domain: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @classmethod
    def stack(cls, regions: Sequence[RegionLevel]) -> RegionBatch:
        size = [max(r.shape[d] for r in regions) for d in range(len(regions[0].shape))]

        def cat(name):
            parts = [getattr(r, name) for r in regions]
            return None if parts[0] is None else torch.cat([pad_to(p, size) for p in parts])

        valid = torch.cat([pad_to(torch.ones_like(r.fixed_masks[:, :1]), size) for r in regions])
        domain = [torch.ones_like(r.fixed_masks[:, :1]) if r.reg_mask is None else r.reg_mask for r in regions]
        domain = torch.cat([pad_to(d, size) for d in domain])
        weight = valid
        if any(r.sim_weight is not None for r in regions):
            parts = [torch.ones_like(r.fixed_masks[:, :1]) if r.sim_weight is None else r.sim_weight for r in regions]
            weight = torch.cat([pad_to(w, size) for w in parts])  # zero padding: 0 outside each real crop, as valid
        moving = cat("moving")
        if moving.ndim == 5:  # grid_sample reads all channels of a corner together: ~20 % faster channels-last
            moving = moving.contiguous(memory_format=torch.channels_last_3d)
        mask_domain = None
        if any(r.mask_domain is not None for r in regions):
            parts = [torch.ones_like(r.fixed_masks[:, :1]) if r.mask_domain is None else r.mask_domain for r in regions]
            mask_domain = torch.cat([pad_to(d, size) for d in parts])
        fields = (cat("fixed"), moving, cat("fixed_masks"), cat("fixed_edt"), valid, domain, weight, mask_domain)
        return cls(list(regions), *fields)

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed_masks.shape[2:])

    def crop(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Batch element ``b`` of ``x`` ``(G, C, *S)`` cut back to its region's real crop -> ``(1, C, *s)``."""
        return x[(slice(b, b + 1),) + valid_slices(self.regions[b].shape)]


def group_by_shape(
    shapes: Sequence[Sequence[int]], max_padding: float = 0.5, max_size: int | None = None
) -> list[list[int]]:
    """Indices of ``shapes`` grouped for batching, largest first: a shape joins the current group while the group has
    fewer than ``max_size`` members (``None``: no cap) and the padded group (count x largest shape per axis) holds at
    most ``1 + max_padding`` times the voxels it really has."""
    order = sorted(range(len(shapes)), key=lambda i: -math.prod(shapes[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (max_size is None or len(groups[-1]) < max_size):
            group = groups[-1] + [i]
            size = [max(shapes[j][d] for j in group) for d in range(len(shapes[i]))]
            real = sum(math.prod(shapes[j]) for j in group)
            if len(group) * math.prod(size) <= (1.0 + max_padding) * real:
                groups[-1] = group
                continue
        groups.append([i])
    return groups
