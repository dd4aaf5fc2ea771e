import numpy as np
import pytest
import torch
from conftest import requires_cuda
from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from phantoms import sliding_slabs
from scipy.ndimage import gaussian_filter

from custom.iterative import IterativeSegReg
from custom.losses import EDTDiceLoss, RegionDiffusionLoss, SegRegLoss
from custom.metrics import dice_per_label
from custom.mind import MINDSSCLoss
from custom.plan import RegionPlan


def thorax_loss():
    return SegRegLoss(
        MINDSSCLoss(), DiceLoss(include_background=True), RegionDiffusionLoss(), {"sim": 10, "mask": 1, "reg": 5}
    )


FREE = dict(loss=thorax_loss(), lr=0.3, progress=False)
SETTINGS = dict(
    loss=thorax_loss(),
    levels=(4, 2, 1),
    iterations=(50, 50, 30),
    lr=0.3,
    progress=False,
)


def register_label_images(fixed_lab, moving_lab, **settings):
    """Displacement of a pair whose images are its label maps (0.3 per id) over one shared texture (2 levels)."""
    texture = torch.rand((1, 1) + tuple(fixed_lab.shape[2:])) * 0.1
    fixed, moving = fixed_lab * 0.3 + texture, moving_lab * 0.3 + texture
    reg = IterativeSegReg(levels=(2, 1), iterations=(30, 20), **settings, **FREE)
    return reg(fixed, moving, fixed_lab, moving_lab)["ddf"]


def organ_dice(p, ddf):
    warped = Warp("nearest")(p["moving_organs"], ddf)
    return dice_per_label(warped, p["fixed_organs"], [1, 2])


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_sliding_piecewise_translation_where_global_cannot(seed):
    p = sliding_slabs(shift=4, seed=seed)
    assert organ_dice(p, torch.zeros_like(p["true_ddf"])).max() < 70  # initial misalignment
    seg = IterativeSegReg(**SETTINGS)(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
    glob = IterativeSegReg(global_region=True, **SETTINGS)(
        p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"]
    )
    d_seg, d_glob = organ_dice(p, seg["ddf"]), organ_dice(p, glob["ddf"])
    assert d_seg.min() >= 95, d_seg
    assert d_glob.mean() < 95, d_glob
    inside = p["fixed_organs"][0, 0] > 0
    err = (seg["ddf"] - p["true_ddf"]).norm(dim=1)[0][inside].mean()
    assert err < 0.5  # voxels, against the analytic field


def test_velocity_field_and_edt_mask_loss_run():
    p = sliding_slabs(shape=(16, 16, 8), shift=1)
    loss = SegRegLoss(LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=7), EDTDiceLoss())
    reg = IterativeSegReg(loss=loss, field="velocity", levels=(2, 1), iterations=(5, 5), progress=False)
    out = reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
    assert out["ddf"].shape == (1, 3, 16, 16, 8) and torch.isfinite(out["ddf"]).all()


def test_bad_input_is_rejected():
    p = sliding_slabs(shape=(16, 16, 8), shift=1)
    bad = p["fixed"].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        IterativeSegReg(progress=False)(bad, p["moving"], p["fixed_regions"], p["moving_regions"])
    with pytest.raises(ValueError, match="iterations"):
        IterativeSegReg(levels=(2, 1), iterations=(5,))


