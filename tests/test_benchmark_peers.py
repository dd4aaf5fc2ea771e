"""The benchmark peers (``benchmarks/peers.py``, ``benchmarks/voxelmorph_net.py``) return fields in SegReg's
convention: a known translation of a textured volume on an anisotropic grid comes back in voxels, with its sign.

Each test skips without its peer (``pip install -e ".[bench]"``); CI installs none of them.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, shift

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

SHAPE, SPACING, TRUE_SHIFT = (48, 40, 32), (2.0, 2.0, 3.0), np.array([2.0, -1.5, 1.0])


def textured_pair():
    """Fixed and moving arrays with ``fixed(x) = moving(x + TRUE_SHIFT)`` (smooth texture, 0..1)."""
    rng = np.random.default_rng(0)
    fixed = gaussian_filter(rng.random(SHAPE).astype(np.float32), 2.0)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    moving = shift(fixed, TRUE_SHIFT, order=3, mode="nearest")  # moving(y) = fixed(y - TRUE_SHIFT)
    return fixed, moving.astype(np.float32)


@pytest.mark.parametrize(
    "peer, module, kwargs",
    [("convexadam", "convexAdam", {"grid_sp": 4}), ("ants_syn", "ants", {}), ("elastix_bspline", "itk", {})],
)
def test_peer_recovers_translation_in_voxels(peer, module, kwargs):
    pytest.importorskip(module)
    from peers import run_peer

    fixed, moving = textured_pair()
    disp = run_peer(peer, fixed, moving, SPACING, **kwargs)
    assert disp.shape == (3,) + SHAPE and disp.dtype == np.float32
    inner = disp[:, 10:-10, 10:-10, 8:-8].reshape(3, -1)
    np.testing.assert_allclose(np.median(inner, axis=1), TRUE_SHIFT, atol=0.35)


def test_peer_masks_reach_the_method():
    pytest.importorskip("ants")
    from peers import run_peer

    fixed, moving = textured_pair()
    mask = np.zeros(SHAPE, bool)  # a mask this small leaves SyN too few samples: it must change the result
    mask[20:24, 18:22, 14:18] = True
    free = run_peer("ants_syn", fixed, moving, SPACING)
    masked = run_peer("ants_syn", fixed, moving, SPACING, mask, mask)
    assert np.abs(free - masked).max() > 0.1


def test_unknown_peer_is_refused():
    from peers import run_peer

    with pytest.raises(ValueError, match="unknown peer"):
        run_peer("demons", np.zeros(SHAPE), np.zeros(SHAPE), SPACING)


def test_voxelmorph_network_is_a_velocity_backbone():
    pytest.importorskip("voxelmorph")
    from voxelmorph_net import VxmVelocityNet

    net = VxmVelocityNet()
    pair = torch.rand(2, 2, 32, 32, 16, requires_grad=True)
    velocity = net(pair)
    assert velocity.shape == (2, 3, 32, 32, 16)
    velocity.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
