import numpy as np
import torch
from conftest import requires_cuda
from monai.networks.blocks import Warp
from scipy.ndimage import map_coordinates

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
