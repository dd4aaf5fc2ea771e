"""The iterative solver's speed machinery: features computed once and warped, regions batched with padding, early stop,
levels in mm, and a composition that never builds the whole-grid weight stack."""

import math

import pytest
import torch
from monai.losses import DiceLoss
from monai.networks.blocks import Warp
from phantoms import sliding_slabs

from custom.iterative import IterativeSegReg
from custom.losses import EDTDiceLoss, RegionDiffusionLoss, SegRegLoss
from custom.mind import MINDSSCLoss, mind_ssc
from custom.plan import RegionPlan, composition_weights
from custom.region_batch import RegionBatch, group_by_shape, level_shape, level_spacing, pad_to


def smooth_field(shape, amplitude=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, 3, 3, 3), generator=g) * amplitude
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)


def test_levels_in_mm_follow_each_axis_spacing():
    # 1 mm CT at 8 mm per voxel; a 10 mm slice axis is never resampled finer than its data
    assert level_shape((390, 280, 300), (1.0, 1.0, 1.0), target_mm=8) == [49, 35, 38]
    assert level_shape((128, 128, 16), (1.8, 1.8, 10.0), target_mm=4, min_size=8) == [58, 58, 16]
    assert level_shape((80, 64, 64), (4.0,) * 3, factor=2) == level_shape((80, 64, 64), (4.0,) * 3, target_mm=8)
    assert level_spacing((81,), (41,), (1.0,)) == [2.0]
    reg = IterativeSegReg(level_spacing_mm=(16, 8), iterations=(3, 2), progress=False)
    assert reg.level_size((80, 64, 64), (4.0,) * 3, 0) == [20, 16, 16]
    with pytest.raises(ValueError, match="iterations"):
        IterativeSegReg(level_spacing_mm=(16, 8, 4), iterations=(3, 2))


def test_grouping_bounds_the_padding_and_keeps_every_region_once():
    shapes = [(40, 40, 40), (38, 40, 39), (10, 10, 10), (9, 10, 10), (40, 8, 8)]
    groups = group_by_shape(shapes, max_padding=0.5)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    for g in groups:
        size = [max(shapes[i][d] for i in g) for d in range(3)]
        assert len(g) * math.prod(size) <= 1.5 * sum(math.prod(shapes[i]) for i in g)
    assert [0, 1] in groups and [2, 3] in groups
    assert len(group_by_shape(shapes, max_padding=0.0)) == 5
    equal = [(8, 8, 8)] * 5
    assert [len(g) for g in group_by_shape(equal, max_size=2)] == [2, 2, 1]
    assert [len(g) for g in group_by_shape(equal)] == [5]


def _batch_and_regions(loss, fixed, moving, fixed_label, moving_label):
    reg = IterativeSegReg(loss=loss, margin=2, progress=False)
    plan = reg.plan(fixed_label, moving_label)
    tasks = reg.tasks(plan, fixed)
    spacings = [[1.0, 1.0 + 0.25 * k, 2.0] for k in range(len(tasks))]  # one voxel size per region (refined levels)
    regions = [reg.region_level(plan, t, fixed, moving, plan.box_shape(t.index), s) for t, s in zip(tasks, spacings)]
    return reg, plan, RegionBatch.stack(regions)


@pytest.mark.parametrize("mask", ["dice", "edt_dice"])
def test_batched_loss_equals_the_loss_of_each_region_alone(mask):
    # independent reference: SegRegLoss on each region's unpadded masked crop, warped by the same field, with the
    # plain image as its feature (MSE); the padded batch must give exactly each region's own loss
    p = sliding_slabs(shape=(24, 20, 12), shift=2)
    fl = p["fixed_regions"] * (p["fixed_organs"] == 0) + 3 * (p["fixed_organs"] > 0)
    ml = p["moving_regions"] * (p["moving_organs"] == 0) + 3 * (p["moving_organs"] > 0)
    mask_loss = DiceLoss(include_background=True) if mask == "dice" else EDTDiceLoss()
    loss = SegRegLoss(torch.nn.MSELoss(), mask_loss, RegionDiffusionLoss(), {"sim": 2.0, "mask": 1.0, "reg": 0.5})
    reg, plan, batch = _batch_and_regions(loss, p["fixed"], p["moving"], fl, ml)
    assert len({r.shape for r in batch.regions}) > 1  # unequal crops, really padded
    u = torch.cat([pad_to(smooth_field(r.shape, seed=k), batch.shape) for k, r in enumerate(batch.regions)])
    got = reg.batch_losses(batch, u)
    warp = Warp("bilinear", "zeros")
    for b, region in enumerate(batch.regions):
        i = region.index
        ub = batch.crop(u, b)
        fm, mm = plan.mask("fixed", i), plan.mask("moving", i)
        fe = me = None
        if mask != "dice":
            from custom.regions import normalised_edt

            fe, me = (normalised_edt(m[0], sampling=region.spacing)[None] for m in (fm, mm))
        want = loss(
            warp(plan.masked_image("moving", p["moving"], i), ub),
            plan.masked_image("fixed", p["fixed"], i),
            warp(mm, ub),
            fm,
            ub,
            None if me is None else warp(me, ub),
            fe,
            regions=fm,
            spacing=region.spacing,
        )["loss"]
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)


