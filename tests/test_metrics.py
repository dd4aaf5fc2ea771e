import warnings

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.ndimage import map_coordinates

from custom.handlers import TRE, NegJacobianPercent, RegistrationDice, SDlogJ
from custom.metrics import dice_per_label, hd95_per_label, jacobian_determinant, jacobian_stats, tre_mm
from custom.regions import labels_to_regions


def affine_ddf(A, shape=(12, 11, 10)):
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    u = torch.einsum("ij,jxyz->ixyz", torch.as_tensor(A, dtype=torch.float64) - torch.eye(3, dtype=torch.float64), grid)
    return u[None].float()


def test_jacobian_of_analytic_affine_field():
    A = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]])
    det = jacobian_determinant(affine_ddf(A))
    assert det.shape == (1, 8, 7, 6)
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(A))), atol=1e-4, rtol=1e-4)
    stats = jacobian_stats(affine_ddf(A))
    assert stats["sdlogj"] < 1e-5 and stats["neg_jac_count"] == 0


def test_jacobian_matches_numpy_gradient_and_counts_folds():
    rng = np.random.default_rng(0)
    u = rng.normal(0, 0.8, (3, 14, 13, 12))
    grads = [np.gradient(u[c], axis=k) for c in range(3) for k in range(3)]  # central differences inside
    J = np.stack(grads).reshape(3, 3, *u.shape[1:]).transpose(1, 0, 2, 3, 4) + np.eye(3).reshape(3, 3, 1, 1, 1)
    ref = np.linalg.det(J.transpose(2, 3, 4, 0, 1))[2:-2, 2:-2, 2:-2]
    ours = jacobian_determinant(torch.as_tensor(u, dtype=torch.float32)[None])[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    stats = jacobian_stats(torch.as_tensor(u, dtype=torch.float32)[None])
    assert stats["neg_jac_count"] == int((ref <= 0).sum()) > 0
    np.testing.assert_allclose(stats["neg_jac_percent"], 100 * (ref <= 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["sdlogj"], np.log(np.clip(ref, 1e-9, 1e9)).std(), rtol=1e-4)


def test_dice_per_label_hand_computed():
    fixed = torch.zeros(1, 10, 10, 10)
    warped = torch.zeros(1, 10, 10, 10)
    fixed[0, :4] = 1  # 400 voxels
    warped[0, 1:5] = 1  # 400 voxels, 300 overlap
    fixed[0, 6:8] = 2
    d = dice_per_label(warped, fixed, [1, 2, 3])
    torch.testing.assert_close(d[0], torch.tensor(75.0))
    assert d[1] == 0.0 and torch.isnan(d[2])  # label 3 absent in fixed -> NaN as Learn2Reg


def test_hd95_single_voxels_with_anisotropic_spacing():
    fixed = torch.zeros(1, 12, 12, 12)
    warped = torch.zeros(1, 12, 12, 12)
    fixed[0, 3, 4, 5] = 1
    warped[0, 5, 4, 6] = 1
    hd = hd95_per_label(warped, fixed, [1], spacing=(2.0, 1.0, 3.0))
    torch.testing.assert_close(hd[0], torch.tensor(float(np.sqrt(4.0**2 + 3.0**2))))
    # gt {p, p + 3 e_x}, pred {p}: directed distances 0 and 6 mm -> 95th percentile 0.95 * 6 (linear)
    fixed[0, 6, 4, 5] = 1
    fixed[0, 5, 4, 6] = 0
    warped.zero_()
    warped[0, 3, 4, 5] = 1
    hd = hd95_per_label(warped, fixed, [1], spacing=(2.0, 1.0, 3.0))
    torch.testing.assert_close(hd[0], torch.tensor(0.95 * 6.0))


def label_maps(shape=(20, 17, 15), seed=0):
    """A fixed map of blobs (label 1 touches the grid's faces, 4 is missing from the moving map) and a warped one
    that shifts, grows and drops some of them (5 missing from it)."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.zeros(shape, dtype=torch.long)
    fixed[:6, :, :4] = 1
    fixed[5:12, 3:9, 4:11] = 2
    fixed[12:18, 10:16, 2:9] = 3
    fixed[2:5, 12:15, 10:14] = 4
    fixed[15:19, 2:5, 11:14] = 5
    warped = torch.roll(fixed, shifts=(1, -2, 1), dims=(0, 1, 2))
    warped[warped == 5] = 0
    noise = torch.rand(shape, generator=g) < 0.05
    warped[noise] = torch.randint(0, 4, (int(noise.sum()),), generator=g)
    moving = fixed.clone()
    moving[moving == 4] = 0
    return warped, fixed, moving


@pytest.mark.parametrize("spacing", [None, (1.5, 0.8, 3.0)])
def test_dice_and_hd95_match_monai_on_whole_grid_one_hot_stacks(spacing):
    # the counts (Dice) and per-label boxes (HD95) give MONAI's values on one-hot stacks of the whole grid
    warped, fixed, moving = label_maps()
    ids = [1, 2, 3, 4, 5, 7]
    pred, gt = (labels_to_regions(m[None, None].float(), ids) for m in (warped, fixed))
    want_dice = compute_dice(pred, gt, include_background=True, ignore_empty=True)[0] * 100.0
    sp = None if spacing is None else list(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty classes
        want_hd = compute_hausdorff_distance(pred, gt, include_background=True, percentile=95, spacing=sp)[0].float()
    # NaN where a label is missing from the fixed or moving map (4, 7); HD95 also where the warped map lacks it (5)
    want_dice[torch.tensor([False, False, False, True, False, True])] = float("nan")
    want_hd[torch.tensor([False, False, False, True, True, True])] = float("nan")
    for shape_of in (lambda m: m, lambda m: m[None].float(), lambda m: m[None, None].float()):
        dice = dice_per_label(shape_of(warped), shape_of(fixed), ids, shape_of(moving))
        hd = hd95_per_label(shape_of(warped), shape_of(fixed), ids, spacing, shape_of(moving))
        torch.testing.assert_close(dice, want_dice, equal_nan=True, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(hd, want_hd, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert float(dice[0]) < 100.0 and float(hd[0]) > 0.0 and float(dice[4]) == 0.0  # not a trivial comparison


def test_tre_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    ddf = rng.normal(0, 2, (3, 10, 9, 8)).astype(np.float32)
    fixed_pts = rng.uniform(1, 7, (20, 3))
    moving_pts = rng.uniform(1, 7, (20, 3))
    disp = np.stack([map_coordinates(ddf[c], fixed_pts.T, order=1) for c in range(3)], 1)
    ref = np.linalg.norm((fixed_pts + disp - moving_pts) * [1.5, 1.0, 2.0], axis=1)
    ours = tre_mm(torch.as_tensor(ddf)[None], fixed_pts, moving_pts, spacing=(1.5, 1.0, 2.0))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_jacobian_border_per_axis_keeps_thin_axes():
    # 16 slices: the Learn2Reg 2-voxel border would drop 4 of them; border (2, 2, 0) keeps all, with numpy.gradient's
    # one-sided differences on the outer slices
    rng = np.random.default_rng(1)
    u = rng.normal(0, 0.3, (3, 12, 11, 6))
    grads = [np.gradient(u[c], axis=k) for c in range(3) for k in range(3)]
    J = np.stack(grads).reshape(3, 3, *u.shape[1:]).transpose(1, 0, 2, 3, 4) + np.eye(3).reshape(3, 3, 1, 1, 1)
    ref = np.linalg.det(J.transpose(2, 3, 4, 0, 1))[2:-2, 2:-2, :]
    ours = jacobian_determinant(torch.as_tensor(u, dtype=torch.float32)[None], border=(2, 2, 0))[0].numpy()
    assert ours.shape == (8, 7, 6)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    with pytest.raises(ValueError, match="border"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 4), border=2)


def _item(ddf, fixed_ref, moving_ref, **extra):
    return {"ddf": ddf[0], "fixed_reference": fixed_ref[0], "moving_reference": moving_ref[0], **extra}


def test_handlers_score_the_warped_moving_reference_like_numpy():
    fixed = torch.zeros(1, 1, 10, 10, 10)
    fixed[..., 2:6, 2:8, 2:8] = 1
    fixed[..., 6:9, 2:8, 2:8] = 2
    moving = torch.roll(fixed, 1, dims=2)  # moving content one voxel further along x
    zero, shift = torch.zeros(1, 3, 10, 10, 10), torch.zeros(1, 3, 10, 10, 10)
    shift[:, 0] = 1.0  # samples moving at x + 1: undoes the roll
    dice = RegistrationDice({"0": "bg", "1": "a", "2": "b"})
    dice.reset()
    dice.update([_item(zero, fixed, moving)])
    a, b = fixed[0, 0].numpy(), moving[0, 0].numpy()
    ref = np.mean([200 * ((a == i) & (b == i)).sum() / ((a == i).sum() + (b == i).sum()) for i in (1, 2)])
    assert dice.compute() == pytest.approx(ref, abs=1e-3)
    dice.update([_item(shift, fixed, moving)])
    w = b[np.minimum(np.arange(10) + 1, 9)]  # numpy warp at x + 1 with the border clamped
    ref2 = np.mean([200 * ((a == i) & (w == i)).sum() / ((a == i).sum() + (w == i).sum()) for i in (1, 2)])
    assert ref2 > ref and dice.compute() == pytest.approx((ref + ref2) / 2, abs=1e-3)  # mean over the two pairs

    sd, neg = SDlogJ(border=2), NegJacobianPercent(border=2)
    A = np.diag([1.2, 1.0, 1.0])
    for m in (sd, neg):
        m.reset()
        m.update([_item(affine_ddf(A), fixed, moving), _item(affine_ddf(np.eye(3)), fixed, moving)])
    assert sd.compute() < 1e-5 and neg.compute() == 0.0


def test_tre_handler_matches_scipy_and_skips_pairs_without_keypoints():
    rng = np.random.default_rng(0)
    ddf = rng.normal(0, 2, (3, 10, 9, 8)).astype(np.float32)
    fp, mp = rng.uniform(1, 7, (20, 3)), rng.uniform(1, 7, (20, 3))
    disp = np.stack([map_coordinates(ddf[c], fp.T, order=1) for c in range(3)], 1)
    ref = np.linalg.norm((fp + disp - mp) * [1.5, 1.0, 2.0], axis=1).mean()
    affine = torch.diag(torch.tensor([1.5, 1.0, 2.0, 1.0], dtype=torch.float64))
    label = MetaTensor(torch.zeros(1, 1, 10, 9, 8), affine=affine, meta={"original_affine": affine.numpy()})
    item = _item(torch.as_tensor(ddf)[None], label, label)
    t = TRE()
    t.reset()
    t.update([dict(item, fixed_keypoints=torch.as_tensor(fp), moving_keypoints=torch.as_tensor(mp)), item])
    assert t.compute() == pytest.approx(ref, rel=1e-4)


@requires_cuda
def test_metrics_cuda_match_cpu():
    u = torch.randn(1, 3, 12, 12, 12)
    torch.testing.assert_close(jacobian_determinant(u.cuda()).cpu(), jacobian_determinant(u), atol=1e-4, rtol=1e-4)
    pts = torch.rand(5, 3) * 10
    torch.testing.assert_close(tre_mm(u.cuda(), pts, pts).cpu(), tre_mm(u, pts, pts), atol=1e-4, rtol=1e-4)
    warped, fixed, moving = label_maps()
    ids = [1, 2, 3, 4, 5, 7]
    for fn in (dice_per_label, lambda *a: hd95_per_label(*a[:3], (1.5, 0.8, 3.0), a[3])):
        want = fn(warped, fixed, ids, moving)
        got = fn(warped.cuda(), fixed.cuda(), ids, moving.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_epe_inside_and_outside_the_field_of_view_hand_computed():
    from custom.evaluation import epe_metrics

    shape = (6, 5, 4)
    truth = np.zeros((3,) + shape, np.float32)
    disp = np.zeros_like(truth)
    disp[0] = 1.0  # 1 voxel along x everywhere: 2 mm with the anisotropic affine below
    disp[0, 4:] = 3.0  # 6 mm in the part outside the field of view
    label = np.zeros(shape, np.int16)
    label[1:5, 1:4, 1:3] = 7
    fov = np.ones(shape, bool)
    fov[4:] = False
    row = epe_metrics(disp, truth, np.diag([2.0, 1.0, 3.0, 1.0]), label, {7: "organ"}, fov=fov)
    # labelled voxels: x = 1..4; x = 1..3 inside the field of view (2 mm), x = 4 outside (6 mm)
    assert row["epe_in_fov_mm"] == pytest.approx(2.0)
    assert row["epe_outside_fov_mm"] == pytest.approx(6.0)
    assert row["epe_organ_mm"] == pytest.approx((3 * 2.0 + 6.0) / 4)
    with pytest.raises(ValueError, match="different grids"):
        epe_metrics(disp, truth, np.eye(4), label, fov=fov[:-1])
