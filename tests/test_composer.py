import math

import pytest
import torch
from conftest import requires_cuda
from monai.networks.layers import GaussianFilter

from custom.composer import FieldComposer, gaussian_smooth


def two_region_case(shape=(12, 10, 8)):
    """Fixed masks split at x = 5 and two analytic sub-fields (linear and sinusoidal)."""
    x, y, z = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    u1 = torch.stack([0.1 * x, -0.2 * y + 1, 0.05 * z])
    u2 = torch.stack([torch.sin(y), torch.cos(x), 0 * z + 2.5])
    m1 = (x < 5).float()
    masks = torch.stack([m1, 1 - m1])[None]
    fields = torch.stack([u1, u2])[None]
    return fields, masks


def test_hard_masks_reproduce_each_subfield_exactly():
    fields, masks = two_region_case()
    u = FieldComposer()(fields, masks)
    for i in range(2):
        inside = masks[0, i] > 0
        assert torch.equal(u[0][:, inside], fields[0, i][:, inside])


def test_soft_weights_are_smoothed_and_renormalised():
    fields, masks = two_region_case()
    comp = FieldComposer(sigma=1.0)
    w = comp.prepare_weights(masks)
    torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))
    assert 0 < w[0, 0, 4, 5, 4] < 1  # blurred at the border
    constant = torch.ones_like(fields) * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1, 1, 1)
    torch.testing.assert_close(comp(constant, masks), constant[:, 0])  # convex combination keeps constants


def test_composer_is_differentiable_in_fields_and_weights():
    fields, masks = two_region_case()
    fields.requires_grad_(True)
    weights = masks.clone().requires_grad_(True)
    FieldComposer(normalise=True)(fields, weights).sum().backward()
    assert fields.grad.abs().sum() > 0 and weights.grad is not None


def test_shape_mismatch_is_a_clear_error():
    fields, masks = two_region_case()
    try:
        FieldComposer()(fields, masks[:, :, :-1])
    except ValueError as e:
        assert "spatial shapes differ" in str(e)
    else:
        raise AssertionError("expected ValueError")


@requires_cuda
@pytest.mark.parametrize("sigma", [1.0, (1.0, 0.5, 2.0)])
def test_composer_cuda_matches_cpu(sigma):
    fields, masks = two_region_case()
    comp = FieldComposer(sigma=sigma)
    torch.testing.assert_close(comp(fields.cuda(), masks.cuda()).cpu(), comp(fields, masks), atol=1e-5, rtol=1e-5)


def test_cropped_sub_fields_compose_like_whole_grid_ones():
    # the path production takes: each region's field only on its box, pasted with the fixed-space weights
    fields, masks = two_region_case()
    boxes = [(slice(0, 7), slice(0, 10), slice(1, 8)), (slice(3, 12), slice(2, 10), slice(0, 8))]
    crops = [fields[:, i][(slice(None), slice(None)) + b] for i, b in enumerate(boxes)]
    out = FieldComposer()(crops, masks, boxes)
    ref = torch.zeros_like(fields[:, 0])
    for i, b in enumerate(boxes):  # independent: zero outside the box, then the weighted sum
        full = torch.zeros_like(fields[:, i])
        full[(slice(None), slice(None)) + b] = fields[:, i][(slice(None), slice(None)) + b]
        ref += masks[:, i : i + 1] * full
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="does not fit"):
        FieldComposer()([crops[1], crops[0]], masks, boxes)


def test_per_axis_sigma_blends_over_one_width_in_mm_on_any_spacing():
    # analytic reference: a straight border smoothed with a Gaussian of sigma_mm gives its side the weight
    # Phi(d / sigma_mm) at a voxel centre d mm from the border (MONAI's erf kernel integrates the Gaussian over each
    # voxel, so this holds at voxel centres on any grid). Slices of 1 and 4 mm along the blended axis; with sigma in
    # voxels (2 on both) the 4 mm grid would blend over 8 mm instead.
    from custom.iterative import IterativeSegReg

    sigma_mm = 2.0
    for dz in (1.0, 4.0):
        n = int(64 / dz)
        label = torch.ones((1, 1, 6, 6, n), dtype=torch.int64)
        label[..., n // 2 :] = 2
        plan = IterativeSegReg(sigma_mm=sigma_mm, margin=8, progress=False).plan(label, label, spacing=(3.0, 3.0, dz))
        assert plan.composer.sigma == (sigma_mm / 3.0, sigma_mm / 3.0, sigma_mm / dz)
        w = plan.weights()[0, plan.regions.index(1), 3, 3]  # along z
        d = (torch.arange(n, dtype=torch.float64) + 0.5 - n / 2) * dz  # mm from the border, > 0 in region 2
        phi = torch.tensor([0.5 * (1 + math.erf(-v / (sigma_mm * math.sqrt(2)))) for v in d.tolist()]).double()
        torch.testing.assert_close(w.double(), phi, atol=2e-3, rtol=0)


def test_sigma_mm_on_1mm_voxels_is_sigma_in_voxels_and_both_together_are_refused():
    from custom.iterative import IterativeSegReg

    label = torch.ones((1, 1, 12, 10, 8), dtype=torch.int64)
    label[..., 6:, :, :] = 2
    by_mm = IterativeSegReg(sigma_mm=2.0, progress=False).plan(label, label, spacing=(1.0, 1.0, 1.0)).weights()
    by_voxels = IterativeSegReg(sigma=2.0, progress=False).plan(label, label).weights()
    assert torch.equal(by_mm, by_voxels)
    with pytest.raises(ValueError, match="not both"):
        IterativeSegReg(sigma=2.0, sigma_mm=2.0)
    with pytest.raises(ValueError, match="0 on some axes"):
        FieldComposer(sigma=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 axes"):
        FieldComposer(sigma=(1.0, 1.0, 1.0)).smooth(torch.ones(1, 2, 4, 4))


@pytest.mark.parametrize("shape,sigma", [((2, 3, 30, 26, 21), (2.0, 0.7, 3.3)), ((1, 2, 40, 33), 1.5)])
def test_gaussian_smoothing_is_monais_gaussian_filter(shape, sigma):
    # reference: MONAI's GaussianFilter (depthwise convolutions); the shifted-copy sums give its values bit for bit
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    spatial = len(shape) - 2
    want = GaussianFilter(spatial, sigma)(x)
    assert torch.equal(gaussian_smooth(x, sigma), want)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)  # differentiable, as the weights are
    (gaussian_smooth(ours, sigma) * x).sum().backward()
    (GaussianFilter(spatial, sigma)(theirs) * x).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)
    with pytest.raises(ValueError, match="axes"):
        gaussian_smooth(x, (1.0,) * (spatial + 1))
