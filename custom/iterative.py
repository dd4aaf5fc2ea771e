"""IterativeSegReg: training-free SegReg. One field per region, optimised with Adam at several resolutions."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.losses import DiceLoss
from monai.networks.blocks import Warp
from tqdm.auto import tqdm

from custom.composer import FieldComposer
from custom.control_lattice import ControlDiffusion, LatticeField
from custom.flags import as_bool, auto_or_bool
from custom.geometry import in_plane_components, voxel_spacing
from custom.grid_warp import GridWarp
from custom.losses import RegionDiffusionLoss, SegRegLoss
from custom.mind import MINDSSCLoss, noise_variance
from custom.networks import VelocityToDisplacement
from custom.plan import RegionPlan
from custom.region_batch import (
    RegionBatch,
    RegionLevel,
    feature_extractor,
    group_by_shape,
    level_shape,
    level_spacing,
    pad_to,
    resize,
    resize_field,
)
from custom.regions import normalised_edt
from custom.sparse_warp import (
    active_points,
    background_interior,
    background_of,
    dice_from_sums,
    gather_channels,
    gather_points,
    linear_dice,
    sample_points,
)
from custom.utils import box_extreme, plain
from custom.validation import check_finite

logger = logging.getLogger(__name__)


@dataclass
class RegionTask:
    """One field to optimise: region ``index`` of the plan, whether its similarity term is used (``False``: the region
    lies mostly outside the fixed field of view) and whether it is a region of the plan (``False``: the global one)."""

    index: int
    use_similarity: bool = True
    region: bool = True


def default_loss() -> SegRegLoss:
    """MIND-SSC (noise gate 2, see :class:`~custom.mind.MINDSSCLoss`) + Dice + L2 diffusion within regions, weights
    1 : 1 : 1 (the iterative defaults)."""
    return SegRegLoss(
        similarity=MINDSSCLoss(noise_gate=2.0),
        mask=DiceLoss(include_background=True),
        regulariser=RegionDiffusionLoss(),
        weights={"sim": 1.0, "mask": 1.0, "reg": 1.0},
    )


class ControlGrid:
    """The field of a level as a function of parameters on a control grid of ``grid`` points for a level of ``size``
    voxels: ``field(param)`` ``(G, D, *grid) -> (G, D, *size)``, in level voxels.

    A control grid at least two level voxels apart is upsampled linearly (each control point's basis function is a
    tent reaching the next point). A finer one (``grid_spacing 1``, or a ``grid_spacing_mm`` under 1.5 voxels) would
    give every voxel a basis function one voxel wide: Adam's per-parameter steps then add noise of its step size at
    every voxel, which the regulariser pays for at every level. Along such axes the control field is smoothed with
    the ``[1, 2, 1] / 4`` kernel (tents two voxels wide, the span of ``grid_spacing 2``) and its parameters are scaled
    so that one unit moves the field by that span, so every field of a coarser grid is a field of the finer one and one
    Adam step is the same in mm on both.
    """

    def __init__(self, grid: Sequence[int], size: Sequence[int]) -> None:
        self.grid, self.size = [int(g) for g in grid], [int(n) for n in size]
        self.ratio = [(n - 1) / max(g - 1, 1) for g, n in zip(self.grid, self.size)]
        self.fine_axes = [d for d, r in enumerate(self.ratio) if r < 1.5 and self.grid[d] >= 3]
        scale = [max(1.0, 2.0 / r) if d in self.fine_axes else 1.0 for d, r in enumerate(self.ratio)]
        self.scale = torch.tensor(scale).view(1, -1, *[1] * len(self.grid))

    @property
    def factor(self) -> torch.Tensor:
        """``(1, D, 1, ...)``: the parameter scale times :func:`resize_field`'s control -> level voxel factor."""
        return self.scale.double() * torch.tensor(self.ratio, dtype=torch.float64).view(self.scale.shape)

    def smooth(self, c: torch.Tensor) -> torch.Tensor:
        """``[1, 2, 1] / 4`` along the fine axes, edges extended linearly (a linear field stays exact)."""
        nd = len(self.grid)
        conv = F.conv3d if nd == 3 else F.conv2d
        for ax in self.fine_axes:
            dim, n = 2 + ax, c.shape[2 + ax]
            first, last = c.narrow(dim, 0, 1), c.narrow(dim, n - 1, 1)
            c = torch.cat([2 * first - c.narrow(dim, 1, 1), c, 2 * last - c.narrow(dim, n - 2, 1)], dim)
            shape = [1] * nd
            shape[ax] = 3
            kernel = c.new_tensor([0.25, 0.5, 0.25]).view(1, 1, *shape).repeat(c.shape[1], 1, *[1] * nd)
            c = conv(c, kernel, groups=c.shape[1])
        return c

    def values(self, param: torch.Tensor) -> torch.Tensor:
        """The control values ``(G, D, *grid)`` in level voxels that :meth:`field` upsamples linearly: the smoothed
        parameters rescaled on the control grid (both are linear per component, and the control grid is the smaller)."""
        factor = self.scale if self.grid == self.size else self.factor
        return self.smooth(param * factor.to(param))

    def field(self, param: torch.Tensor) -> torch.Tensor:
        """The level's field ``(G, D, *size)`` (level voxels) of the parameters ``(G, D, *grid)``: :func:`resize_field`
        of the smoothed control field (:meth:`values`, upsampled)."""
        return resize(self.values(param), self.size)

    def parameters_of(self, field: torch.Tensor) -> torch.Tensor:
        """Parameters ``(G, D, *grid)`` whose field approximates ``field`` ``(G, D, *size)`` (exact for a field that
        is linear along the fine axes; otherwise smoothed once by the ``[1, 2, 1] / 4`` kernel)."""
        return resize_field(field, self.grid) / self.scale.to(field)


