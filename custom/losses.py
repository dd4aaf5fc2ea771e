"""SegReg losses: EDT mask loss, region-wise diffusion regulariser and the combined training loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.losses import DiceLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from torch.nn.modules.loss import _Loss

from custom.mind import MINDSSCLoss


class EDTLoss(_Loss):
    """MSE between the warped moving and the fixed region EDT maps (each normalised to 0..1 inside its region).

    ``forward(pred, target)``: ``pred`` the moving EDT map warped with the predicted field, ``target`` the fixed
    EDT map, both ``(B, 1, *S)`` (see ``custom.regions.normalised_edt``). 0 for identical maps.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"EDT maps differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
        return torch.mean((pred - target) ** 2)


class RegionDiffusionLoss(_Loss):
    """L2 diffusion regulariser summed within regions: no finite difference crosses a region border.

    ``forward(ddf, regions=None)``: ``ddf`` ``(B, D, *S)``; ``regions`` ``(B, N, *S)`` one-hot (or soft) fixed-space
    masks. The forward difference between voxels x and x+e_k is weighted by ``w = sum_i S_i(x) S_i(x+e_k)`` (1 when
    both lie in the same region, 0 across a border). Result: sum over axes k of the weighted mean
    ``sum(w * mean_c (u_c(x+e_k) - u_c(x))^2) / sum(w)``, so the scale does not depend on the region's size.
    With ``regions=None`` every pair counts (plain global diffusion).
    """

    def forward(self, ddf: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        spatial = ddf.ndim - 2
        if regions is not None and (regions.shape[0] != ddf.shape[0] or regions.shape[2:] != ddf.shape[2:]):
            raise ValueError(f"regions {tuple(regions.shape)} do not match ddf {tuple(ddf.shape)}")
        total = ddf.new_zeros(())
        for axis in range(2, 2 + spatial):
            n = ddf.shape[axis]
            if n < 2:
                continue
            diff = ddf.narrow(axis, 1, n - 1) - ddf.narrow(axis, 0, n - 1)
            sq = (diff * diff).mean(1, keepdim=True)
            if regions is None:
                total = total + sq.mean()
                continue
            w = (regions.narrow(axis, 1, n - 1) * regions.narrow(axis, 0, n - 1)).sum(1, keepdim=True).to(sq.dtype)
            total = total + (sq * w).sum() / w.sum().clamp_min(1.0)
        return total


class SegRegLoss(torch.nn.Module):
    """Training loss ``g0 * L_sim + g1 * L_mask + g2 * L_reg`` for one region pair.

    Args:
        similarity: "mse", "ncc" (MONAI LNCC) or "mind" (MIND-SSC).
        mask_loss: "dice" (MONAI DiceLoss), "edt" (:class:`EDTLoss`) or "edt_dice" (``(Dice + edt_scale * EDT) / 2``).
        weights: ``{"sim": g0, "mask": g1, "reg": g2}``.
        ncc_kernel_size, mind_radius, mind_dilation: similarity settings.
        edt_scale: weight of the EDT term inside "edt_dice" (100 in the paper).

    ``forward(warped, fixed, warped_mask, fixed_mask, ddf, warped_edt=None, fixed_edt=None)`` with images and
    masks ``(B, 1, *S)`` and ``ddf`` ``(B, D, *S)`` returns a dict of scalars: ``loss`` (total), ``sim``, ``mask``,
    ``reg``.
    """

    SIMILARITIES = ("mse", "ncc", "mind")
    MASK_LOSSES = ("dice", "edt", "edt_dice")

    def __init__(
        self,
        similarity: str = "mse",
        mask_loss: str = "dice",
        weights: Mapping[str, float] | None = None,
        spatial_dims: int = 3,
        ncc_kernel_size: int = 9,
        mind_radius: int = 1,
        mind_dilation: int = 2,
        edt_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if similarity not in self.SIMILARITIES:
            raise ValueError(f"similarity must be one of {self.SIMILARITIES}, got {similarity!r}")
        if mask_loss not in self.MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {self.MASK_LOSSES}, got {mask_loss!r}")
        w = {"sim": 1.0, "mask": 0.1, "reg": 0.01}
        w.update(weights or {})
        self.weights = {k: float(v) for k, v in w.items()}
        self.mask_loss = mask_loss
        if similarity == "mse":
            self.sim = torch.nn.MSELoss()
        elif similarity == "ncc":
            self.sim = LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=ncc_kernel_size)
        else:
            self.sim = MINDSSCLoss(radius=mind_radius, dilation=mind_dilation)
        self.dice = DiceLoss(include_background=True, reduction="mean")
        self.edt = EDTLoss()
        self.edt_scale = edt_scale
        self.reg = DiffusionLoss()

    def mask_term(self, warped_mask, fixed_mask, warped_edt=None, fixed_edt=None) -> torch.Tensor:
        if self.mask_loss != "dice" and (warped_edt is None or fixed_edt is None):
            raise ValueError(f"mask_loss={self.mask_loss!r} needs warped_edt and fixed_edt")
        if self.mask_loss == "dice":
            return self.dice(warped_mask, fixed_mask)
        if self.mask_loss == "edt":
            return self.edt(warped_edt, fixed_edt)
        return 0.5 * (self.dice(warped_mask, fixed_mask) + self.edt_scale * self.edt(warped_edt, fixed_edt))

    def forward(self, warped, fixed, warped_mask, fixed_mask, ddf, warped_edt=None, fixed_edt=None) -> dict:
        sim = self.sim(warped, fixed)
        mask = self.mask_term(warped_mask, fixed_mask, warped_edt, fixed_edt)
        reg = self.reg(ddf)
        total = self.weights["sim"] * sim + self.weights["mask"] * mask + self.weights["reg"] * reg
        return {"loss": total, "sim": sim.detach(), "mask": mask.detach(), "reg": reg.detach()}