@requires_cuda
def test_iterative_cuda():
    p = {k: v.cuda() for k, v in sliding_slabs(shift=4).items()}
    seg = IterativeSegReg(**SETTINGS)(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
    assert organ_dice({k: v.cpu() for k, v in p.items()}, seg["ddf"].cpu()).min() >= 95


def test_region_outside_the_fixed_field_of_view_drops_the_similarity_term():
    # CBCT padding (0) covers a thin peripheral "bone": MIND against an empty image would only drag it, so that
    # region is registered by its mask and regulariser; regions inside the field of view keep the similarity
    fixed = torch.rand(1, 1, 24, 24, 16) * 0.5 + 0.3
    label = torch.zeros(1, 1, 24, 24, 16)
    label[..., 2:20, 2:18, 2:14] = 1
    label[..., 6:14, 20:23, 3:13] = 2
    fixed[..., :, 19:, :] = 0.0
    plan = RegionPlan.build(label, label)
    reg = IterativeSegReg(fov_value=0.0, progress=False)
    tasks = reg.tasks(plan, fixed)
    use = dict(zip(plan.regions, [t.use_similarity for t in tasks]))
    assert use[1] and not use[2]
    # without its image term a region warps only its mask (no MIND channels to compute or warp)
    outside = tasks[plan.regions.index(2)]
    level = reg.region_level(plan, outside, fixed, fixed, plan.box_shape(outside.index), [1.0] * 3)
    assert level.fixed.shape[1] == 0 and level.moving.shape[1] == 1
    tasks = IterativeSegReg(progress=False).tasks(plan, fixed)
    assert all(t.use_similarity for t in tasks)


MASKS_ONLY = {"sim": 0.0, "mask": 1.0, "reg": 1.0}


def fov_cut_pair(shift=2):
    """A textured box organ translated by ``-shift`` voxels along z (fixed -> moving: ``ddf_z = -shift``); the fixed
    image and its label end at a field of view (z >= 18 is scanner padding, 0), the moving ones do not."""
    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.standard_normal((24, 24, 40)), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    label = np.zeros((24, 24, 40))
    label[6:18, 6:18, 8:30] = 1
    image = 0.2 + 0.05 * texture + 0.3 * label
    fixed, fixed_lab = image[..., 4:36].copy(), label[..., 4:36].copy()
    moving, moving_lab = image[..., 4 + shift : 36 + shift], label[..., 4 + shift : 36 + shift]
    fixed[..., 18:] = fixed_lab[..., 18:] = 0.0
    return [torch.as_tensor(a, dtype=torch.float32)[None, None] for a in (fixed, moving, fixed_lab, moving_lab)]


def test_segmentations_that_end_at_the_field_of_view_count_inside_it_only():
    # a CBCT segmentation stops at the scanner's field of view; counting the mask loss outside it reads the cut as
    # the organ's border and shrinks the motion; inside it only, the translation is recovered (mask loss and
    # regulariser alone, so that the check is of the mask term)
    fixed, moving, fixed_lab, moving_lab = fov_cut_pair()
    inside = fixed_lab[0, 0] > 0
    errors = {}
    masks_only = SegRegLoss(MINDSSCLoss(), DiceLoss(include_background=True), RegionDiffusionLoss(), MASKS_ONLY)
    for mask_fov in ("auto", False):
        reg = IterativeSegReg(
            levels=(2, 1),
            iterations=(40, 20),
            fov_value=0.0,
            mask_fov=mask_fov,
            loss=masks_only,
            reg_domain="box",
            lr=0.3,
            progress=False,
        )
        ddf = reg(fixed, moving, fixed_lab, moving_lab)["ddf"]
        assert reg.pair_mask_fov == (mask_fov == "auto")  # auto: no fixed label outside the field of view
        errors[mask_fov] = abs(float(ddf[0, 2][inside].mean()) + 2.0)
    assert errors["auto"] < 0.25 and errors[False] > 1.0, errors  # counted everywhere, it moves the wrong way
    # labels that reach outside the field of view (e.g. propagated from a planning CT) keep the loss everywhere
    full = fixed_lab.clone()
    full[..., 18:] = moving_lab[..., 16:30]
    reg = IterativeSegReg(levels=(2,), iterations=(1,), fov_value=0.0, **FREE)
    reg(fixed, moving, full, moving_lab)
    assert not reg.pair_mask_fov
    reg = IterativeSegReg(levels=(2,), iterations=(1,), **FREE)  # no field of view to count in
    reg(fixed, moving, fixed_lab, moving_lab)
    assert reg.pair_fov is None and not reg.pair_mask_fov
    with pytest.raises(ValueError, match="mask_fov"):
        IterativeSegReg(mask_fov="sometimes")
    with pytest.raises(ValueError, match="fov_value"):
        IterativeSegReg(mask_fov=True)


@pytest.mark.parametrize("mask_only_levels", [None, 1])
def test_regions_outside_the_field_of_view_stop_after_mask_only_levels(mask_only_levels):
    # a shifted peripheral region in the CBCT padding is registered by its mask alone; with mask_only_levels=1 it is
    # optimised at the coarse level only and keeps that field (upsampled) at the fine one, the others at every level
    fixed = torch.rand(1, 1, 24, 24, 16) * 0.5 + 0.3
    fixed_lab, moving_lab = torch.zeros(2, 1, 1, 24, 24, 16)
    fixed_lab[..., 2:20, 2:18, 2:14] = moving_lab[..., 2:20, 2:18, 2:14] = 1
    fixed_lab[..., 6:14, 20:23, 3:13] = 2
    moving_lab[..., 8:16, 20:23, 3:13] = 2
    fixed[..., :, 19:, :] = 0.0
    reg = IterativeSegReg(
        levels=(2, 1),
        iterations=(20, 10),
        fov_value=0.0,
        mask_only_levels=mask_only_levels,
        min_region_voxels=1,
        **FREE,
    )
    runs = []
    optimise = reg.optimise_group

    def spy(members, fields, n_it, bar=None):
        runs.append((n_it, sorted(reg.plan(fixed_lab, moving_lab).regions[k] for k, _ in members)))
        return optimise(members, fields, n_it, bar)

    reg.optimise_group = spy
    ddf = reg(fixed, fixed, fixed_lab, moving_lab)["ddf"]
    fine = sorted(r for n_it, group in runs if n_it == 10 for r in group)
    assert fine == ([0, 1] if mask_only_levels == 1 else [0, 1, 2])
    assert sorted(r for n_it, group in runs if n_it == 20 for r in group) == [0, 1, 2]
    # the coarse field still moves the region towards its moving mask (2 voxels along the first axis)
    assert ddf[0, 0][fixed_lab[0, 0] == 2].mean() > 0.5
    with pytest.raises(ValueError, match="mask_only_levels"):
        IterativeSegReg(mask_only_levels=0)


def test_pure_in_plane_motion_on_thick_slices_stays_in_plane_with_a_frozen_through_plane_component():
    # 1.8 x 1.8 x 10 mm, motion only in-plane (along y): the in-plane field (the ACDC default) has no through-plane
    # component at all and a lower end-point error than a free 3-D field on the same data
    p = sliding_slabs(shape=(32, 32, 8), shift=3, seed=0)
    spacing = (1.8, 1.8, 10.0)
    inside = p["fixed_organs"][0, 0] > 0
    mm = torch.tensor(spacing).view(3, 1, 1, 1)
    errors = {}
    for frozen in ((), (2,)):
        reg = IterativeSegReg(levels=(2, 1), iterations=(50, 30), frozen_components=frozen, **FREE)
        u = reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"], spacing=spacing)["ddf"][0]
        errors[frozen] = float(((u - p["true_ddf"][0]) * mm).norm(dim=0)[inside].mean())
        if frozen:
            assert u[2].abs().max() == 0
    assert errors[(2,)] < 0.6 and errors[(2,)] < errors[()], errors


@pytest.mark.parametrize("reg_domain", ["box", "region", "auto"])
def test_a_thin_small_region_is_registered(reg_domain):
    # a 2-voxel-thick tube shifted by 2 voxels next to a large static region: every region present in both maps is
    # registered, however small (its Dice rises from the unregistered value)
    shape = (24, 24, 12)
    fixed_lab = torch.zeros((1, 1) + shape)
    fixed_lab[..., 2:22, 2:11, 2:10] = 1
    fixed_lab[..., 6:18, 14:16, 5:7] = 2
    moving_lab = fixed_lab.clone()
    moving_lab[..., 6:18, 14:16, 5:7] = 0
    moving_lab[..., 6:18, 16:18, 5:7] = 2
    ddf = register_label_images(fixed_lab, moving_lab, reg_domain=reg_domain)
    before = dice_per_label(moving_lab, fixed_lab, [2])[0]
    after = dice_per_label(Warp("nearest")(moving_lab, ddf), fixed_lab, [2])[0]
    assert before == 0 and after > 50, (before, after)
    with pytest.raises(ValueError, match="reg_domain"):
        IterativeSegReg(reg_domain="everywhere")


def test_smoothed_composition_reaches_the_plan():
    p = sliding_slabs(shape=(16, 16, 8), shift=1)
    plan = IterativeSegReg(sigma=2.0, progress=False).plan(p["fixed_regions"], p["moving_regions"])
    w = plan.weights()
    assert plan.composer.sigma == 2.0 and 0 < float(w[0, 0, 7, 8, 4]) < 1  # blended next to the border at x = 8
    torch.testing.assert_close(w.sum(1), torch.ones_like(w[:, 0]))


@pytest.mark.parametrize("centroid_init", [0.5, 0.0])
def test_a_small_region_that_moved_further_than_its_size_starts_from_its_centroid_translation(centroid_init):
    # a 3x3x3 cube moved by 7 voxels: its masks do not touch, so Dice gives no gradient and the 2-voxel-wide
    # MIND patches barely see it; the centroid translation (the analytic answer here) starts it in place
    shape = (32, 24, 16)
    fixed_lab = torch.zeros((1, 1) + shape)
    fixed_lab[..., 2:30, 2:22, 2:6] = 1  # a large static region below
    moving_lab = fixed_lab.clone()
    fixed_lab[..., 8:11, 10:13, 9:12] = 2
    moving_lab[..., 15:18, 10:13, 9:12] = 2
    ddf = register_label_images(fixed_lab, moving_lab, centroid_init=centroid_init)
    inside = fixed_lab[0, 0] == 2
    shift = ddf[0, 0][inside].mean()
    # fixed cube voxels that land in the moving cube (Dice would also count the background's own field, which maps
    # the gap the cube left onto the moving cube: the sliding fill, not this region's registration)
    landed = float((Warp("nearest")(moving_lab, ddf)[0, 0][inside] == 2).float().mean())
    if centroid_init:
        assert abs(shift - 7.0) < 0.5 and landed > 0.95, (shift, landed)
        assert ddf[0, 1:][:, inside].abs().max() < 0.5
    else:  # without it the cube stays where it was: the case the initialisation exists for
        assert shift < 3.0 and landed < 0.5, (shift, landed)


@pytest.mark.parametrize("gate", [None, 2.0])
def test_the_noise_gate_stops_the_field_drifting_in_pure_noise(gate):
    """Two independent white-noise images have no motion to find. Plain MIND-SSC normalises the noise to full
    contrast and interpolating its warped descriptors lowers their variance most at half-voxel shifts, so the field
    drifts by about a voxel; with the noise gate the similarity ignores the noise and the field stays at 0."""
    torch.manual_seed(0)
    shape = (1, 1, 40, 40, 12)
    fixed, moving = torch.randn(shape) * 0.05, torch.randn(shape) * 0.05
    one = torch.ones(shape)
    loss = SegRegLoss(
        MINDSSCLoss(noise_gate=gate),
        DiceLoss(include_background=True),
        RegionDiffusionLoss(),
        {"sim": 10, "mask": 1, "reg": 5},
    )
    ddf = IterativeSegReg(loss=loss, levels=(2, 1), iterations=(50, 30), progress=False)(fixed, moving, one, one)["ddf"]
    drift = ddf.abs().mean().item()
    if gate is None:
        assert drift > 0.3, drift  # the failure the gate removes (voxels)
    else:
        assert drift < 0.02, drift


def test_small_batches_run_on_one_cpu_thread_and_the_setting_is_restored(monkeypatch):
    # crops below single_thread_voxels (one region: below single_region_voxels) are not split by torch: the solver
    # drops to one thread for them (other threads would only spin), keeps the caller's threads for larger batches, and
    # restores the setting afterwards
    p = sliding_slabs(shape=(24, 20, 12))
    seen, kinds = [], set()
    optimise = IterativeSegReg.optimise_batch

    def spy(self, batch, init, n_it, bar=None):
        voxels = len(batch) * batch.shape[0] * batch.shape[1] * batch.shape[2]
        seen.append((len(batch), voxels, torch.get_num_threads()))
        return optimise(self, batch, init, n_it, bar)

    monkeypatch.setattr(IterativeSegReg, "optimise_batch", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for region_ids, one_region_limit in ((None, 6000), ([1], 6000), ([1], 4000)):
            reg = IterativeSegReg(levels=(2, 1), iterations=(5, 5), region_ids=region_ids, **FREE)
            reg.single_thread_voxels, reg.single_region_voxels = 2000, one_region_limit
            reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
            assert torch.get_num_threads() == 2
            for regions, voxels, threads in seen:
                limit = one_region_limit if regions == 1 else 2000
                assert threads == (1 if voxels < limit else 2), (regions, voxels, threads, limit)
            kinds.update((regions, voxels < 2000, threads) for regions, voxels, threads in seen)
            seen.clear()
    finally:
        torch.set_num_threads(before)
    # every case met: small batches of both kinds on one thread, a one-region batch above single_thread_voxels on one
    # thread (under its limit) and on two (over it), a larger batch of two regions on two
    assert {(2, True, 1), (2, False, 2), (1, True, 1), (1, False, 1), (1, False, 2)} <= kinds, kinds


def test_last_profile_splits_the_cpu_time_of_the_pair_into_phases():
    import time

    p = sliding_slabs(shape=(24, 20, 12))
    reg = IterativeSegReg(levels=(2, 1), iterations=(5, 5), **FREE)
    start = time.process_time()
    reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
    total = time.process_time() - start
    phases = reg.last_profile
    assert {"plan", "level 1 set-up", "level 1 optimisation", "level 2 optimisation", "composition", "warping"} <= set(
        phases
    )
    assert all(v >= 0 for v in phases.values())
    assert phases["level 2 optimisation"] > 0 and sum(phases.values()) <= total + 1e-3


def test_warped_outputs_equal_fresh_monai_warps_and_no_reference_grid_is_kept():
    p = sliding_slabs(shape=(20, 16, 12), shift=2)
    reg = IterativeSegReg(levels=(2, 1), iterations=(5, 5), **FREE)
    labels = p["moving_regions"].float()
    for _ in range(2):  # a second pair reuses the solver's Warp modules
        out = reg(p["fixed"], p["moving"], p["fixed_regions"], p["moving_regions"])
        ddf = out["ddf"]
        assert torch.equal(out["warped_image"], Warp("bilinear", "border")(p["moving"].float(), ddf))
        assert torch.equal(out["warped_label"], Warp("nearest", "border")(labels, ddf))
        assert reg.warp_image.ref_grid is None and reg.warp_label.ref_grid is None


@pytest.mark.parametrize("nd", [2, 3])
def test_auto_reg_domain_grows_thin_masks_only(nd):
    # reference: scipy's binary dilation by the (2r+1)^d box for the thin plate; a thick block keeps its own mask
    from scipy.ndimage import binary_dilation

    from custom.iterative import is_thin

    shape = (20, 18, 16)[:nd]
    plate, block = torch.zeros((1, 1) + shape), torch.zeros((1, 1) + shape)
    plate[(0, 0, slice(8, 9)) + (slice(3, 15),) * (nd - 1)] = 1.0  # one voxel thick
    block[(0, 0) + (slice(2, 16),) * nd] = 1.0  # 14 voxels across: (12 / 14) ** 3 = 63 % survive an erosion
    assert is_thin(plate) and not is_thin(block)
    reg = IterativeSegReg(reg_domain="auto", progress=False)
    want = binary_dilation(plate[0, 0].numpy() > 0, np.ones((5,) * nd))
    np.testing.assert_array_equal(reg.reg_mask(plate)[0, 0].numpy() > 0.5, want)
    torch.testing.assert_close(reg.reg_mask(block), block)
