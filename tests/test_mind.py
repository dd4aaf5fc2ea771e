import itertools

import numpy as np
import pytest
import torch
from conftest import requires_cuda

from custom.mind import (
    MINDSSCLoss,
    box_mean,
    grow_one_voxel,
    mind_ssc,
    noise_variance,
    ssc_offset_pairs,
    structure_weight,
)


def shifted(img, offset):
    """img[clamp(x + offset)] (replicate border), by explicit index arithmetic."""
    idx = np.meshgrid(*[np.clip(np.arange(n) + o, 0, n - 1) for n, o in zip(img.shape, offset)], indexing="ij")
    return img[tuple(idx)]


def reference_mind(img, radius, dilation):
    """Straightforward MIND-SSC: explicit neighbour pairs, explicit patch sums, numpy only."""
    pairs = [
        (p, q)
        for p, q in itertools.combinations(
            [tuple(s * (i == a) for i in range(3)) for a in range(3) for s in (-1, 1)], 2
        )
        if sum((x - y) ** 2 for x, y in zip(p, q)) == 2
    ]
    ssd = []
    for p, q in pairs:
        d2 = (shifted(img, [dilation * c for c in p]) - shifted(img, [dilation * c for c in q])) ** 2
        box = [shifted(d2, b) for b in itertools.product(range(-radius, radius + 1), repeat=3)]
        ssd.append(np.mean(box, 0))
    ssd = np.stack(ssd)
    mind = ssd - ssd.min(0)
    var = mind.mean(0)
    var = np.clip(var, var.mean() * 1e-3, var.mean() * 1e3)
    return np.exp(-mind / var), pairs


def test_offset_pairs_are_the_twelve_ssc_pairs():
    pairs = ssc_offset_pairs(3)
    assert len(pairs) == 12 and len(ssc_offset_pairs(2)) == 4
    assert all(sum((a - b) ** 2 for a, b in zip(p, q)) == 2 for p, q in pairs)


def test_mind_matches_straightforward_reference():
    rng = np.random.default_rng(0)
    img = rng.random((9, 8, 7)).astype(np.float64)
    for radius, dilation in ((1, 2), (2, 1)):
        ref, ref_pairs = reference_mind(img, radius, dilation)
        ours = mind_ssc(torch.as_tensor(img, dtype=torch.float32)[None, None], radius, dilation)[0].double().numpy()
        order = [ref_pairs.index(pq) for pq in ssc_offset_pairs(3)]
        np.testing.assert_allclose(ours, ref[order], atol=2e-5)


def test_mind_loss_is_contrast_invariant_and_detects_shift():
    rng = np.random.default_rng(1)
    img = torch.as_tensor(rng.random((1, 1, 16, 16, 12)), dtype=torch.float32)
    loss = MINDSSCLoss()
    assert loss(img, img).item() == 0
    assert loss(3 * img + 1, img).item() < 1e-6  # affine intensity change: same descriptor
    assert loss(torch.roll(img, 2, 2), img).item() > 1e-2


def test_mind_2d_and_bad_input():
    assert mind_ssc(torch.rand(2, 1, 10, 12)).shape == (2, 4, 10, 12)
    try:
        mind_ssc(torch.rand(1, 2, 8, 8, 8))
    except ValueError as e:
        assert "(B, 1" in str(e)
    else:
        raise AssertionError("expected ValueError")


@requires_cuda
def test_mind_cuda_matches_cpu():
    img = torch.rand(1, 1, 16, 16, 12)
    torch.testing.assert_close(mind_ssc(img.cuda()).cpu(), mind_ssc(img), atol=1e-5, rtol=1e-4)


def test_mind_loss_reduction():
    a, b = torch.rand(1, 1, 10, 9, 8), torch.rand(1, 1, 10, 9, 8)
    sq = (mind_ssc(a) - mind_ssc(b)) ** 2
    torch.testing.assert_close(MINDSSCLoss(reduction="none")(a, b), sq)
    torch.testing.assert_close(MINDSSCLoss(reduction="sum")(a, b), sq.sum())
    torch.testing.assert_close(MINDSSCLoss()(a, b), sq.mean())


