import itertools

import numpy as np
import torch
from conftest import requires_cuda

from custom.mind import MINDSSCLoss, mind_ssc, ssc_offset_pairs


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
