import numpy as np
import pytest
import torch
from conftest import requires_cuda
from monai.networks.blocks import Warp
from scipy.ndimage import map_coordinates

from custom.grid_warp import GridWarp
from custom.networks import VelocityToDisplacement, segreg_unet, size_divisor


def test_warp_with_known_translation_matches_scipy():
    rng = np.random.default_rng(0)
    img = rng.random((12, 10, 8)).astype(np.float32)
    shift = np.array([1.5, -2.0, 0.25])
    ddf = torch.as_tensor(np.broadcast_to(shift.reshape(3, 1, 1, 1), (3, 12, 10, 8)).copy(), dtype=torch.float32)
    ours = Warp("bilinear", "border")(torch.as_tensor(img)[None, None], ddf[None])[0, 0].numpy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in img.shape], indexing="ij")) + shift.reshape(3, 1, 1, 1)
    ref = map_coordinates(img, grid, order=1, mode="nearest")
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_grid_warp_matches_scipy_and_monai_warp_with_gradients():
    # the solver's cached-grid warp: values against scipy's map_coordinates (zeros outside), values and gradients
    # against MONAI's Warp, 3-D with a singleton axis and 2-D
    rng = np.random.default_rng(1)
    img = rng.random((2, 3, 9, 7, 5)).astype(np.float32)
    ddf = (rng.standard_normal((2, 3, 9, 7, 5)) * 2).astype(np.float32)
    ours = GridWarp()(torch.as_tensor(img), torch.as_tensor(ddf)).numpy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in img.shape[2:]], indexing="ij"))
    for b in range(2):
        for c in range(3):
            ref = map_coordinates(img[b, c], grid + ddf[b], order=1, mode="grid-constant", cval=0.0)
            np.testing.assert_allclose(ours[b, c], ref, atol=1e-5)
    for shape in [(2, 4, 9, 1, 5), (1, 2, 11, 6)]:
        image = torch.rand(shape)
        u = (torch.randn((shape[0], len(shape) - 2) + shape[2:]) * 2).requires_grad_()
        for mode, padding in [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")]:
            a = GridWarp(mode, padding)(image, u)
            b = Warp(mode, padding)(image, u)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            if mode == "bilinear":
                ga = torch.autograd.grad(a.square().sum(), u)[0]
                gb = torch.autograd.grad(b.square().sum(), u)[0]
                torch.testing.assert_close(ga, gb, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="must be"):
        GridWarp()(torch.rand(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_integer_translation_is_a_roll():
    img = torch.rand(1, 1, 10, 9, 8)
    ddf = torch.zeros(1, 3, 10, 9, 8)
    ddf[:, 0] = 2
    out = Warp("nearest", "zeros")(img, ddf)
    torch.testing.assert_close(out[:, :, :8], img[:, :, 2:])


def test_constant_velocity_integrates_to_the_same_translation():
    v = torch.zeros(1, 3, 16, 16, 16)
    v[:, 2] = 1.5
    ddf = VelocityToDisplacement(7)(v)
    # exact away from the zero-padded border
    torch.testing.assert_close(ddf[:, :, 4:-4, 4:-4, 4:-4], v[:, :, 4:-4, 4:-4, 4:-4], atol=1e-4, rtol=1e-4)
    assert VelocityToDisplacement(0)(v) is not None and torch.equal(VelocityToDisplacement(0)(v), v)


def test_backbone_is_four_down_four_up_single_tensor():
    net = segreg_unet(channels=(4, 8, 8, 8, 8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,))
    assert size_divisor((4, 8, 8, 8, 8, 8, 8, 8)) == 16
    assert sum(isinstance(m, torch.nn.MaxPool3d) for m in net.modules()) == 4
    out = net(torch.rand(2, 2, 32, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 32, 16, 16)


@requires_cuda
def test_backbone_and_integration_cuda():
    net = segreg_unet(channels=(4, 8, 8, 8, 8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,))
    x = torch.rand(1, 2, 32, 32, 16)
    ref = VelocityToDisplacement()(net(x))
    out = VelocityToDisplacement()(net.cuda()(x.cuda())).cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)


@requires_cuda
def test_grid_warp_cuda_channels_last():
    # the solver's warp on CUDA, with the channels-last feature stack it builds, against the CPU result
    image = torch.rand(2, 13, 12, 10, 8)
    ddf = torch.randn(2, 3, 12, 10, 8) * 2
    ref = GridWarp()(image, ddf)
    warp = GridWarp()
    out = warp(image.cuda().contiguous(memory_format=torch.channels_last_3d), ddf.cuda()).cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