def is_thin(mask: torch.Tensor, fraction: float = 0.5) -> bool:
    """Whether fewer than ``fraction`` of the voxels of the ``(1, 1, *S)`` mask survive an erosion by one voxel (the
    ``3^d`` box; the grid's edge does not erode): every plate or tube a few voxels thick at this resolution (ribs, a
    scapula, a vessel) and, in 3-D, any structure under about 11 voxels across (a 4 cm organ on a 4 mm level)."""
    mask = mask.float()
    return bool(box_extreme(mask, largest=False).sum() < fraction * mask.sum())


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, 1, *S)`` mask grown by ``radius`` voxels (chessboard distance; the max over the ``(2r + 1)^d`` box)."""
    if radius <= 0:
        return mask
    grown = mask.float()
    for _ in range(radius):
        grown = box_extreme(grown, largest=True)
    return grown


class IterativeSegReg:
    """Register one pair without a network: the iterative solver of the region plan.

    Each region of the pair's :class:`~custom.plan.RegionPlan` (present in both label maps, cropped to its fixed and
    moving masks plus ``margin``) gets its own displacement (or velocity) field, optimised with Adam on the masked
    pair (I_m * S_m^i, I_f * S_f^i) by ``loss`` (:class:`~custom.losses.SegRegLoss`: similarity + mask loss +
    regulariser, the regulariser restricted to S_f^i), coarse to fine over the levels. The plan then composes the
    fields with the fixed masks. ``global_region=True`` gives the like-for-like baseline: one field over the whole
    image, the mask loss on all labels, a global regulariser, the same optimiser.

    Speed (ConvexAdam's recipe): at each level the features of the masked images (MIND-SSC descriptors, see
    :func:`~custom.region_batch.feature_extractor`) are computed once and then *warped*; regions of similar crop shape
    are padded into one batch and share one warp and one Adam step per iteration (:mod:`custom.region_batch`); each
    field lives on a coarse control grid (``grid_spacing`` or ``grid_spacing_mm``); a level stops early when its loss
    stalls (``tolerance``). Similarities without features (e.g. local NCC) fall back to warping the masked image.

    ``__call__(fixed, moving, fixed_label, moving_label, spacing=None)``: images and label maps ``(1, 1, *S)`` on one
    device. Returns ``{"ddf": (1, D, *S) voxels, "warped_image", "warped_label"}``.

    Args:
        loss: the :class:`~custom.losses.SegRegLoss` (default :func:`default_loss`: MIND-SSC + Dice + L2 within
            regions, 1 : 1 : 1). Configs build it with ``_target_``, as training does. A ``MINDSSCLoss`` with a
            ``noise_gate`` weights each region's similarity by the structure of its masked fixed image (noise level
            estimated once from the whole fixed image), so the field does not drift in noise.
        levels: downsampling factors, coarse to fine, e.g. ``(4, 2, 1)``. Ignored when ``level_spacing_mm`` is set.
        level_spacing_mm: the levels as voxel sizes in mm, coarse to fine, e.g. ``(16, 8, 4)``: each axis is resampled
            to about that spacing (never finer than the data), so one setting suits 1 mm CT and 4 mm test volumes.
        iterations: the most Adam steps per level (one number for all levels, or one per level).
        lr: Adam learning rate at the start of each level (cosine decay to 5 % within the level).
        margin: crop margin in voxels (full resolution).
        grid_spacing: the field is optimised on a control grid this many times coarser than each level's image
            grid and upsampled (linear); 1 = one control point per voxel, whose basis functions still span two voxels
            (:class:`ControlGrid`: a finer grid adds freedom, not noise). Ignored when ``grid_spacing_mm`` is set.
        grid_spacing_mm: control-point spacing in mm (physical, the same on every axis; never finer than the level's
            voxels), e.g. 8 mm: a 10 mm slice axis then keeps one control point per slice.
        min_size: an axis is never downsampled below this many voxels (thin axes such as 16 cine-MR slices).
        fov_value: fixed-image intensity at or below which a voxel lies outside the scanner's field of view (e.g. the
            padding of a cone-beam CT); a region with less than half of its fixed mask inside the field of view is
            registered by the mask loss and regulariser only. ``None`` disables the check.
        mask_fov: where the mask loss counts (needs ``fov_value``): ``True`` only inside the fixed field of view, for
            fixed segmentations that end at it (made on the CBCT itself: outside it they are empty, not background);
            ``False`` everywhere; "auto" (default) decides per pair: ``True`` when under 1 % of the fixed labelled
            voxels lie outside the field of view while it leaves out at least 1 % of the image (logged).
        min_region_voxels: the first level is skipped for a region whose fixed mask covers fewer voxels at that
            resolution (small or thin structures vanish when downsampled); at the later levels such a region is
            optimised at a finer resolution (up to the image's) that keeps this many mask voxels.
        field: "displacement" or "velocity" (integrated with ``num_steps`` scaling and squaring steps).
        region_ids: regions to register (``None`` = every id present in both label maps).
        progress: show a tqdm progress bar per pair.
        frozen_components: displacement components held at 0 (``(2,)``: in-plane field for thick-slice data).
        in_plane: "auto" holds the slice axis' component at 0 on thick-slice pairs (one spacing at least 2.5 times the
            others', decided per pair from ``spacing`` and logged), True on every pair (refused where there is no
            slice axis), False never (default; ``frozen_components`` still apply).
        reg_domain: where each region's field is regularised: "region" (inside its fixed mask: the paper's "L2 summed
            within each fixed region"), "box" (its whole crop: the field stays smooth just outside the region, which
            steadies thin and small structures), a dilation of the mask in voxels, or "auto": the mask, grown by
            :attr:`thin_dilation` (2) voxels at the levels where it is thin (:func:`is_thin`: under half of it
            survives a one-voxel erosion; ribs, scapulae, vessels, organs under about 11 voxels across, so most
            regions at a coarse level). Inside a structure one or two voxels thick few finite differences are summed,
            so its field is barely regularised and follows the noise. The field is only used inside the region (and
            its composition blend) either way; each region's field is its own, so no choice couples two regions
            across their border.
        sigma: Gaussian smoothing (voxels) of the composition weights: the sub-fields blend over about ``2 sigma``
            voxels at region borders instead of jumping (fewer folds; ``None`` = hard masks, the sliding kept exact).
        sigma_mm: the same smoothing in mm (``sigma_mm / spacing`` voxels per axis, from each pair's spacing): one
            blending width on 1 mm CT and on 4 mm or thick-slice data. Give ``sigma`` or ``sigma_mm``, not both.
        tolerance: a level stops when its loss improved by less than this fraction over the last ``patience`` steps
            (the best loss; on a lattice, the mean of the window's estimates; 0 = always run every iteration).
        patience: the window (steps) of the early stop.
        num_threads: at most this many torch CPU threads while a pair is registered (restored afterwards; ``None``:
            torch's setting). The crops are small: on a 16-core CPU the synthetic thorax pair took 9.1 s wall with 4
            threads against 10.8 s with 16, for a quarter of the CPU time (27.7 vs 102.8 CPU-s).
        max_padding: regions are batched while padding adds at most this fraction of voxels (0 = only equal crops
            share a batch; batching pays most on a GPU, padding costs most on a CPU).
        centroid_init: a region whose fixed and moving masks overlap with a Dice below this starts from the
            translation between their centroids (the mask loss has no gradient to follow while the masks do not
            touch: a small organ that moved more than its own size); 0 disables it.
        mask_only_levels: regions registered by their masks alone (``fov_value``: mostly outside the field of view)
            are optimised at the first this-many levels only and keep that field at the finer ones (``None``: every
            level). Without image data their field follows the mask borders, which a coarse level already resolves;
            on a CBCT pair such regions are the background and the chest wall, the largest crops of the finest level.
        sparse_warp: warp each step's moving stack only at the voxels whose sample can differ from the stack's
            background (:mod:`custom.sparse_warp`): the same loss and gradient to float rounding, less work where a
            region's crop is mostly outside it (the lungs and the rib cage fill a thorax grid's box but not its
            voxels). "auto" (default): on a CPU (on a GPU the per-step count of the points costs a host sync);
            True / False: always / never.
        sparse_fraction: the sparse step is taken while at most this fraction of a batch's voxels is active (above
            it the dense warp is cheaper). 0.8 (0.5 until bundle 0.3.9): on the 4 mm and 3 mm CBCT-like thorax pairs,
            5 to 12 % less CPU time per pair than 0.5, 1.0 no better than 0.8.
        sample_stride: each step scores the similarity and the mask loss on every ``sample_stride``-th voxel of each
            axis only, the lattice shifted at every step so that every voxel counts once per ``sample_stride ** D``
            steps (elastix's sampling of a subset per iteration, on a regular lattice): the sums are scaled to the
            whole grid and the voxels that can only read the region's background count exactly, so each step's loss
            is an unbiased estimate with its gradient. A displacement (``field="displacement"``, control points at
            least 1.5 voxels apart) is then read at the lattice voxels only and its regulariser taken on the control
            grid (the level-grid diffusion as a quadratic form of the control values, the same value to float
            rounding: :mod:`custom.control_lattice`); a velocity field is integrated and regularised on every
            voxel. 1 (default): every voxel, every step. Taken for batches whose regions each have at least
            ``sample_min_points`` voxels that can differ from their background (large regions; a small one keeps every
            voxel) and an image term (regions registered by their masks alone keep every voxel: that loss lives on the
            borders), with the loss of the sparse step (features + linear Dice + region diffusion), on a CPU and on a
            GPU alike. The thorax bundle uses 2: on the CBCT-like thorax pairs 28 to 37 % less CPU time per pair, lung
            EPE and TRE the same within the pairs' spread (``docs/benchmarks/solver_scaling.md``).
        sample_min_points: see ``sample_stride``. 20000 (2500 lattice points per step at stride 2): with 5000 the
            medium regions of the simple synthetic thorax (seed13) lost 0.13 mm of EPE per region (1.48 -> 1.61 mm,
            2 pairs), with 20000 0.01; on the CBCT-like pairs both gave the same errors.

    The voxel spacing (``spacing`` argument of ``__call__``, else the fixed image's affine if it is a ``MetaTensor``,
    else 1 mm) makes the regulariser, the levels and the control grid physical.

    On a CPU, batches of fewer than :attr:`single_thread_voxels` voxels (all regions of the batch together), and
    batches of one region under :attr:`single_region_voxels` voxels, run on one thread: 3-D ``grid_sample`` splits its
    work by batch element only and torch leaves tensors this small to one thread, so further threads would only spin
    and add CPU time (measured on 2 cores: a one-region batch of 8k to 200k voxels took 60 to 80 % more CPU time on two
    threads than on one, and at most 10 % less wall time).

    ``last_profile`` holds the CPU seconds of the last pair per phase (plan, noise level, each level's set-up and
    optimisation, composition, warping; logged at DEBUG level): ``benchmarks/iterative_speed.py`` prints it.
    """

    single_thread_voxels: int = 65536
    single_region_voxels: int = 262144
    # a lattice-scored displacement is read at the lattice voxels and regularised on its control grid (False: upsampled
    # to every level voxel and regularised there, as up to bundle 0.3.13; the same loss to float rounding)
    lattice_on_control: bool = True
    thin_fraction: float = 0.5  # reg_domain "auto": a mask is thin when less than this fraction survives an erosion
    thin_dilation: int = 2  # reg_domain "auto": a thin mask's regulariser domain grows by this many voxels

    def __init__(
        self,
        loss: SegRegLoss | None = None,
        levels: Sequence[int] = (2, 1),
        iterations: int | Sequence[int] = (100, 50),
        lr: float = 0.1,
        margin: int = 8,
        grid_spacing: int = 2,
        min_size: int = 8,
        min_region_voxels: int = 64,
        fov_value: float | None = None,
        field: str = "displacement",
        num_steps: int = 7,
        region_ids: Sequence[int] | None = None,
        global_region: bool = False,
        progress: bool = True,
        frozen_components: Sequence[int] = (),
        in_plane: bool | str = False,
        grid_spacing_mm: float | None = None,
        reg_domain: str | int = "region",
        sigma: float | None = None,
        level_spacing_mm: Sequence[float] | None = None,
        tolerance: float = 1e-3,
        patience: int = 10,
        max_padding: float = 0.25,
        num_threads: int | None = None,
        centroid_init: float = 0.5,
        mask_only_levels: int | None = None,
        mask_fov: bool | str = "auto",
        sigma_mm: float | None = None,
        sparse_warp: bool | str = "auto",
        sparse_fraction: float = 0.8,
        sample_stride: int = 1,
        sample_min_points: int = 20000,
    ) -> None:
        if field not in ("displacement", "velocity"):
            raise ValueError(f"field must be 'displacement' or 'velocity', got {field!r}")
        if loss is not None and not isinstance(loss, SegRegLoss):
            raise TypeError(f"loss must be a custom.losses.SegRegLoss, got {type(loss).__name__}")
        self.level_spacing_mm = None if level_spacing_mm is None else [float(m) for m in level_spacing_mm]
        if self.level_spacing_mm is not None and (not self.level_spacing_mm or min(self.level_spacing_mm) <= 0):
            raise ValueError(f"level_spacing_mm must be positive spacings in mm, got {level_spacing_mm!r}")
        self.levels = [int(f) for f in levels] if self.level_spacing_mm is None else [0] * len(self.level_spacing_mm)
        n_levels = len(self.levels)
        its = [int(iterations)] * n_levels if isinstance(iterations, int) else [int(i) for i in iterations]
        if len(its) != n_levels:
            raise ValueError(f"iterations ({its}) must give one count per level ({n_levels} levels)")
        self.iterations = its
        self.loss = loss if loss is not None else default_loss()
        self.features = feature_extractor(self.loss.sim)
        # per-voxel similarity weights from the fixed image (MINDSSCLoss with a noise gate), features only
        self.gated = self.features is not None and getattr(self.loss.sim, "noise_gate", None) is not None
        self.grid_spacing = max(1, int(grid_spacing))
        self.min_size = max(2, int(min_size))
        self.min_region_voxels = int(min_region_voxels)
        self.fov_value = fov_value
        self.mask_fov = auto_or_bool(mask_fov, "mask_fov")
        if self.mask_fov is True and fov_value is None:
            raise ValueError("mask_fov=True counts the mask loss inside the field of view: give fov_value as well")
        self.pair_fov: torch.Tensor | None = None  # the fixed field of view of the pair being registered
        self.pair_mask_fov = False  # whether that pair's mask loss counts inside it only
        self.lr, self.margin = lr, margin
        self.region_ids = None if region_ids is None else [int(r) for r in region_ids]
        self.global_region, self.progress = as_bool(global_region, "global_region"), as_bool(progress, "progress")
        self.num_steps = num_steps if field == "velocity" else 0
        self.base_frozen = sorted({int(c) for c in (frozen_components or ())})
        self.in_plane = auto_or_bool(in_plane, "in_plane")
        self.set_frozen(self.base_frozen)
        self.centroid_init = float(centroid_init)
        if mask_only_levels is not None and int(mask_only_levels) < 1:
            raise ValueError(f"mask_only_levels must be a number of levels >= 1 or None, got {mask_only_levels!r}")
        self.mask_only_levels = None if mask_only_levels is None else int(mask_only_levels)
        self.grid_spacing_mm = None if grid_spacing_mm is None else float(grid_spacing_mm)
        if not (reg_domain in ("region", "box", "auto") or (isinstance(reg_domain, int) and reg_domain >= 0)):
            raise ValueError(
                f"reg_domain must be 'region', 'box', 'auto' or a dilation in voxels (int >= 0), got {reg_domain!r}"
            )
        self.reg_domain = reg_domain
        self.sigma = None if sigma in (None, 0) else float(sigma)
        self.sigma_mm = None if sigma_mm in (None, 0) else float(sigma_mm)
        if self.sigma is not None and self.sigma_mm is not None:
            raise ValueError(f"give sigma (voxels) or sigma_mm, not both: got {sigma} and {sigma_mm}")
        if self.sigma_mm is not None and not (math.isfinite(self.sigma_mm) and self.sigma_mm > 0):
            raise ValueError(f"sigma_mm must be a positive width in mm or None, got {sigma_mm!r}")
        self.tolerance, self.patience = float(tolerance), max(1, int(patience))
        self.max_padding = float(max_padding)
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"num_threads must be a positive number of CPU threads or None, got {num_threads!r}")
        self.num_threads = None if num_threads is None else int(num_threads)
        self.batched_terms = self._batched_terms()
        self.sparse_warp = auto_or_bool(sparse_warp, "sparse_warp")
        if not 0.0 <= float(sparse_fraction) <= 1.0:
            raise ValueError(f"sparse_fraction must be a fraction of the grid in [0, 1], got {sparse_fraction!r}")
        self.sparse_fraction = float(sparse_fraction)
        if isinstance(sample_stride, bool) or int(sample_stride) != sample_stride or int(sample_stride) < 1:
            raise ValueError(
                f"sample_stride must be a whole number of voxels >= 1 (1: every voxel), got {sample_stride!r}"
            )
        self.sample_stride = int(sample_stride)
        self.sample_min_points = int(sample_min_points)
        self.last_profile: dict[str, float] = {}
        self.warp = GridWarp(mode="bilinear", padding_mode="zeros")  # every step: the cached-grid warp
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="border")

    @contextmanager
    def phase(self, name: str):
        """Add the CPU seconds (all threads) spent inside the block to ``last_profile[name]``."""
        start = time.process_time()
        try:
            yield
        finally:
            self.last_profile[name] = self.last_profile.get(name, 0.0) + time.process_time() - start

    @contextmanager
    def small_work(self, device: torch.device, voxels: int, one_region: bool = False):
        """One torch thread inside the block on a CPU when ``voxels`` (the work's size) is below
        :attr:`single_thread_voxels`, or, for a batch of ``one_region``, below :attr:`single_region_voxels` (0: the
        same limit as any batch): such tensors are not split across threads, so the others would only spin."""
        threads = torch.get_num_threads()
        limit = max(self.single_region_voxels, self.single_thread_voxels) if one_region else self.single_thread_voxels
        if torch.device(device).type == "cpu" and voxels < limit and threads > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    # ----------------------------------------------------------------------------------------------------------
    def composition_sigma(self, spacing: Sequence[float]) -> float | tuple[float, ...] | None:
        """The composer's smoothing in voxels: ``sigma``, or ``sigma_mm`` divided by ``spacing`` (mm) per axis."""
        if self.sigma_mm is None:
            return self.sigma
        return tuple(self.sigma_mm / float(s) for s in spacing)

    def plan(self, fixed_label, moving_label, spacing: Sequence[float] | None = None) -> RegionPlan:
        """The region plan of a pair; ``spacing`` (mm per axis, 1 mm if not given) sets ``sigma_mm`` in voxels."""
        if spacing is None:
            spacing = [1.0] * (fixed_label.ndim - 2)
        return RegionPlan.build(
            fixed_label,
            moving_label,
            self.region_ids,
            self.margin,
            global_region=self.global_region,
            composer=FieldComposer(sigma=self.composition_sigma(spacing)),
        )

    def tasks(self, plan: RegionPlan, fixed) -> list[RegionTask]:
        """One :class:`RegionTask` per region of ``plan`` (the field-of-view check on the full-resolution crop)."""
        tasks = []
        for i in range(len(plan)):
            if plan.is_global:
                tasks.append(RegionTask(i, region=False))
                continue
            inside = True
            if self.fov_value is not None:
                fm = plan.mask("fixed", i) > 0
                seen = ((plan.crop(fixed, i) > self.fov_value) & fm).sum()
                inside = bool(2 * seen >= fm.sum())  # at least half of the fixed mask inside the field of view
            tasks.append(RegionTask(i, inside))
        return tasks

    def initial_offset(self, plan: RegionPlan, task: RegionTask) -> torch.Tensor | None:
        """Translation ``(D,)`` (crop voxels, moving centroid minus fixed centroid of the region's masks) to start a
        region from, or ``None`` (start from 0) where the masks overlap with a Dice of at least ``centroid_init``."""
        if not task.region or self.centroid_init <= 0:
            return None
        fm, mm = plan.mask("fixed", task.index)[0, 0], plan.mask("moving", task.index)[0, 0]
        if self.pair_mask_fov:  # the fixed mask ends at the field of view: compare the parts inside it
            fov = plan.crop(self.pair_fov, task.index)[0, 0]
            fm, mm = fm * fov, mm * fov
        total_f, total_m = fm.sum(), mm.sum()
        if total_f == 0 or total_m == 0 or 2 * (fm * mm).sum() / (total_f + total_m) >= self.centroid_init:
            return None
        coords = torch.meshgrid(*[torch.arange(n, device=fm.device, dtype=fm.dtype) for n in fm.shape], indexing="ij")
        offset = torch.stack([(c * mm).sum() / total_m - (c * fm).sum() / total_f for c in coords])
        offset[self.frozen_components] = 0.0
        return offset

    def reg_mask(self, fixed_mask: torch.Tensor) -> torch.Tensor | None:
        """Where a region's field is regularised: its fixed mask, the mask grown by ``reg_domain`` voxels, or (``None``)
        its whole crop; with "auto" the mask, grown by :attr:`thin_dilation` voxels where it is thin at this level."""
        if self.reg_domain == "box":
            return None
        if self.reg_domain == "auto":
            return dilate(fixed_mask, self.thin_dilation if is_thin(fixed_mask, self.thin_fraction) else 0)
        return dilate(fixed_mask, 0 if self.reg_domain == "region" else int(self.reg_domain))

    def level_size(self, shape: Sequence[int], spacing: Sequence[float], level: int) -> list[int]:
        """Voxel counts of a crop of ``shape`` at ``level`` (index into the levels, coarse to fine)."""
        target = None if self.level_spacing_mm is None else self.level_spacing_mm[level]
        return level_shape(shape, spacing, self.levels[level] or None, target, self.min_size)

    def refine(self, size: Sequence[int], shape: Sequence[int], count: float) -> list[int]:
        """``size`` doubled (up to the full ``shape``) until a region of ``count`` full-resolution mask voxels keeps at
        least ``min_region_voxels`` of them: thin and small structures are registered at a resolution that sees them."""
        size = list(size)
        while count * math.prod(size) / math.prod(shape) < self.min_region_voxels and list(size) != list(shape):
            size = [min(n, 2 * m) for m, n in zip(size, shape)]
        return size

    def control_grid(self, size: Sequence[int], spacing: Sequence[float]) -> list[int]:
        """Control-point counts per axis for a level of ``size`` voxels of ``spacing`` mm."""
        if self.grid_spacing_mm is None:
            return [max(2, -(-s // self.grid_spacing)) for s in size]
        return [max(2, min(n, int(math.ceil((n - 1) * sp / self.grid_spacing_mm)) + 1)) for n, sp in zip(size, spacing)]

    # ----------------------------------------------------------------------------------------------------------
    def region_level(
        self, plan: RegionPlan, task: RegionTask, fixed, moving, size, spacing, noise_var=None
    ) -> RegionLevel:
        """Region ``task.index`` of ``plan`` at a level of ``size`` voxels (``spacing`` mm): masks, EDT maps, the
        features of the masked images and the similarity weights (from ``noise_var``, the fixed image's), computed
        once."""
        i = task.index
        fm, mm = resize(plan.mask("fixed", i), size), resize(plan.mask("moving", i), size)
        weight = None
        if task.use_similarity:
            fi = resize(plan.masked_image("fixed", fixed, i), size)
            mi = resize(plan.masked_image("moving", moving, i), size)
            with torch.no_grad():
                if self.gated:
                    weight = self.loss.sim.weight(fi, noise_var)
                if self.features is not None:
                    fi, mi = self.features(fi), self.features(mi)
        else:  # no image term (outside the field of view): only the masks are warped
            fi = mi = fm[:, :0]
        fe = me = None
        if self.loss.needs_edt:
            fe, me = (normalised_edt(m[0].cpu(), sampling=spacing)[None].to(m.device) for m in (fm, mm))
        domain = None  # where the mask loss counts: everywhere, or inside the field of view only (mask_fov)
        if self.pair_mask_fov:
            domain = resize(plan.crop(self.pair_fov, i), size)
        targets = fm if domain is None else fm * domain
        if fe is not None and domain is not None:
            fe = fe * domain
        moving_stack = [mi] + ([mm] if self.loss.needs_mask else []) + ([me] if me is not None else [])
        rm = None
        if task.region:
            rm = self.reg_mask(fm)
            rm = None if rm is None else (rm > 0.5).float()
        return RegionLevel(
            i, fi, torch.cat(moving_stack, 1), targets, fe, rm, list(spacing), task.use_similarity, weight, domain
        )

    def _batched_terms(self):
        """Per-region (``reduction="none"``) copies of the mask loss and regulariser when they can score a padded batch
        exactly (MONAI ``DiceLoss`` per sample, :class:`RegionDiffusionLoss` with the batch's domains); else ``None``
        and each region is scored on its own crop."""
        mask, reg = self.loss.mask, self.loss.reg
        if not (type(mask) is DiceLoss and not mask.batch and self.loss.mask_inputs == ("mask",)):
            return None
        if type(reg) is not RegionDiffusionLoss:
            return None
        mask, reg = copy.copy(mask), copy.copy(reg)
        mask.reduction = reg.reduction = "none"
        return mask, reg

    def batch_losses(self, batch: RegionBatch, u: torch.Tensor | None = None, control=None) -> torch.Tensor:
        """Loss of each region of ``batch`` ``(G,)`` for the fields ``u`` ``(G, D, *S)`` (level voxels), or on a
        lattice for the ``control`` values of a displacement (see :meth:`lattice_batch_losses`)."""
        if self.lattice_stride(batch) > 1:
            return self.lattice_batch_losses(batch, u, control)
        grid = self.warp.grid(u)
        sparse = self.sparse_terms(batch)
        if sparse is not None:
            active = active_points(sparse["interior"], grid)
            if int(active.sum()) <= self.sparse_fraction * active.numel():
                reg = self.batch_regulariser(batch, u)
                return self.point_losses(batch, grid, *gather_points(active), self.full_view(batch), reg)
        warped = self.warp.sample(batch.moving, grid)
        n_img = batch.fixed.shape[1]
        n_mask = batch.fixed_masks.shape[1]
        # split, not sliced: the backward of a slice zero-fills a gradient of the whole stack per slice, at every step
        warped_img, warped_masks = warped.split([n_img, warped.shape[1] - n_img], 1)
        w = self.loss.weights
        sims = u.new_zeros(len(batch))
        if self.features is not None and n_img:
            sq = (warped_img - batch.fixed).square() * batch.sim_weight
            sims = sq.flatten(1).sum(1) / self.sim_norm(batch)
        if batch.mask_domain is not None:  # warped masks (and EDT maps) count inside the field of view only
            warped_masks = warped_masks * batch.mask_domain
        if self.batched_terms is not None and (n_img == 0 or self.features is not None):
            mask = self.batched_terms[0](warped_masks[:, :n_mask], batch.fixed_masks).flatten(1).mean(1)
            return w["sim"] * sims + w["mask"] * mask + w["reg"] * self.batch_regulariser(batch, u)
        losses = []
        crop = batch.crop
        for b, region in enumerate(batch.regions):
            ub = crop(u, b)
            if n_img == 0:
                sim = ub.new_zeros(())
            elif self.features is not None:
                sim = sims[b]
            else:
                sim = self.loss.sim(crop(warped_img, b), region.fixed)
            wm = crop(warped_masks[:, :n_mask], b) if self.loss.needs_mask else None
            we = crop(warped_masks[:, -n_mask:], b) if self.loss.needs_edt else None
            mask = self.loss.mask_term(wm, region.fixed_masks, we, region.fixed_edt)
            reg = self.loss.reg_term(ub, region.reg_mask, region.spacing)
            losses.append(w["sim"] * sim + w["mask"] * mask + w["reg"] * reg)
        return torch.stack(losses)

    @staticmethod
    def sim_norm(batch: RegionBatch) -> torch.Tensor:
        """``(G,)`` the similarity's normaliser: each region's real crop voxels times the feature channels."""
        if "sim_norm" not in batch.cache:
            batch.cache["sim_norm"] = batch.valid.flatten(1).sum(1) * batch.fixed.shape[1]
        return batch.cache["sim_norm"]

    def regulariser_terms(self, batch: RegionBatch, device) -> tuple:
        """``(spacing (G, D), border weights)`` of the region diffusion of ``batch``, computed once (the regions do not
        change during the iterations)."""
        if "reg" not in batch.cache:
            spacing = torch.tensor([r.spacing for r in batch.regions], device=device)
            batch.cache["reg"] = spacing, self.batched_terms[1].border_weights(batch.reg_domain)
        return batch.cache["reg"]

    def batch_regulariser(self, batch: RegionBatch, u: torch.Tensor) -> torch.Tensor:
        """``(G,)`` the region diffusion of ``u`` within each region's domain (border weights computed once)."""
        spacing, weights = self.regulariser_terms(batch, u.device)
        return self.batched_terms[1](u, spacing=spacing, weights=weights)

    def background_terms(self, batch: RegionBatch) -> dict | None:
        """What scoring ``batch`` at a subset of points needs (:mod:`custom.sparse_warp`), computed once: where each
        moving stack holds its background (``interior`` ``(G, 1, *S)``), the similarity there (``bg_sq`` ``(G, N)``,
        ``bg_total`` ``(G,)``), the Dice targets' sums (``target_sum`` ``(G, C)``) and the count of voxels that can
        differ from the background (``outside`` ``(G,)``); ``None`` for a loss that is not features (or masks only) +
        linear Dice + region diffusion."""
        if "background" in batch.cache:
            return batch.cache["background"]
        batch.cache["background"] = None
        n_img, n_mask = batch.fixed.shape[1], batch.fixed_masks.shape[1]
        terms = self.batched_terms
        if terms is None or not linear_dice(terms[0]) or batch.moving.shape[1] != n_img + n_mask:
            return None
        if n_img and self.features is None:
            return None
        with torch.no_grad():
            background = background_of(self.features if n_img else None, n_mask, batch.moving)
            interior = background_interior(batch.moving, background)
            shape = (1, -1) + (1,) * (batch.moving.ndim - 2)
            bg_sq = ((background[:n_img].view(shape) - batch.fixed).square().sum(1) * batch.sim_weight[:, 0]).flatten(1)
            batch.cache["background"] = {
                "interior": interior,
                "bg_sq": bg_sq,
                "bg_total": bg_sq.sum(1),
                "target_sum": batch.fixed_masks.flatten(2).sum(2),
                "outside": (1.0 - interior).flatten(1).sum(1),
            }
        return batch.cache["background"]

    def sparse_terms(self, batch: RegionBatch) -> dict | None:
        """:meth:`background_terms` where the sparse step applies to ``batch``; ``None`` where it does not:
        ``sparse_warp`` off for this device, a loss without background terms, or a stack whose background covers too
        little of the grid to pay."""
        if "sparse" in batch.cache:
            return batch.cache["sparse"]
        batch.cache["sparse"] = None
        on = self.sparse_warp if self.sparse_warp != "auto" else batch.moving.device.type == "cpu"
        terms = self.background_terms(batch) if on else None
        if terms is not None and float(terms["interior"].mean()) >= 1.0 - self.sparse_fraction:
            batch.cache["sparse"] = terms
        return batch.cache["sparse"]

    def lattice_stride(self, batch: RegionBatch) -> int:
        """``sample_stride`` where ``batch`` is scored on a lattice (see ``sample_stride``), else 1."""
        if "stride" not in batch.cache:
            # masks only (regions outside the field of view): their loss lives on the borders, a voxel or two thick,
            # of which a lattice would see a fraction at each step (measured: a rougher field along the pleura)
            with_image = batch.fixed.shape[1] > 0
            terms = self.background_terms(batch) if self.sample_stride > 1 and with_image else None
            big = terms is not None and float(terms["outside"].min()) >= self.sample_min_points
            batch.cache["stride"] = self.sample_stride if big else 1
        return batch.cache["stride"]

    @staticmethod
    def full_view(batch: RegionBatch) -> dict:
        """The fixed-side tensors of ``batch`` that :meth:`point_losses` gathers from, at every voxel."""
        terms = batch.cache["background"]
        keys = ("fixed", "sim_weight", "fixed_masks", "mask_domain")
        return {**{k: getattr(batch, k) for k in keys}, "bg_sq": terms["bg_sq"], "scale": 1.0}

    @staticmethod
    def lattice_view(batch: RegionBatch, lattice: tuple[slice, ...], phase: int) -> dict:
        """:meth:`full_view` at the voxels of ``lattice`` (one slice per axis; cached per ``phase``), ``scale`` the
        voxels per lattice point."""
        views = batch.cache.setdefault("lattice", {})
        if phase not in views:
            cut = (slice(None), slice(None)) + lattice
            g = len(batch)
            keep = {k: getattr(batch, k) for k in ("fixed", "sim_weight", "fixed_masks", "mask_domain")}
            view = {k: None if v is None else v[cut].contiguous() for k, v in keep.items()}
            bg_sq = batch.cache["background"]["bg_sq"].view(g, 1, *batch.shape)[cut]
            view["bg_sq"] = bg_sq.reshape(g, -1)
            view["scale"] = float(math.prod(batch.shape)) / bg_sq[0, 0].numel()
            views[phase] = view
        return views[phase]

    def lattice_batch_losses(self, batch: RegionBatch, u: torch.Tensor | None = None, control=None) -> torch.Tensor:
        """:meth:`batch_losses` on a lattice of every ``sample_stride``-th voxel per axis, its offset the next of the
        ``stride ** D`` phases at each call (the batch counts its calls): the lattice points that can differ from their
        background (the sparse step's active points; all of them where the sparse step does not apply), their sums
        scaled to the grid. The field is ``u`` ``(G, D, *S)``, or ``control`` = ``(basis, param)``: a displacement
        that :class:`ControlGrid` ``basis`` upsamples linearly from ``param``, then read at the lattice points only and
        regularised on the control grid (:mod:`custom.control_lattice`)."""
        strides = [min(self.lattice_stride(batch), n) for n in batch.shape]  # a singleton axis keeps its voxel
        step = batch.cache.get("step", 0)
        batch.cache["step"] = step + 1
        phase = step % math.prod(strides)
        lattice, rest = [], phase
        for st in strides:
            lattice.append(slice(rest % st, None, st))
            rest //= st
        lattice = tuple(lattice)
        view = self.lattice_view(batch, lattice, phase)
        if control is None:
            grid = self.warp.grid(u, lattice)
            reg = self.batch_regulariser(batch, u)
        else:
            basis, param = control
            c = self.integrate.freeze(basis.values(param))  # no fine axes here: nothing smoothed
            fields = batch.cache.setdefault("lattice_field", {})
            if phase not in fields:
                fields[phase] = LatticeField(basis.grid, batch.shape, lattice, c.device, c.dtype)
            grid = self.warp.lattice_grid(fields[phase](c), batch.shape, lattice)
            reg = self.control_regulariser(batch, basis, c)
        if self.sparse_terms(batch) is not None:
            index, real = gather_points(active_points(batch.cache["background"]["interior"], grid))
        else:  # every lattice point (no host sync on a GPU)
            n = view["bg_sq"].shape[1]
            index = torch.arange(n, device=grid.device).expand(len(batch), n)
            real = torch.ones(index.shape, dtype=torch.bool, device=grid.device)
        return self.point_losses(batch, grid, index, real, view, reg)

    def control_regulariser(self, batch: RegionBatch, basis: ControlGrid, c: torch.Tensor) -> torch.Tensor:
        """``(G,)`` :meth:`batch_regulariser` of the field upsampled from the control values ``c`` ``(G, D, *grid)``,
        taken on the control grid (:class:`custom.control_lattice.ControlDiffusion`, built once per batch)."""
        if "control_reg" not in batch.cache:
            spacing, weights = self.regulariser_terms(batch, c.device)
            batch.cache["control_reg"] = ControlDiffusion(basis.grid, batch.shape, weights, spacing.to(c.dtype))
        return batch.cache["control_reg"](c)

    def point_losses(self, batch: RegionBatch, grid, index, real, view: dict, reg: torch.Tensor) -> torch.Tensor:
        """:meth:`batch_losses` from the points ``index`` ``(G, K)`` of ``grid`` (``real``: not padding) only: the
        similarity of the other voxels is their background's (``bg_sq``), their Dice terms are 0 (see
        :mod:`custom.sparse_warp`); ``view`` holds the fixed-side tensors the indices refer to (:meth:`full_view`,
        :meth:`lattice_view`) and ``scale``, the voxels each point stands for; ``reg`` ``(G,)`` the regulariser."""
        terms = batch.cache["background"]
        scale = view["scale"]
        realf = real.to(grid.dtype)
        samples = sample_points(batch.moving, grid, index, real)
        n_img, n_mask = batch.fixed.shape[1], batch.fixed_masks.shape[1]
        s_img, s_mask = samples.split([n_img, n_mask], 1)
        w = self.loss.weights
        sims = grid.new_zeros(len(batch))
        if n_img:
            weight = gather_channels(view["sim_weight"], index)[:, 0] * realf
            here = (weight * (s_img - gather_channels(view["fixed"], index)).square().sum(1)).sum(1)
            background = (view["bg_sq"].gather(1, index) * realf).sum(1)
            sims = (terms["bg_total"] - scale * background + scale * here) / self.sim_norm(batch)
        if view["mask_domain"] is not None:
            s_mask = s_mask * gather_channels(view["mask_domain"], index)
        tp = (s_mask * gather_channels(view["fixed_masks"], index)).sum(2)  # padding points sample 0: no tp, no sum
        dice = dice_from_sums(self.batched_terms[0], scale * tp, scale * s_mask.sum(2), terms["target_sum"])
        return w["sim"] * sims + w["mask"] * dice.mean(1) + w["reg"] * reg

    def optimise_batch(self, batch: RegionBatch, init: torch.Tensor, n_it: int, bar=None) -> torch.Tensor:
        """Adam on the control grids of every region of ``batch`` from ``init`` ``(G, D, *S)`` (the field in level
        voxels, velocity or displacement); returns the best field found per region, ``(G, D, *S)``, or the last one
        where the losses are lattice estimates (``sample_stride``): the lowest of noisy estimates is a lucky one, not
        the best field, and the cosine schedule ends with small steps.

        The parameters live on the control grid (see :class:`ControlGrid`): every basis function spans at least two
        level voxels each side and one Adam step moves the field by up to ``lr`` times that span, so a finer control
        grid adds freedom without adding per-voxel noise or changing the step in mm."""
        size = batch.shape
        grid = self.control_grid(size, [min(r.spacing[d] for r in batch.regions) for d in range(len(size))])
        basis = ControlGrid(grid, size)
        param = torch.nn.Parameter(basis.parameters_of(self.integrate.freeze(init)).contiguous())
        opt = torch.optim.Adam([param], lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_it, 1), eta_min=0.05 * self.lr)
        sampled = self.lattice_stride(batch) > 1  # each step's losses estimate the full ones on a shifting lattice
        # a displacement upsampled linearly from the control grid is read at the lattice points only
        on_control = self.lattice_on_control and sampled and self.integrate.integrate is None and not basis.fine_axes
        if not sampled:  # keep each region's best iterate: Adam's normalised steps can oscillate at the end
            best_loss = param.new_full((len(batch),), float("inf"))
            best = param.detach().clone()
        window = param.new_zeros(())  # sampled: the losses summed over the early stop's window (every phase in it)
        history = []
        for it in range(n_it):
            opt.zero_grad(set_to_none=True)
            if on_control:
                losses = self.batch_losses(batch, control=(basis, param))
            else:
                losses = self.batch_losses(batch, self.integrate(basis.field(param)))
            with torch.no_grad():
                if sampled:
                    window = window + losses.detach().sum()
                else:
                    better = losses.detach() < best_loss
                    best_loss = torch.where(better, losses.detach(), best_loss)
                    best = torch.where(better.view((-1,) + (1,) * (param.ndim - 1)), param.detach(), best)
            losses.sum().backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(len(batch))
            if self.tolerance > 0 and (it + 1) % self.patience == 0:
                history.append(float(window) / self.patience if sampled else float(best_loss.sum()))
                window = window.new_zeros(())
                if len(history) > 1 and history[-2] - history[-1] <= self.tolerance * abs(history[-2]):
                    if bar is not None:
                        bar.update(len(batch) * (n_it - it - 1))
                    break
        return basis.field(param.detach() if sampled else best)

    # ----------------------------------------------------------------------------------------------------------
    def solve(self, plan: RegionPlan, tasks: Sequence[RegionTask], fixed, moving, spacing, bar=None) -> list:
        """Field (velocity or displacement, level voxels) of every task on its crop at the finest level."""
        with self.phase("noise level"):
            noise_var = noise_variance(fixed) if self.gated else None  # the whole fixed image's, at full resolution
        boxes = [plan.box_shape(t.index) for t in tasks]
        counts = [float(plan.mask("fixed", t.index).sum()) if t.region else math.inf for t in tasks]
        fields: list[torch.Tensor | None] = [None] * len(tasks)
        offsets = [self.initial_offset(plan, t) for t in tasks]
        last = len(self.levels) - 1
        for level, n_it in enumerate(self.iterations):
            sizes = [self.level_size(shape, spacing, level) for shape in boxes]
            # after the first level, small regions work at a finer resolution than the level's: cheap (their crops are
            # small), and thin structures are not lost to downsampling
            if level > 0 or level == last:
                sizes = [self.refine(s, b, c) for s, b, c in zip(sizes, boxes, counts)]
            spacings = [level_spacing(shape, s, spacing) for shape, s in zip(boxes, sizes)]
            for k in range(len(tasks)):  # carry each field to this level's grid
                prev = fields[k]
                if prev is None:  # 0, or the centroid translation, in this level's voxels
                    prev = fixed.new_zeros((1, len(spacing), *[1] * len(spacing)))
                    if offsets[k] is not None:
                        scale = [(n - 1) / max(b - 1, 1) for n, b in zip(sizes[k], boxes[k])]
                        prev = (offsets[k] * prev.new_tensor(scale)).view(prev.shape)
                    prev = prev.expand(1, len(spacing), *sizes[k]).clone()
                fields[k] = resize_field(prev, sizes[k])
            todo = []
            for k, task in enumerate(tasks):
                if not task.use_similarity and self.mask_only_levels is not None and level >= self.mask_only_levels:
                    if bar is not None:  # no image term: the masks' field is smooth, the finer levels add nothing
                        bar.update(n_it)
                    continue
                if level != last and task.region:  # skip a region too small at this level before describing it
                    if float(resize(plan.mask("fixed", task.index), sizes[k]).sum()) < self.min_region_voxels:
                        if bar is not None:
                            bar.update(n_it)
                        continue
                with self.small_work(fixed.device, math.prod(boxes[k])), self.phase(f"level {level + 1} set-up"):
                    level_k = self.region_level(plan, task, fixed, moving, sizes[k], spacings[k], noise_var)
                todo.append((k, level_k))
            for use_similarity in (True, False):  # one channel layout per batch: features + masks, or masks only
                same = [t for t in todo if t[1].use_similarity == use_similarity]
                for group in group_by_shape([r.shape for _, r in same], self.max_padding):
                    with self.phase(f"level {level + 1} optimisation"):
                        self.optimise_group([same[g] for g in group], fields, n_it, bar)
        return fields

    def optimise_group(self, members: list, fields: list, n_it: int, bar=None) -> None:
        """Optimise the regions ``members`` (``(task number, RegionLevel)``) as one batch; updates ``fields``."""
        batch = RegionBatch.stack([r for _, r in members])
        init = torch.cat([pad_to(fields[k], batch.shape, "replicate") for k, _ in members])
        with self.small_work(batch.fixed.device, len(batch) * math.prod(batch.shape), len(batch) == 1):
            out = self.optimise_batch(batch, init, n_it, bar)
        for b, (k, _) in enumerate(members):
            fields[k] = batch.crop(out, b).detach()

    def set_field_of_view(self, fixed: torch.Tensor, fixed_label: torch.Tensor) -> None:
        """Whether the pair's mask loss counts inside its field of view only (``mask_fov``; "auto": the fixed labels
        end at it) and, if so, that field of view (``fixed > fov_value``, ``(1, 1, *S)``; else ``None``)."""
        self.pair_fov, self.pair_mask_fov = None, False
        if self.fov_value is None:
            return
        fov = fixed > self.fov_value
        if self.mask_fov != "auto":
            self.pair_mask_fov = bool(self.mask_fov)
        else:
            labelled = plain(fixed_label) > 0
            outside = float((labelled & ~fov).sum()) / max(float(labelled.sum()), 1.0)
            missing = 1.0 - float(fov.float().mean())
            self.pair_mask_fov = outside < 0.01 and missing >= 0.01
        self.pair_fov = fov.float() if self.pair_mask_fov else None
        if self.pair_mask_fov and self.mask_fov == "auto":
            logger.info(
                "mask_fov='auto': the fixed labels end at the field of view (%.2f %% of them outside it, %.0f %% of the"
                " image outside it): the mask loss counts inside the field of view only",
                100 * outside,
                100 * missing,
            )

    def set_frozen(self, components: Sequence[int]) -> None:
        """Hold these displacement components at 0 (the pair's in-plane decision plus ``frozen_components``)."""
        self.frozen_components = sorted({int(c) for c in components})
        self.integrate = VelocityToDisplacement(self.num_steps, self.frozen_components)

    def __call__(self, fixed, moving, fixed_label, moving_label, spacing: Sequence[float] | None = None) -> dict:
        threads = torch.get_num_threads()
        if self.num_threads is not None and fixed.device.type == "cpu":
            torch.set_num_threads(min(threads, self.num_threads))
        try:
            return self.register(fixed, moving, fixed_label, moving_label, spacing)
        finally:
            torch.set_num_threads(threads)

    def register(self, fixed, moving, fixed_label, moving_label, spacing: Sequence[float] | None = None) -> dict:
        """The registration of one pair (``__call__`` without the thread cap)."""
        if spacing is None and getattr(fixed, "affine", None) is not None:
            spacing = voxel_spacing(fixed.affine).tolist()
        # one memory layout: a volume read from NIfTI arrives Fortran-ordered (first axis fastest), and every
        # whole-volume pass below (plan, noise level, crops, composition, warping) runs at half speed or less on it;
        # the plan keeps the label maps as contiguous int16 (custom.regions.compact_labels)
        fixed, moving = plain(fixed).float().contiguous(), plain(moving).float().contiguous()
        for name, t in (("fixed", fixed), ("moving", moving)):
            check_finite(t, f"the {name} image")
        if not (fixed.shape == moving.shape == fixed_label.shape == moving_label.shape) or fixed.shape[:2] != (1, 1):
            raise ValueError(
                "IterativeSegReg expects fixed, moving and both label maps as (1, 1, *S) on one grid; got "
                f"{[tuple(t.shape) for t in (fixed, moving, fixed_label, moving_label)]}. Resample them first."
            )
        spacing = [1.0] * (fixed.ndim - 2) if spacing is None else [float(s) for s in spacing]
        frozen, message = in_plane_components(self.in_plane, spacing, "the fixed image")
        if message:
            logger.info(message)
        self.set_frozen(self.base_frozen + list(frozen))
        self.last_profile = {}
        with self.phase("plan"):
            self.set_field_of_view(fixed, fixed_label)
            plan = self.plan(fixed_label, moving_label, spacing)
            tasks = self.tasks(plan, fixed)
        bar = tqdm(
            total=len(tasks) * sum(self.iterations), desc="IterativeSegReg", disable=not self.progress, leave=False
        )
        ddf = plan.new_field()
        try:
            fields = self.solve(plan, tasks, fixed, moving, spacing, bar)
            with torch.no_grad(), self.phase("composition"):
                for task, field in zip(tasks, fields):
                    u = self.integrate(resize_field(field, plan.box_shape(task.index)))
                    plan.paste(ddf, task.index, u)
                fields = u = None  # a sub-field on its box can be a whole-grid copy: not kept through the warping
        finally:
            bar.close()
        moving_label = plan.moving_label  # the plan's copy: contiguous, integer
        del plan  # and its cached composition weights (a float box per region): the warping needs the memory
        with self.phase("warping"):
            out = {"ddf": ddf, "warped_image": self.warp_image(moving, ddf)}
            # MONAI's Warp caches its reference grid (D floats per voxel) per module: the label warp reuses the image
            # warp's instead of building its own, and neither keeps it once the pair is done
            self.warp_label.ref_grid = self.warp_image.ref_grid
            try:
                out["warped_label"] = self.warp_label(moving_label.float(), ddf)
            finally:
                self.warp_image.ref_grid = self.warp_label.ref_grid = None
        logger.debug("IterativeSegReg CPU seconds per phase: %s", self.last_profile)
        return out


class IterativeInferer(Inferer):
    """MONAI ``Inferer`` around :class:`IterativeSegReg`, so evaluator configs can run the training-free mode.

    ``__call__(inputs, network, fixed_label, moving_label, spacing=None)`` with ``inputs = cat([moving, fixed])``
    ``(B, 2, *S)``, label maps ``(B, 1, *S)`` and the fixed voxel ``spacing`` (mm per axis, from ``PairBatch``)
    returns ``{"ddf", "warped_image", "warped_label"}`` like ``SegRegInferer``.
    ``network`` is ignored (the field is optimised per pair); gradients are enabled inside even when the evaluator
    runs under ``torch.no_grad``. Keyword arguments go to :class:`IterativeSegReg`.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.optimiser = IterativeSegReg(**kwargs)

    def __call__(self, inputs, network=None, fixed_label=None, moving_label=None, spacing=None, **kwargs) -> dict:
        if fixed_label is None or moving_label is None:
            raise ValueError("IterativeInferer needs fixed_label and moving_label (label maps, (B, 1, *S)).")
        inputs = plain(inputs)
        if inputs.shape[1] != 2:
            raise ValueError(f"inputs must be cat([moving, fixed], dim=1) with 2 channels, got {tuple(inputs.shape)}")
        outs = []
        with torch.enable_grad():
            for b in range(inputs.shape[0]):
                outs.append(
                    self.optimiser(
                        inputs[b : b + 1, 1:],
                        inputs[b : b + 1, :1],
                        fixed_label[b : b + 1],
                        moving_label[b : b + 1],
                        spacing=spacing,
                    )
                )
        return {k: torch.cat([o[k].detach() for o in outs]) for k in ("ddf", "warped_image", "warped_label")}