def blocks_with_noise(sigma, shape=(40, 36, 12), seed=0):
    """Piecewise-constant blocks (steps of 1) plus white noise of std ``sigma``, ``(1, 1, *shape)``."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape)
    img[8:20, 6:30, 2:10] = 1.0
    img[24:34, 10:20, :] = 2.0
    img += np.linspace(0, 0.5, shape[0])[:, None, None]  # smooth shading: no noise
    return torch.as_tensor(img + rng.normal(0, sigma, shape), dtype=torch.float32)[None, None]


@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_noise_variance_recovers_the_noise_of_a_structured_image(sigma):
    est = noise_variance(blocks_with_noise(sigma)).sqrt().item()
    assert abs(est - sigma) < 0.1 * sigma, (est, sigma)
    assert noise_variance(blocks_with_noise(0.0)).item() < 1e-8  # edges and shading alone are not noise
    # voxels clipped to the lowest value (CT air, padding, the outside of a mask) are ignored: same estimate
    clipped = blocks_with_noise(sigma).clamp_min(0.6)
    assert (clipped == 0.6).float().mean() > 0.5
    assert abs(noise_variance(clipped).sqrt().item() - sigma) < 0.1 * sigma


def test_structure_weight_is_zero_in_noise_and_one_at_edges():
    img = blocks_with_noise(0.05)
    w = structure_weight(img, noise_variance(img), gate=2.0)[0, 0]
    assert w.shape == img.shape[2:] and 0 <= w.min() and w.max() <= 1
    assert w[36:, 26:, 4:8].max() == 0  # far from any edge: noise only
    assert w[20, 12:28, 4:8].min() == 1  # on the x edge of the first block
    masked = img * (img > 0.8)  # outside a mask the image is exactly 0: no noise there, so it keeps weight 1
    wm = structure_weight(masked, noise_variance(img), gate=2.0)[0, 0]
    assert wm[36:, 26:, 4:8].min() == 1


def test_noise_gate_ignores_noise_in_flat_areas_but_keeps_structure():
    a, b = blocks_with_noise(0.05, seed=1), blocks_with_noise(0.05, seed=2)  # same structure, independent noise
    plain, gated = MINDSSCLoss(), MINDSSCLoss(noise_gate=2.0)
    flat = (slice(None), slice(None), slice(36, None), slice(26, None), slice(4, 8))
    assert plain(b, a) > 0 and (MINDSSCLoss(reduction="none")(b, a)[flat].mean() > 0.01)
    assert MINDSSCLoss(reduction="none", noise_gate=2.0)(b, a)[flat].max() == 0
    shifted_b = torch.roll(b, 2, 2)  # a real misalignment still costs
    assert gated(shifted_b, a) > 3 * gated(b, a)
    with pytest.raises(ValueError, match="noise_gate"):
        MINDSSCLoss(noise_gate=0)


@requires_cuda
def test_noise_variance_and_gate_cuda_match_cpu():
    img = blocks_with_noise(0.05)
    torch.testing.assert_close(noise_variance(img.cuda()).cpu(), noise_variance(img), rtol=1e-4, atol=1e-8)
    a, b = blocks_with_noise(0.05, seed=1), blocks_with_noise(0.05, seed=2)
    gated = MINDSSCLoss(noise_gate=2.0)
    torch.testing.assert_close(gated(b.cuda(), a.cuda()).cpu(), gated(b, a), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 1, 9, 7), (1, 2, 8, 6, 5), (1, 1, 1, 6, 4)])
def test_grow_one_voxel_is_max_pooling_with_a_3_box(shape):
    import torch.nn.functional as F

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.9
    pool = F.max_pool3d if len(shape) == 5 else F.max_pool2d
    assert torch.equal(grow_one_voxel(mask), pool(mask.float(), 3, stride=1, padding=1) > 0)


@pytest.mark.parametrize("shape, radius", [((2, 3, 9, 8), 1), ((1, 4, 9, 8, 7), 1), ((1, 2, 11, 9, 10), 2)])
def test_box_mean_is_average_pooling(shape, radius):
    import torch.nn.functional as F

    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    pool = F.avg_pool3d if len(shape) == 5 else F.avg_pool2d
    torch.testing.assert_close(box_mean(x, radius), pool(x, 2 * radius + 1, stride=1), rtol=1e-6, atol=1e-6)
