"""A control grid's field on a lattice and its regulariser on the control grid, for lattice-scored batches.

A batch scored on a lattice (``IterativeSegReg(sample_stride=2)``) reads its field at one voxel in ``stride ** D``
per step, yet upsampling the control grid to every voxel and taking the diffusion there cost more than the similarity
(an 80 x 64 x 64 box: about half of each step). With a displacement that is a linear upsampling of control values
``c`` ``(G, D, *g)`` (align_corners=True, as :func:`custom.region_batch.resize`):

- :class:`LatticeField` evaluates it at the lattice voxels only, one linear interpolation per axis (the same weights
  as ``F.interpolate``);
- :class:`ControlDiffusion` is :class:`custom.losses.RegionDiffusionLoss` of the upsampled field, exactly, as a
  quadratic form on the control grid whose stencil is built once per batch from the border weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def interpolation_weights(g: int, n: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation of ``g`` control values to ``n`` voxels (align_corners=True: voxel i sits at control
    position ``i (g - 1) / (n - 1)``) at the voxels ``rows``: the lower and upper control index and the upper weight."""
    pos = rows.double() * ((g - 1) / (n - 1) if n > 1 else 0.0)
    lo = pos.floor().clamp(0, max(g - 2, 0)).long()
    hi = (lo + 1).clamp(max=g - 1)
    return lo, hi, (pos - lo).clamp(0.0, 1.0)


def interpolation_matrix(g: int, n: int) -> torch.Tensor:
    """``(n, g)`` float64: row i the weights of the control values at voxel i (rows sum to 1)."""
    lo, hi, t = interpolation_weights(g, n, torch.arange(n))
    m = torch.zeros(n, g, dtype=torch.float64)
    m[torch.arange(n), lo] += 1.0 - t
    m[torch.arange(n), hi] += t
    return m


class LatticeField:
    """``field(c)``: the upsampling of ``c`` ``(G, D, *grid)`` to ``size`` voxels, at the voxels of ``lattice`` only
    (one slice per axis), ``(G, D, *lattice shape)``; differentiable in ``c``."""

    def __init__(self, grid: Sequence[int], size: Sequence[int], lattice: Sequence[slice], device=None, dtype=None):
        self.axes = []
        for ax, (g, n, cut) in enumerate(zip(grid, size, lattice)):
            rows = torch.arange(int(n))[cut]
            lo, hi, t = interpolation_weights(int(g), int(n), rows)
            shape = [1] * (len(grid) + 2)
            shape[2 + ax] = -1
            t = t.to(device=device, dtype=dtype).view(shape)
            self.axes.append((2 + ax, lo.to(device), hi.to(device), t))

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        for dim, lo, hi, t in self.axes:
            low = c.index_select(dim, lo)
            c = low + (c.index_select(dim, hi) - low) * t
        return c


class ControlDiffusion:
    """``reg(c)`` ``(G,)``: :class:`custom.losses.RegionDiffusionLoss` of the field upsampled from ``c``
    ``(G, D, *grid)`` (voxel units of the ``size`` grid) to ``size``, computed exactly on the control grid.

    The upsampling is linear and so is each forward difference: per axis k the weighted sum of squared differences
    of component c is the quadratic form ``c^T Q_k c`` with ``Q_k = (D_k U)^T diag(w_k) (D_k U)`` (``U`` the
    upsampling, ``D_k`` the difference along k, ``w_k`` the border weights). Each basis function spans two control
    cells per axis, so ``Q_k`` couples only near control points (at most two apart along k and one across it where the
    control points are at least a voxel apart): its coefficient fields are built once per batch (1-D contractions of
    the border weights, one axis at a time) and each call costs a few multiply-adds per control point and neighbour
    instead of an upsampling and a difference pass over every level voxel, forward and backward. The same value and
    gradient as the level-grid loss to float rounding (tested).

    Args:
        grid: control points per axis; size: voxels per axis (every axis ``size >= grid``).
        weights: :meth:`RegionDiffusionLoss.border_weights` of the batch's regulariser domains at ``size``.
        spacing: ``(G, D)`` each region's voxel size in mm.
    """

    def __init__(self, grid: Sequence[int], size: Sequence[int], weights, spacing: torch.Tensor) -> None:
        grid, size = [int(g) for g in grid], [int(n) for n in size]
        nd, g_count = len(grid), spacing.shape[0]
        dtype = spacing.dtype if spacing.is_floating_point() else torch.float32
        # RegionDiffusionLoss's coefficients: the mean over components of (u_c s_c / s_k)^2
        coef = (spacing.double().unsqueeze(-1) / spacing.double().unsqueeze(1)).square() / nd  # (G, C, D)
        same = bool((coef == coef[:, :1]).all())  # isotropic voxels
        fields: dict[tuple[int, ...], torch.Tensor] = {}  # offsets >= 0 on every axis
        for k in range(nd):
            if weights[k] is None:
                continue
            w, total = weights[k]
            shape = list(size)
            shape[k] = size[k] - 1
            scale = (coef[:, :, k] / total.double().unsqueeze(1)).to(w.device)  # (G, C)
            if same:  # every component weighs the same: one coefficient field for all
                scale = scale[:, :1]
            for offset, field in _stencil(w.view(g_count, *shape), k, grid, size).items():
                term = field.unsqueeze(1) * scale.view(g_count, -1, *[1] * nd).to(field.dtype)
                fields[offset] = fields[offset] + term if offset in fields else term
        zero = (0,) * nd
        self.centre = (
            fields.pop(zero).to(dtype) if zero in fields else spacing.new_zeros((g_count, 1, *grid), dtype=dtype)
        )
        self.pairs = []  # (lower points' slices, upper points' slices, coefficients at the lower points)
        for magnitude, field in fields.items():
            cut = (slice(None), slice(None)) + tuple(slice(0, g - m) for m, g in zip(magnitude, grid))
            field = field[cut].to(dtype).contiguous()
            # Q's coefficient for an offset o is the one for |o| moved by o along the axes where o < 0; o and -o are
            # one coupling, taken once (o > 0 in lexicographic order)
            for signs in itertools.product(*[(1, -1) if m else (1,) for m in magnitude]):
                offset = tuple(sg * m for sg, m in zip(signs, magnitude))
                if offset > (0,) * nd:
                    low = tuple(slice(max(0, -o), g - max(0, o)) for o, g in zip(offset, grid))
                    high = tuple(slice(max(0, o), g - max(0, -o)) for o, g in zip(offset, grid))
                    self.pairs.append(((slice(None), slice(None)) + low, (slice(None), slice(None)) + high, field))

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return _QuadraticForm.apply(c, self)

    def apply(self, c: torch.Tensor) -> torch.Tensor:
        """``Q c`` ``(G, D, *grid)``: the stencil applied to ``c`` (half the gradient of ``c^T Q c``)."""
        out = self.centre.to(c) * c
        for low, high, q in self.pairs:
            q = q.to(c)
            out[low].addcmul_(q, c[high])
            out[high].addcmul_(q, c[low])
        return out


