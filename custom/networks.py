"""The SegReg backbone: a VoxelMorph-style UNet (MONAI ``VoxelMorphUNet``), one tensor in, one tensor out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import DVF2DDF
from monai.networks.nets import VoxelMorphUNet

# 4 down / 4 up: VoxelMorphUNet takes the channels of each down/up level in pairs.
DEFAULT_CHANNELS = (16, 32, 32, 32, 32, 32, 32, 32)


def segreg_unet(
    spatial_dims: int = 3,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    unet_out_channels: int = 32,
    final_conv_channels: Sequence[int] = (16, 16),
) -> VoxelMorphUNet:
    """The paper's backbone: UNet on ``cat([moving, fixed], dim=1)`` -> stationary velocity field.

    Input ``(B, 2, *S)`` with every spatial size a multiple of ``2 ** (len(channels) // 2)`` (16 by default);
    output ``(B, spatial_dims, *S)`` velocity in voxels, channel i along spatial axis i.
    """
    if len(channels) % 2:
        raise ValueError(f"channels come in (down, up) pairs, got {len(channels)} values")
    return VoxelMorphUNet(
        spatial_dims=spatial_dims,
        in_channels=2,
        unet_out_channels=unet_out_channels,
        channels=tuple(channels),
        final_conv_channels=tuple(final_conv_channels),
    )


def size_divisor(channels: Sequence[int] = DEFAULT_CHANNELS) -> int:
    """Spatial sizes the backbone accepts are multiples of this (2 to the number of poolings)."""
    return 2 ** (len(channels) // 2)


class VelocityToDisplacement(torch.nn.Module):
    """Scaling and squaring of a stationary velocity field (MONAI ``DVF2DDF``), always in float32.

    ``(B, D, *S)`` velocity in voxels -> ``(B, D, *S)`` displacement in voxels. ``num_steps=0`` returns the input
    (the backbone output is then used as a displacement directly). Integration never runs under AMP (docs/design.md).
    ``frozen_components``: displacement components held at 0, e.g. ``(2,)`` for an in-plane field on thick-slice
    data (cine MR); a zero velocity component stays exactly zero through scaling and squaring.
    """

    def __init__(self, num_steps: int = 7, frozen_components: Sequence[int] = ()) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.frozen = sorted({int(c) for c in (frozen_components or ())})
        self.integrate = DVF2DDF(num_steps=num_steps) if num_steps > 0 else None

    def freeze(self, field: torch.Tensor) -> torch.Tensor:
        """``field`` ``(B, D, *S)`` with the frozen components set to 0."""
        if not self.frozen:
            return field
        if max(self.frozen) >= field.shape[1]:
            raise ValueError(f"frozen_components {self.frozen} do not exist in a {field.shape[1]}-component field")
        keep = torch.ones(field.shape[1], device=field.device, dtype=field.dtype)
        keep[self.frozen] = 0
        return field * keep.view((1, -1) + (1,) * (field.ndim - 2))

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        velocity = self.freeze(velocity.float())
        if self.integrate is None:
            return velocity
        with torch.autocast(device_type=velocity.device.type, enabled=False):
            return self.integrate(velocity)
