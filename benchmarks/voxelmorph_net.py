"""VoxelMorph's own network (``voxelmorph`` 0.3, PyTorch) behind SegReg's backbone interface, for the learned peer.

:class:`VxmVelocityNet` takes ``cat([moving, fixed], dim=1)`` ``(B, 2, *S)`` and returns VoxelMorph's stationary
velocity field ``(B, D, *S)`` (voxels), so the bundle's trainer and ``SegRegInferer`` integrate, warp and score it
exactly as they do the SegReg backbone (``network_def`` override; see ``benchmarks/learned_accuracy.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class VxmVelocityNet(torch.nn.Module):
    """``voxelmorph.nn.models.VxmPairwise`` without its own integration; UNet levels of 16, 32, 32, 32 features (the
    original VoxelMorph encoder; the package default of 5 levels pools 16 slices below one voxel).

    Inputs ``(B, 2, *S)``, every spatial size a multiple of 16 (4 poolings); output ``(B, D, *S)`` velocity.
    """

    def __init__(self, spatial_dims: int = 3, nb_features: Sequence[int] = (16, 32, 32, 32)) -> None:
        super().__init__()
        from voxelmorph.nn.models import VxmPairwise

        self.vxm = VxmPairwise(
            ndim=spatial_dims, source_channels=1, target_channels=1, nb_features=nb_features, integration_steps=0
        )

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.vxm(pair[:, :1], pair[:, 1:], return_field_type="velocity")