class _QuadraticForm(torch.autograd.Function):
    """``(G,)`` ``c^T Q c`` per batch element for a :class:`ControlDiffusion`; the gradient ``2 Q c`` is the stencil
    product the value already computed."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, form: ControlDiffusion) -> torch.Tensor:
        qc = form.apply(c)
        ctx.save_for_backward(qc)
        return (c * qc).flatten(1).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (qc,) = ctx.saved_tensors
        return 2.0 * qc * grad.view((-1,) + (1,) * (qc.ndim - 1)), None


def _pair_products(m: torch.Tensor) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """For an ``(n, g)`` banded matrix of basis values, ``{o: [(columns, values), ...]}``: ``P[x, j] = m[x, j]
    m[x, j + o]`` for every ``o >= 0`` at which some row couples two columns (``P`` for ``-o`` is ``P`` for ``o``
    moved by ``o`` columns), as one ``(n,)`` column index and value per band (row x's first nonzero column plus 0, 1,
    ...), so ``P^T t`` is one multiply and one ``index_add`` per band."""
    n, g = m.shape
    nonzero = m != 0
    first = nonzero.float().argmax(1)  # each row's first and last nonzero column (the basis is banded)
    width = int((g - 1 - nonzero.flip(1).float().argmax(1) - first).max()) + 1
    rows = torch.arange(n)
    out = {}
    for o in range(width):
        p = torch.zeros_like(m)
        p[:, : g - o] = m[:, : g - o] * m[:, o:]
        bands = []
        for band in range(width - o):
            cols = (first + band).clamp(max=g - 1)
            values = torch.where(first + band < g, p[rows, cols], 0.0)
            if bool((values != 0).any()):
                bands.append((cols, values))
        if bands:
            out[o] = bands
    return out


def _stencil(w: torch.Tensor, k: int, grid: Sequence[int], size: Sequence[int]) -> dict[tuple[int, ...], torch.Tensor]:
    """``{offset: (G, *grid)}`` for every offset >= 0 on all axes: the coefficients of ``Q_k`` (see
    :class:`ControlDiffusion`) between control point j and j + offset, at j, for the difference weights ``w``
    ``(G, *S_k)`` along axis ``k``, one axis contracted at a time (:func:`_pair_products`)."""
    partial = {(): w}
    for a, (g, n) in enumerate(zip(grid, size)):
        m = interpolation_matrix(g, n)
        if a == k:  # the differences of the upsampled field along k
            m = m[1:] - m[:-1]
        shape = [1] * w.ndim
        shape[1 + a] = -1
        contracted = {}
        for o, bands in _pair_products(m).items():
            bands = [(cols.to(w.device), values.to(w.device, w.dtype).view(shape)) for cols, values in bands]
            for key, t in partial.items():
                out = t.new_zeros(t.shape[: 1 + a] + (g,) + t.shape[2 + a :])
                for cols, values in bands:
                    out.index_add_(1 + a, cols, t * values)
                contracted[key + (o,)] = out
        partial = contracted
    return partial
