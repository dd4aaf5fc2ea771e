"""Composition of per-region displacement fields into one field: ``u = sum_i w_i * u_i``.

This is the one place where sub-fields are pasted back and composed; the trained inferer and the iterative solver
both go through :meth:`FieldComposer.paste` (via :class:`custom.plan.RegionPlan`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d


def whole_box(spatial: Sequence[int]) -> tuple[slice, ...]:
    """The box that covers a whole grid of shape ``spatial``."""
    return tuple(slice(0, int(s)) for s in spatial)


def checked_sigma(sigma: float | Sequence[float] | None) -> float | tuple[float, ...] | None:
    """``sigma`` as a float or a tuple of per-axis floats (voxels); ``None`` for no smoothing (``None`` or all 0)."""
    if sigma is None:
        return None
    values = [float(s) for s in sigma] if isinstance(sigma, Sequence) else [float(sigma)]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"sigma must be >= 0 voxels (one value or one per axis), got {sigma!r}")
    if not any(values):
        return None
    if any(v == 0 for v in values):
        raise ValueError(f"sigma {sigma!r} is 0 on some axes only: give a positive value per axis, or 0 everywhere")
    return tuple(values) if isinstance(sigma, Sequence) else values[0]


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float], truncated: float = 4.0) -> torch.Tensor:
    """``x`` ``(B, C, *S)`` smoothed by a Gaussian of ``sigma`` voxels (one value, or one per spatial axis), zero
    padding: the output of MONAI's ``GaussianFilter(spatial_dims, sigma)`` (its ``erf`` kernel from ``gaussian_1d``,
    ``truncated`` standard deviations), bit for bit on CPU.

    Each axis' kernel is applied as a sum of shifted copies. MONAI's filter runs one depthwise convolution per axis,
    whose CPU kernel unfolds the volume once per kernel tap (17 copies for sigma 2): smoothing a 390 x 280 x 300 weight
    took 5.7 CPU s that way and 1.3 s this way (``tests/test_composer.py`` checks the values against MONAI's)."""
    spatial = x.ndim - 2
    sigmas = [float(s) for s in sigma] if isinstance(sigma, Sequence) else [float(sigma)] * spatial
    if len(sigmas) != spatial:
        raise ValueError(f"sigma {sigma} gives {len(sigmas)} axes, the input has {spatial}")
    for axis, s in enumerate(sigmas):
        taps = gaussian_1d(torch.tensor(s), truncated=truncated, approx="erf").tolist()
        half, dim, n = (len(taps) - 1) // 2, 2 + axis, x.shape[2 + axis]
        pads = [0] * (2 * spatial)
        pads[2 * (spatial - 1 - axis)] = pads[2 * (spatial - 1 - axis) + 1] = half
        padded = F.pad(x, pads)
        out = padded.narrow(dim, 0, n) * taps[0]
        for t in range(1, len(taps)):
            out = out.add_(padded.narrow(dim, t, n), alpha=taps[t])
        x = out
    return x


class FieldComposer(torch.nn.Module):
    """Compose region sub-fields with fixed-space weights.

    ``forward(fields, weights, boxes=None)``: ``weights`` ``(B, N, *S)`` are hard one-hot fixed masks (S_f^i) or soft
    weights (probabilities). ``fields`` is either ``(B, N, D, *S)`` (every sub-field on the whole grid) or, with
    ``boxes``, a sequence of N cropped sub-fields ``(B, D, *s_i)`` with ``boxes[i]`` the slices of the grid they
    cover (what the region plan crops). Returns ``(B, D, *S)``; zero where no box reaches. Differentiable in fields
    and weights; no host round trip.

    Args:
        sigma: if set, the weights are first smoothed with a Gaussian of this standard deviation (voxels; one value, or
            one per spatial axis for a blending width in mm on anisotropic voxels: ``sigma_mm / spacing``), then
            renormalised to sum to 1 at every voxel (see :meth:`prepare_weights`). ``None`` (or 0) uses them as given.
        normalise: renormalise the weights to sum to 1 even without smoothing (for soft probabilities).
    """

    def __init__(
        self, sigma: float | Sequence[float] | None = None, normalise: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.sigma = checked_sigma(sigma)
        self.normalise = normalise or self.sigma is not None
        self.eps = eps

    def smooth(self, weights: torch.Tensor) -> torch.Tensor:
        """``(B, N, *S)`` weights smoothed with the Gaussian of ``sigma`` (unchanged without one), not renormalised."""
        w = weights.float()
        if self.sigma is not None:
            spatial = w.ndim - 2
            if not isinstance(self.sigma, float) and len(self.sigma) != spatial:
                raise ValueError(f"sigma {self.sigma} gives {len(self.sigma)} axes, the weights have {spatial}")
            w = gaussian_smooth(w, self.sigma).clamp_min(0)
        return w

    def prepare_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Smooth (if ``sigma``) and renormalise (if ``normalise``) ``(B, N, *S)`` weights."""
        w = self.smooth(weights)
        if self.normalise:
            w = w / w.sum(1, keepdim=True).clamp_min(self.eps)
        return w

    @staticmethod
    def paste(out: torch.Tensor, field: torch.Tensor, weight: torch.Tensor, box: Sequence[slice]) -> torch.Tensor:
        """Add ``weight[box] * field`` into ``out[box]`` in place and return ``out``.

        ``out`` ``(B, D, *S)``, ``field`` ``(B, D, *s)`` with ``s`` the shape of ``box``, ``weight`` ``(B, 1, *S)`` (the
        whole grid) or ``(B, 1, *s)`` (the box only).
        """
        idx = (slice(None), slice(None)) + tuple(box)
        if tuple(field.shape[2:]) != tuple(out[idx].shape[2:]):
            raise ValueError(f"sub-field {tuple(field.shape)} does not fit its box {tuple(out[idx].shape)}")
        if tuple(weight.shape[2:]) == tuple(out.shape[2:]):  # whole-grid weight: cut its box out
            weight = weight[idx]
        out[idx] = out[idx] + weight.to(field.dtype) * field
        return out

    def forward(
        self,
        fields: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor,
        boxes: Sequence[Sequence[slice]] | None = None,
        prepared: bool = False,
    ) -> torch.Tensor:
        spatial = tuple(weights.shape[2:])
        if boxes is None:
            if fields.ndim != weights.ndim + 1 or fields.shape[:2] != weights.shape[:2]:
                raise ValueError(
                    f"fields must be (B, N, D, *S) and weights (B, N, *S); got {tuple(fields.shape)}, "
                    f"{tuple(weights.shape)}"
                )
            if tuple(fields.shape[3:]) != spatial:
                raise ValueError(f"spatial shapes differ: fields {tuple(fields.shape[3:])}, weights {spatial}")
            boxes = [whole_box(spatial)] * fields.shape[1]
            fields = fields.unbind(1)
        if len(fields) != weights.shape[1] or len(boxes) != len(fields):
            raise ValueError(f"{len(fields)} fields, {len(boxes)} boxes and {weights.shape[1]} weight channels differ")
        w = weights if prepared else self.prepare_weights(weights)
        first = fields[0]
        out = first.new_zeros((first.shape[0], first.shape[1]) + spatial)
        for i, (field, box) in enumerate(zip(fields, boxes)):
            self.paste(out, field, w[:, i : i + 1], box)
        return out
