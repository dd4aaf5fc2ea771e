import numpy as np
import pytest
import torch
from phantoms import sliding_slabs

from custom.inferer import SegRegInferer
from custom.iterative import IterativeSegReg
from custom.plan import GLOBAL, RegionPlan, select_regions
from custom.region_pair import RandRegionPaird


def labels(shape=(20, 16, 12)):
    fixed = torch.zeros((1, 1) + shape)
    fixed[..., 2:8, 3:9, 2:6] = 1
    fixed[..., 10:17, 4:12, 5:10] = 2
    fixed[..., 18:20, 0:2, 0:2] = 4  # only in the fixed map
    moving = torch.zeros_like(fixed)
    moving[..., 3:9, 3:10, 2:7] = 1
    moving[..., 9:15, 5:12, 4:9] = 2
    moving[..., 0:2, 14:16, 10:12] = 5  # only in the moving map
    return fixed, moving


def test_regions_are_those_present_in_both_maps():
    fixed, moving = labels()
    with pytest.warns(UserWarning, match=r"\[4, 5\].*background"):
        used, skipped = select_regions(fixed, moving)
    assert used == [0, 1, 2] and skipped == [4, 5]
    assert select_regions(fixed, moving, include_background=False, warn=False)[0] == [1, 2]
    assert select_regions(fixed, moving, region_ids=[2, 4], warn=False) == ([2], [4])
    with pytest.raises(ValueError, match="no region"):
        select_regions(fixed, moving, region_ids=[3], warn=False)


def test_boxes_masks_and_crops_match_numpy():
    fixed, moving = labels()
    plan = RegionPlan.build(fixed, moving, margin=2, warn=False)
    f, m = fixed[0, 0].numpy(), moving[0, 0].numpy()
    image = torch.rand_like(fixed)
    for i, r in enumerate(plan.regions):
        idx = np.nonzero((f == r) | (m == r))
        lo = [max(0, int(a.min()) - 2) for a in idx]
        hi = [min(n, int(a.max()) + 3) for a, n in zip(idx, f.shape)]
        assert plan.boxes[i] == tuple(slice(a, b) for a, b in zip(lo, hi)), r
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.testing.assert_array_equal(plan.mask("moving", i)[0, 0].numpy(), (m[box] == r).astype(np.float32))
        np.testing.assert_array_equal(
            plan.masked_image("fixed", image, i)[0, 0].numpy(), image[0, 0].numpy()[box] * (f[box] == r)
        )


def test_composition_fills_unregistered_labels_with_background_and_keeps_each_sub_field():
    fixed, moving = labels()
    plan = RegionPlan.build(fixed, moving, margin=3, warn=False)
    subs = [torch.full([1, 3] + plan.box_shape(i), float(r + 1)) for i, r in enumerate(plan.regions)]
    u = plan.compose(subs)
    f = fixed[0, 0]
    for r in (0, 1, 2):
        assert torch.all(u[0, :, f == r] == r + 1)
    assert torch.all(u[0, :, f == 4] == 1)  # region 4 is not registered: its voxels follow the background (0)
    # pasting one region at a time (what the solvers do) gives the same field
    acc = plan.new_field()
    for i, s in enumerate(subs):
        plan.paste(acc, i, s)
    torch.testing.assert_close(acc, u)


def test_smoothed_region_weights_match_a_whole_grid_reference_and_thin_regions_keep_their_masks():
    from monai.networks.layers import GaussianFilter

    from custom.composer import FieldComposer

    fixed = torch.zeros((1, 1, 28, 24, 20))
    fixed[..., 4:14, 4:20, 3:17] = 1  # a block
    fixed[..., 16:26, 4:20, 9:10] = 2  # a plate one voxel thick: thin once smoothed
    fixed[..., 16:20, 2:4, 2:4] = 7  # only in the fixed map: background's
    moving = fixed.clone()
    moving[fixed == 7] = 0
    sigma = 1.5
    plan = RegionPlan.build(fixed, moving, margin=6, warn=False, composer=FieldComposer(sigma=sigma))
    assert plan.regions == [0, 1, 2]
    # reference on the whole grid: MONAI's Gaussian of each hard mask, renormalised; thin regions keep their masks
    lab = fixed[0, 0]
    hard = [(lab == 0) | (lab == 7), lab == 1, lab == 2]
    smooth = [GaussianFilter(3, sigma)(h.float()[None, None]).clamp_min(0)[0, 0] for h in hard]
    total = torch.stack(smooth).sum(0).clamp_min(1e-6)
    normalised = [sm / total for sm in smooth]
    thin = [r for r, h, w in zip(plan.regions, hard, normalised) if float(w[h].max()) < 0.5]
    assert thin == [2]
    in_thin = lab == 2
    for _ in range(2):  # weights are cached after the first call: the same values again
        for i, r in enumerate(plan.regions):
            expected = normalised[i] * ~in_thin + (hard[i].float() if r in thin else 0.0)
            got = plan.region_weight(i)[0, 0]
            torch.testing.assert_close(got, expected[plan.boxes[i]], atol=1e-5, rtol=0)
    assert plan._thin_regions() == thin


def test_global_plan_is_one_unmasked_region_with_one_hot_label_masks():
    fixed, moving = labels()
    plan = RegionPlan.build(fixed, moving, global_region=True, label_ids=[1, 2])
    assert plan.regions == [GLOBAL] and plan.boxes == [tuple(slice(0, n) for n in fixed.shape[2:])]
    image = torch.rand_like(fixed)
    assert torch.equal(plan.masked_image("fixed", image, 0), image)
    mask = plan.mask("fixed", 0)
    assert mask.shape == (1, 2) + fixed.shape[2:] and torch.equal(mask[0, 1], (fixed[0, 0] == 2).float())
    assert torch.equal(plan.weights(), torch.ones_like(fixed))


def test_sampler_inferer_and_iterative_solver_follow_the_same_plan():
    fixed, moving = labels()
    sampler = RandRegionPaird()
    sampler.set_random_state(0)
    img = torch.rand(1, *fixed.shape[2:])
    drawn = {
        sampler({"fixed_image": img, "moving_image": img, "fixed_label": fixed[0], "moving_label": moving[0]})[
            "region_id"
        ]
        for _ in range(40)
    }
    assert drawn == {0, 1, 2}  # never a region that is missing from one map

    class RegionIdNet(torch.nn.Module):  # constant velocity = max of the fixed crop (the region's intensity)
        def forward(self, x):
            v = torch.zeros((x.shape[0], 3) + x.shape[2:])
            v[:, 0] = x[:, 1].flatten(1).amax(1).view(-1, 1, 1, 1)
            return v

    intensity = fixed.clamp(max=2) + 0.5  # region r has intensity r + 0.5 in the fixed image
    with pytest.warns(UserWarning, match="skipped"):
        ddf = SegRegInferer(margin=2, num_steps=0)(torch.cat([intensity, intensity], 1), RegionIdNet(), fixed, moving)[
            "ddf"
        ]
    for r in (1, 2):
        assert torch.all(ddf[0, 0][fixed[0, 0] == r] == r + 0.5)
    p = sliding_slabs(shape=(16, 16, 8), shift=1)
    reg = IterativeSegReg(levels=(1,), iterations=(2,), progress=False)
    plan = reg.plan(p["fixed_regions"], p["moving_regions"])
    assert plan.regions == RegionPlan.build(p["fixed_regions"], p["moving_regions"], margin=reg.margin).regions
    assert len(reg.tasks(plan, p["fixed"])) == len(plan)