def test_mind_features_are_the_descriptors_of_the_masked_images():
    p = sliding_slabs(shape=(20, 20, 12), shift=1)
    loss = SegRegLoss(MINDSSCLoss(), DiceLoss(include_background=True))
    reg, plan, batch = _batch_and_regions(loss, p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
    for b, region in enumerate(batch.regions):
        want = mind_ssc(plan.masked_image("moving", p["moving"], region.index))
        torch.testing.assert_close(batch.crop(batch.moving, b)[:, :12], want)
        # at the identity the batched similarity is MINDSSCLoss of the masked pair
        sim = MINDSSCLoss()(
            plan.masked_image("moving", p["moving"], region.index),
            plan.masked_image("fixed", p["fixed"], region.index),
        )
        zero = torch.zeros((len(batch), 3) + batch.shape)
        got = (
            reg.batch_losses(batch, zero)[b]
            - reg.loss.mask_term(batch.crop(batch.moving, b)[:, 12:13], region.fixed_masks) * reg.loss.weights["mask"]
        )
        torch.testing.assert_close(got, sim * reg.loss.weights["sim"], rtol=1e-5, atol=1e-6)


def test_batched_solver_matches_region_by_region_accuracy():
    # batching changes only how the work is laid out: the same pair registered with every region alone
    # (max_padding=0) and batched reaches the same accuracy against the analytic sliding field
    p = sliding_slabs(shift=3, seed=1)
    inside = p["fixed_organs"][0, 0] > 0
    errors = {}
    for pad in (0.0, 10.0):
        reg = IterativeSegReg(levels=(2, 1), iterations=(40, 20), lr=0.3, max_padding=pad, progress=False)
        ddf = reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])["ddf"]
        errors[pad] = float((ddf - p["true_ddf"]).norm(dim=1)[0][inside].mean())
    assert max(errors.values()) < 0.6, errors


def test_a_level_stops_early_when_the_loss_stalls(monkeypatch):
    p = sliding_slabs(shape=(16, 16, 8), shift=0)  # already aligned: nothing to gain after the first steps
    calls = {}
    for tol in (0.0, 1e-3):
        reg = IterativeSegReg(levels=(1,), iterations=(200,), tolerance=tol, patience=10, progress=False)
        count = [0]
        original = reg.batch_losses

        def counting(batch, u, original=original, count=count):
            count[0] += 1
            return original(batch, u)

        monkeypatch.setattr(reg, "batch_losses", counting)
        reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
        calls[tol] = count[0]
    assert calls[0.0] == 200 and calls[1e-3] < 100, calls


def test_composition_from_boxes_equals_whole_grid_smoothing_and_a_thin_region_keeps_its_voxels():
    # reference: the whole-grid weights smoothed in one go (composer.prepare_weights); a 1-voxel sheet (region 3)
    # would own no voxel after smoothing, so it keeps its hard mask and the others give way there
    p = sliding_slabs(shape=(24, 20, 12), shift=1)
    label = p["fixed_regions"].clone()
    label[..., 5:19, 9:10, 3:9] = 3
    for sigma in (None, 1.5):
        plan = IterativeSegReg(sigma=sigma, margin=6, progress=False).plan(label, label)
        ref = plan.composer.prepare_weights(composition_weights(label, plan.regions))
        sheet = (label == 3).float()
        if sigma is not None:
            ref = ref * (1 - sheet) + sheet * torch.tensor([float(r == 3) for r in plan.regions]).view(1, -1, 1, 1, 1)
        for i in range(len(plan)):
            torch.testing.assert_close(plan.region_weight(i), plan.crop(ref[:, i : i + 1], i), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plan.weights().sum(1), torch.ones_like(label[:, 0]))
        assert 0 < float(plan.weights()[0, plan.regions.index(1), 11, 3, 6]) < 1 or sigma is None  # thick: blended
    plan = RegionPlan.build(p["fixed_regions"], p["moving_regions"], global_region=True)
    assert torch.equal(plan.region_weight(0), torch.ones_like(p["fixed"]))


def test_thread_cap_applies_during_the_call_and_is_restored(monkeypatch):
    p = sliding_slabs(shape=(16, 16, 8), shift=1)
    seen = []
    reg = IterativeSegReg(levels=(1,), iterations=(2,), num_threads=1, progress=False)
    original = reg.register

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(reg, "register", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        IterativeSegReg(num_threads=0)
