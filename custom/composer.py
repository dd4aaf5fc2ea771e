"""Composition of per-region displacement fields into one field: ``u = sum_i w_i * u_i``."""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter


class FieldComposer(torch.nn.Module):
    """Compose region sub-fields with fixed-space weights.

    ``forward(fields, weights)``: ``fields`` ``(B, N, D, *S)`` (N region fields of D components), ``weights``
    ``(B, N, *S)`` hard one-hot masks (S_f^i) or soft weights (probabilities). Returns ``(B, D, *S)``.
    Differentiable in both arguments; no host round trip.

    Args:
        sigma: if set, the weights are first smoothed with a Gaussian of this standard deviation (voxels), then
            renormalised to sum to 1 at every voxel (see :meth:`prepare_weights`). ``None`` uses them as given.
        normalise: renormalise the weights to sum to 1 even without smoothing (for soft probabilities).
    """

    def __init__(self, sigma: float | None = None, normalise: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.sigma = sigma
        self.normalise = normalise or sigma is not None
        self.eps = eps

    def prepare_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Smooth (if ``sigma``) and renormalise (if ``normalise``) ``(B, N, *S)`` weights."""
        w = weights.float()
        if self.sigma is not None and self.sigma > 0:
            spatial = w.ndim - 2
            smooth = GaussianFilter(spatial_dims=spatial, sigma=self.sigma).to(w.device)
            w = smooth(w.reshape((-1, 1) + tuple(w.shape[2:]))).reshape(w.shape).clamp_min(0)
        if self.normalise:
            w = w / w.sum(1, keepdim=True).clamp_min(self.eps)
        return w

    def forward(self, fields: torch.Tensor, weights: torch.Tensor, prepared: bool = False) -> torch.Tensor:
        if fields.ndim != weights.ndim + 1 or fields.shape[:2] != weights.shape[:2]:
            raise ValueError(
                f"fields must be (B, N, D, *S) and weights (B, N, *S); got {tuple(fields.shape)}, "
                f"{tuple(weights.shape)}"
            )
        if fields.shape[3:] != weights.shape[2:]:
            raise ValueError(
                f"spatial shapes differ: fields {tuple(fields.shape[3:])}, weights {tuple(weights.shape[2:])}"
            )
        w = weights if prepared else self.prepare_weights(weights)
        return (fields * w.unsqueeze(2).to(fields.dtype)).sum(1)
