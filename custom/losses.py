"""SegReg losses: EDT mask losses, the region-wise diffusion regulariser and the combined loss.

:class:`SegRegLoss` takes its three terms as loss modules (built by configs with ``_target_``), so any similarity
(MSE, MONAI LNCC, :class:`~custom.mind.MINDSSCLoss`, ...) or mask loss (MONAI ``DiceLoss``, :class:`EDTLoss`,
:class:`EDTDiceLoss`, ...) plugs in. A mask loss states what it compares through its ``inputs`` attribute:
``("mask",)`` (the default, e.g. MONAI ``DiceLoss``), ``("edt",)`` or ``("mask", "edt")``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.losses import DiceLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from custom.utils import reduce


def mask_inputs(loss: torch.nn.Module) -> tuple[str, ...]:
    """What a mask loss compares: ``("mask",)``, ``("edt",)`` or ``("mask", "edt")`` (its ``inputs`` attribute)."""
    inputs = tuple(getattr(loss, "inputs", ("mask",)))
    if not inputs or set(inputs) - {"mask", "edt"}:
        raise ValueError(f"{type(loss).__name__}.inputs must name 'mask' and/or 'edt', got {inputs}")
    return inputs


class EDTLoss(_Loss):
    """MSE between the warped moving and the fixed region EDT maps (each normalised to 0..1 inside its region).

    ``forward(pred, target)``: ``pred`` the moving EDT map warped with the predicted field, ``target`` the fixed
    EDT map, both ``(B, C, *S)`` (see ``custom.regions.normalised_edt``). 0 for identical maps.
    ``reduction="none"`` returns the squared error ``(B, C, *S)``.
    """

    inputs = ("edt",)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"EDT maps differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
        return reduce((pred - target) ** 2, self.reduction)


class EDTDiceLoss(_Loss):
    """The paper's combined mask loss ``(Dice + edt_scale * EDT) / 2``.

    ``forward(pred_mask, target_mask, pred_edt, target_edt)``, all ``(B, C, *S)``. ``dice`` defaults to MONAI
    ``DiceLoss(include_background=True)``; ``edt_scale`` is 100 in the paper. Reduction: "mean" or "sum" (of both
    terms, each reduced the same way).
    """

    inputs = ("mask", "edt")

    def __init__(self, edt_scale: float = 100.0, dice: torch.nn.Module | None = None, reduction: str = "mean"):
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction == LossReduction.NONE.value:
            raise ValueError("EDTDiceLoss sums two terms of different shapes; use reduction 'mean' or 'sum'")
        self.edt_scale = float(edt_scale)
        self.dice = dice if dice is not None else DiceLoss(include_background=True, reduction=self.reduction)
        self.edt = EDTLoss(reduction=self.reduction)

    def forward(self, pred_mask, target_mask, pred_edt, target_edt) -> torch.Tensor:
        return 0.5 * (self.dice(pred_mask, target_mask) + self.edt_scale * self.edt(pred_edt, target_edt))


class _WeightedDiffusion(torch.autograd.Function):
    """``(B,)``: ``sum_k sum_c coef[b, c, k] * sum_x w_k(x) d_ck(x)^2 / W_k`` for ``ddf`` ``(B, C, *S)``, with ``d_ck``
    the forward difference of component c along axis k and ``(w_k, W_k)`` the :meth:`RegionDiffusionLoss.border_weights`
    of axis k (``None``: every difference weighs ``1 / M``). The gradient is written out (``2 coef w d / W``, added at
    ``x + e_k`` and taken at ``x``): one pass per axis each way, where autograd through the same expression keeps about
    three times as many whole-grid tensors. Same values as that expression to float rounding."""

    @staticmethod
    def forward(ctx, ddf: torch.Tensor, coef: torch.Tensor, weights) -> torch.Tensor:
        ctx.dtype = ddf.dtype
        with torch.autocast(ddf.device.type, enabled=False):  # sums over a whole grid: never in half precision
            ddf = ddf.to(torch.promote_types(ddf.dtype, torch.float32))
            return _WeightedDiffusion._forward(ctx, ddf, coef.to(ddf.dtype), weights)

    @staticmethod
    def _forward(ctx, ddf: torch.Tensor, coef: torch.Tensor, weights) -> torch.Tensor:
        b, c = ddf.shape[:2]
        total = ddf.new_zeros(b)
        saved, ctx.axes = [], []
        for k in range(ddf.ndim - 2):
            axis, n = 2 + k, ddf.shape[2 + k]
            if n < 2:
                continue
            d = ddf.narrow(axis, 1, n - 1) - ddf.narrow(axis, 0, n - 1)
            if weights is None:
                wd, norm = d, ddf.new_full((b,), float(d[0, 0].numel()))
            else:
                w, norm = weights[k]
                wd, norm = d * w.to(ddf.dtype).view(w.shape[0], 1, *d.shape[2:]), norm.to(ddf.dtype)
            sums = (wd * d).flatten(2).sum(2)  # (B, C); not bmm: BLAS threads spin on small grids
            scale = coef[..., k] / norm.unsqueeze(1)  # (B, C); weights of one case broadcast over the batch
            total = total + (sums * scale).sum(1)
            saved += [wd, scale]
            ctx.axes.append(axis)
        ctx.save_for_backward(*saved)  # intermediates too: freed after backward unless the graph is retained
        ctx.shape = ddf.shape
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable  # no second derivative: a double backward raises
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        saved = ctx.saved_tensors
        grad = grad.to(saved[0].dtype) if saved else grad
        out = grad.new_zeros(ctx.shape)
        for axis, wd, scale in zip(ctx.axes, saved[0::2], saved[1::2]):
            n = ctx.shape[axis]
            g = wd * (2.0 * scale * grad.unsqueeze(1)).view(scale.shape + (1,) * (wd.ndim - 2))
            out.narrow(axis, 1, n - 1).add_(g)
            out.narrow(axis, 0, n - 1).sub_(g)
        return out.to(ctx.dtype), None, None


class RegionDiffusionLoss(_Loss):
    """L2 diffusion regulariser summed within regions, per millimetre: no finite difference crosses a region border.

    ``forward(ddf, regions=None, spacing=None)``: ``ddf`` ``(B, D, *S)`` in voxels; ``regions`` ``(B, N, *S)`` one-hot
    (or soft) fixed-space masks; ``spacing`` the voxel size in mm per axis, or ``(B, D)`` one row per case (overrides
    the constructor's; ``None`` = isotropic 1 mm, i.e. voxel units). Component c is converted to mm (``u_c * s_c``)
    and its forward difference along axis k is divided by ``s_k``, so the gradient is in mm/mm and a 10 mm slice step
    costs what it physically is.
    The difference between voxels x and x+e_k is weighted by ``w = sum_i S_i(x) S_i(x+e_k)`` (1 when both lie in the
    same region, 0 across a border). Per case: sum over axes k of the weighted mean
    ``sum(w * mean_c (du_c/dx_k)^2) / sum(w)``, so the scale does not depend on the region's size. With
    ``regions=None`` every pair counts (plain global diffusion). ``reduction``: "mean" / "sum" over the batch,
    "none" gives ``(B,)``.
    """

    def __init__(self, spacing: Sequence[float] | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.spacing = None if spacing is None else [float(s) for s in spacing]

    @staticmethod
    def border_weights(regions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per axis, the weights ``w`` of the forward differences ``(B, M)`` and their sums ``(B,)`` (``None`` for an
        axis of one voxel): what :meth:`forward` computes from ``regions`` ``(B, N, *S)``, to reuse over many calls
        with the same regions (``forward(..., weights=...)``)."""
        out = []
        for k in range(regions.ndim - 2):
            axis, n = 2 + k, regions.shape[2 + k]
            if n < 2:
                out.append(None)
                continue
            w = (regions.narrow(axis, 1, n - 1) * regions.narrow(axis, 0, n - 1)).sum(1).flatten(1)
            out.append((w, w.sum(1).clamp_min(1.0)))
        return out

    def forward(
        self, ddf: torch.Tensor, regions: torch.Tensor | None = None, spacing=None, weights=None
    ) -> torch.Tensor:
        """``weights``: :meth:`border_weights` of ``regions``, computed once (then ``regions`` may be ``None``)."""
        dims = ddf.ndim - 2
        if regions is not None and (regions.shape[0] != ddf.shape[0] or regions.shape[2:] != ddf.shape[2:]):
            raise ValueError(f"regions {tuple(regions.shape)} do not match ddf {tuple(ddf.shape)}")
        sp = spacing if spacing is not None else self.spacing
        sp = torch.ones(dims) if sp is None else torch.as_tensor(sp, dtype=torch.float32)
        sp = sp.to(device=ddf.device, dtype=torch.promote_types(ddf.dtype, torch.float32)).reshape(
            -1, sp.shape[-1] if sp.ndim else 1
        )
        if sp.shape[-1] != dims or sp.shape[0] not in (1, ddf.shape[0]):
            raise ValueError(
                f"spacing {sp.tolist()} must give one value per spatial axis ({dims}), or one row per case"
            )
        if weights is None and regions is not None:
            weights = self.border_weights(regions)
        # the mean over components of ((u_c s_c)(x + e_k) - (u_c s_c)(x))^2 / s_k^2: coefficient (s_c / s_k)^2 / C
        comp = sp if ddf.shape[1] == dims else torch.ones_like(sp[:, :1])
        coef = (comp.unsqueeze(-1) / sp.unsqueeze(1)).square() / ddf.shape[1]  # (B or 1, C or 1, D)
        total = _WeightedDiffusion.apply(ddf, coef.expand(ddf.shape[0], ddf.shape[1], dims), weights)
        return reduce(total, self.reduction)


class SegRegLoss(torch.nn.Module):
    """``g0 * L_sim + g1 * L_mask + g2 * L_reg`` for one region pair (training) or one region (iterative).

    Args:
        similarity: image loss module, ``(warped, fixed) -> scalar`` (e.g. ``torch.nn.MSELoss``, MONAI
            ``LocalNormalizedCrossCorrelationLoss``, ``custom.mind.MINDSSCLoss``).
        mask: mask loss module; what it compares is given by its ``inputs`` (see :func:`mask_inputs`), e.g. MONAI
            ``DiceLoss``, :class:`EDTLoss`, :class:`EDTDiceLoss`.
        regulariser: field regulariser, ``(ddf) -> scalar`` (MONAI ``DiffusionLoss``) or ``(ddf, regions)``
            (:class:`RegionDiffusionLoss`, called with the fixed masks where the caller gives them).
        weights: ``{"sim": g0, "mask": g1, "reg": g2}``; defaults 1 : 0.1 : 0.01.

    ``forward(warped, fixed, warped_mask, fixed_mask, ddf, warped_edt=None, fixed_edt=None, regions=None)`` with
    images ``(B, 1, *S)``, masks / EDT maps ``(B, C, *S)`` and ``ddf`` ``(B, D, *S)`` returns a dict of scalars:
    ``loss`` (total), ``sim``, ``mask``, ``reg``. ``use_similarity=False`` drops the image term (a region outside
    the fixed field of view); ``spacing`` (mm per axis) reaches a spacing-aware regulariser.
    """

    DEFAULT_WEIGHTS = {"sim": 1.0, "mask": 0.1, "reg": 0.01}

    def __init__(
        self,
        similarity: torch.nn.Module,
        mask: torch.nn.Module,
        regulariser: torch.nn.Module | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        for name, mod in (("similarity", similarity), ("mask", mask)):
            if not callable(mod) or isinstance(mod, str):
                raise TypeError(f"SegRegLoss {name} must be a loss module (config: a '_target_' entry), got {mod!r}")
        unknown = set(weights or {}) - set(self.DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; use 'sim', 'mask' and 'reg'")
        w = dict(self.DEFAULT_WEIGHTS)
        w.update(weights or {})
        self.weights = {k: float(v) for k, v in w.items()}
        self.sim, self.mask = similarity, mask
        self.reg = regulariser if regulariser is not None else RegionDiffusionLoss()
        self.mask_inputs = mask_inputs(mask)

    @property
    def needs_edt(self) -> bool:
        return "edt" in self.mask_inputs

    @property
    def needs_mask(self) -> bool:
        return "mask" in self.mask_inputs

    def mask_term(self, warped_mask, fixed_mask, warped_edt=None, fixed_edt=None) -> torch.Tensor:
        args = []
        for kind in self.mask_inputs:
            pred, target = (warped_mask, fixed_mask) if kind == "mask" else (warped_edt, fixed_edt)
            if pred is None or target is None:
                raise ValueError(f"{type(self.mask).__name__} needs warped and fixed {kind} maps")
            args += [pred, target]
        return self.mask(*args)

    def reg_term(self, ddf: torch.Tensor, regions: torch.Tensor | None = None, spacing=None) -> torch.Tensor:
        """The regulariser; ``regions`` and ``spacing`` (mm per axis) reach a :class:`RegionDiffusionLoss`."""
        if not isinstance(self.reg, RegionDiffusionLoss):
            return self.reg(ddf)
        return self.reg(ddf, regions, spacing)

    def forward(
        self,
        warped,
        fixed,
        warped_mask,
        fixed_mask,
        ddf,
        warped_edt=None,
        fixed_edt=None,
        regions=None,
        use_similarity: bool = True,
        spacing=None,
    ) -> dict:
        sim = self.sim(warped, fixed) if use_similarity else ddf.new_zeros(())
        mask = self.mask_term(warped_mask, fixed_mask, warped_edt, fixed_edt)
        reg = self.reg_term(ddf, regions, spacing)
        total = self.weights["sim"] * sim + self.weights["mask"] * mask + self.weights["reg"] * reg
        return {"loss": total, "sim": sim.detach(), "mask": mask.detach(), "reg": reg.detach()}
