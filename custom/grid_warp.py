"""GridWarp: MONAI's ``Warp`` for a solver that warps the same grid at every step.

``monai.networks.blocks.Warp`` rebuilds the sampling grid at every call: it adds the identity grid, permutes it, then
normalises and reorders the components one by one (about ten full-size copies whose backward passes cost as much
again). The iterative solver warps feature stacks of a few fixed shapes hundreds of times, so :class:`GridWarp` keeps
the identity grid already normalised, in ``grid_sample``'s ``(x, y, z)`` order, per shape, and turns a displacement
into a grid with one flip, one scale and one add. Same convention and values as MONAI's native path (displacements in
voxels, ``align_corners=True``, a singleton axis maps to -1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GridWarp:
    """``warp(image, ddf)``: ``image`` ``(B, C, *S)`` sampled at ``x + ddf(x)``; ``ddf`` ``(B, D, *S)`` in voxels,
    component ``d`` along spatial axis ``d``. Returns ``(B, C, *S)``; differentiable in both.

    Args:
        mode: ``grid_sample`` interpolation ("bilinear" or "nearest").
        padding_mode: ``grid_sample`` padding ("zeros", "border" or "reflection").
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        self.mode, self.padding_mode = mode, padding_mode
        self._key: tuple | None = None
        self._base = self._scale = None

    def identity(self, ddf: torch.Tensor, shape=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised identity grid ``(1, *S, D)`` (``x, y, z`` order) and the voxel -> normalised scale ``(D,)``
        of the reversed components, cached for the last shape (``ddf``'s, or ``shape``), device and dtype."""
        shape = tuple(ddf.shape[2:]) if shape is None else tuple(int(n) for n in shape)
        key = (shape, ddf.device, ddf.dtype)
        if key != self._key:
            scale = [2.0 / max(n - 1, 1) for n in shape]
            axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) * s - 1.0 for n, s in zip(shape, scale)]
            base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)
            self._base, self._scale = base[None], torch.tensor(scale[::-1], device=ddf.device, dtype=ddf.dtype)
            self._key = key
        return self._base, self._scale

    def grid(self, ddf: torch.Tensor, lattice: tuple[slice, ...] | None = None) -> torch.Tensor:
        """``grid_sample``'s grid ``(B, *S, D)`` for ``ddf`` ``(B, D, *S)``; with ``lattice`` (one slice per spatial
        axis, e.g. every second voxel) only at those voxels, ``(B, *S', D)``."""
        base, scale = self.identity(ddf)
        if lattice is not None:
            base = base[(slice(None),) + tuple(lattice)]
            ddf = ddf[(slice(None), slice(None)) + tuple(lattice)]
        return base + ddf.flip(1).movedim(1, -1) * scale

    def lattice_grid(self, ddf: torch.Tensor, shape, lattice: tuple[slice, ...]) -> torch.Tensor:
        """:meth:`grid` ``(B, *S', D)`` of a field of a ``shape`` grid given at the voxels of ``lattice`` only (``ddf``
        ``(B, D, *S')``)."""
        base, scale = self.identity(ddf, shape)
        return base[(slice(None),) + tuple(lattice)] + ddf.flip(1).movedim(1, -1) * scale

    def sample(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, *S)`` sampled at ``grid`` ``(B, *S, D)`` (from :meth:`grid`)."""
        return F.grid_sample(image, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=True)

    def __call__(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        if ddf.shape[0] != image.shape[0] or ddf.shape[2:] != image.shape[2:] or ddf.shape[1] != image.ndim - 2:
            raise ValueError(
                f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must be (B, C, *S) and (B, D, *S) with D the "
                "number of spatial axes"
            )
        return self.sample(image, self.grid(ddf))
