"""The sparse step of the iterative solver: a region stack is warped only where its sample can differ from the
stack's background, with the loss and gradient of the dense warp."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from monai.losses import DiceLoss
from scipy.ndimage import binary_erosion, gaussian_filter

from custom import sparse_warp
from custom.iterative import IterativeSegReg
from custom.losses import RegionDiffusionLoss, SegRegLoss
from custom.mind import MINDSSCLoss
from custom.region_batch import RegionBatch
from custom.sparse_warp import active_points, background_interior, background_of, gather_points, linear_dice


def blob_stack(shape, background, seed=0, blobs=3):
    """``(1, C, *shape)``: ``background`` everywhere except a few random boxes of random values."""
    g = torch.Generator().manual_seed(seed)
    stack = torch.as_tensor(background, dtype=torch.float32).view(1, -1, *[1] * len(shape)).repeat(1, 1, *shape)
    for _ in range(blobs):
        lo = [int(torch.randint(0, n - 4, (1,), generator=g)) for n in shape]
        box = (slice(None), slice(None)) + tuple(slice(a, a + 4) for a in lo)
        stack[box] = torch.rand(stack[box].shape, generator=g)
    return stack


def test_background_is_what_a_region_stack_holds_far_from_its_mask():
    like = torch.zeros((1, 1, 9, 9, 9))
    mind = MINDSSCLoss()
    torch.testing.assert_close(background_of(mind.descriptors, 1, like), torch.tensor([1.0] * 12 + [0.0]))
    torch.testing.assert_close(background_of(lambda x: x, 2, like), torch.zeros(3))
    torch.testing.assert_close(background_of(None, 1, like[..., 0]), torch.zeros(1))
    # and really so: the descriptors of a masked image far from its mask (MIND reaches 3 voxels)
    image = torch.zeros((1, 1, 20, 20, 20))
    image[..., 2:6, 2:6, 2:6] = torch.rand((1, 1, 4, 4, 4)) + 0.5
    far = mind.descriptors(image)[..., 12:, 12:, 12:]
    assert torch.equal(far, torch.ones_like(far))


@pytest.mark.parametrize("shape", [(14, 12, 10), (16, 13)])
def test_interior_is_the_erosion_of_the_background_voxels(shape):
    # independent reference: scipy's binary erosion with the 3^d box, nothing outside the grid counted as background
    background = [1.0, 0.0]
    stack = blob_stack(shape, background, seed=len(shape))
    same = (stack == torch.tensor(background).view(1, -1, *[1] * len(shape))).all(1)[0].numpy()
    want = binary_erosion(same, structure=np.ones((3,) * len(shape)), border_value=0)
    got = background_interior(stack, torch.tensor(background))[0, 0].numpy() > 0.5
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(14, 12, 10), (16, 13)])
def test_inactive_points_sample_the_background_with_zero_gradient(shape):
    # dense bilinear warp of the whole stack as the reference: wherever a point is not active, its sample is the
    # background and its gradient is 0, for smooth fields, large shifts and points pushed off the grid
    torch.manual_seed(0)
    background = torch.tensor([1.0, 1.0, 0.0])
    stack = torch.cat([blob_stack(shape, background, seed=s) for s in (1, 2)])
    nd = len(shape)
    coarse = torch.randn((2, nd) + (3,) * nd) * torch.tensor([1.0, 6.0]).view(2, 1, *[1] * nd)  # element 2 moves far
    mode = "trilinear" if nd == 3 else "bilinear"
    u = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)[None]
    scale = torch.tensor([2.0 / (n - 1) for n in shape][::-1])
    grid = (base + u.flip(1).movedim(1, -1) * scale).requires_grad_(True)
    active = active_points(background_interior(stack, background), grid.detach())
    dense = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    dense.square().sum().backward()
    idle = ~active
    assert 0.2 < float(idle.float().mean()) < 0.95
    assert bool((grid.detach().abs() > 1).any(-1).flatten(1)[1].any())  # some points really leave the grid
    values = dense.detach().flatten(2).transpose(1, 2)[idle]  # (points, C)
    torch.testing.assert_close(values, background.expand_as(values), rtol=0, atol=1e-6)
    grad = grid.grad.reshape(2, -1, nd)
    assert float(grad[idle].abs().max()) <= 1e-5 * float(grad.abs().max())  # 0 up to float rounding


def test_gather_points_lists_each_rows_active_voxels_in_order():
    active = torch.rand((3, 50), generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.1], [0.6], [0.0]])
    index, real = gather_points(active)
    assert index.shape == real.shape == (3, int(active.sum(1).max()))
    for b in range(3):
        torch.testing.assert_close(index[b][real[b]], active[b].nonzero()[:, 0])
        assert int(real[b].sum()) == int(active[b].sum())


def two_blob_pair(shape=(36, 32, 20), shift=2, seed=0):
    """A textured pair with two regions of two small boxes each at opposite corners (a region whose box covers most of
    the grid and whose mask covers little of it: the left and right lung of a thorax); moving = fixed shifted by
    ``shift`` voxels along axis 1."""
    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.standard_normal(shape), 1.5)
    image = 0.5 + (texture - texture.mean()) / texture.std() * 0.2
    label = np.zeros(shape, np.int64)
    label[3:9, 4:10, 4:10] = 1
    label[-10:-3, -11:-4, -10:-3] = 1
    label[3:10, -11:-4, 3:9] = 2
    label[-9:-3, 4:10, -9:-3] = 2
    fixed, fixed_label = image * (label > 0), label
    moving, moving_label = np.roll(fixed, shift, 1), np.roll(fixed_label, shift, 1)
    t = lambda a, dtype=torch.float32: torch.as_tensor(a, dtype=dtype)[None, None]  # noqa: E731
    return t(fixed), t(moving), t(fixed_label, torch.int64), t(moving_label, torch.int64)


def build_batch(reg, pair, fov_cut=False):
    fixed, moving, fixed_label, moving_label = pair
    if fov_cut:  # the mask loss counts inside a field of view only (segmentations that end at it)
        reg.pair_fov = torch.ones_like(fixed)
        reg.pair_fov[..., :, :, 15:] = 0
        reg.pair_mask_fov = True
    plan = reg.plan(fixed_label, moving_label)
    tasks = reg.tasks(plan, fixed)
    noise = torch.tensor([1e-4])
    regions = [reg.region_level(plan, t, fixed, moving, plan.box_shape(t.index), [1.0, 1.5, 2.0], noise) for t in tasks]
    return RegionBatch.stack(regions)


@pytest.mark.parametrize("fov_cut", [False, True])
def test_sparse_losses_and_gradients_equal_the_dense_ones(fov_cut, monkeypatch):
    loss = SegRegLoss(MINDSSCLoss(noise_gate=2.0), DiceLoss(include_background=True), RegionDiffusionLoss())
    reg = IterativeSegReg(loss=loss, margin=2, region_ids=(1, 2), sparse_warp=True, progress=False)
    batch = build_batch(reg, two_blob_pair(), fov_cut)
    assert len(batch) == 2 and len({r.shape for r in batch.regions}) == 2  # padded; boxes ~ the grid
    assert batch.sim_weight is not None and (batch.mask_domain is not None) == fov_cut
    coarse = torch.randn((2, 3, 4, 4, 3), generator=torch.Generator().manual_seed(1)) * 1.5
    u0 = F.interpolate(coarse, size=batch.shape, mode="trilinear", align_corners=True)
    calls = []
    monkeypatch.setattr("custom.iterative.sample_points", lambda *a: calls.append(1) or sparse_warp.sample_points(*a))
    results = {}
    for mode in (False, True):
        reg.sparse_warp = mode
        batch.cache.pop("sparse", None)
        u = u0.clone().requires_grad_(True)
        losses = reg.batch_losses(batch, u)
        losses.sum().backward()
        results[mode] = losses.detach(), u.grad
    assert calls == [1]  # the sparse step was taken once, by the sparse run
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    assert float(results[False][1].abs().max()) > 1e-4  # the gradients compared are not all zero


def test_sparse_step_applies_only_where_it_is_exact():
    pair = two_blob_pair()
    for dice in (DiceLoss(include_background=True, squared_pred=True), DiceLoss(include_background=True, batch=True)):
        assert not linear_dice(dice)
        loss = SegRegLoss(MINDSSCLoss(), dice, RegionDiffusionLoss())
        reg = IterativeSegReg(loss=loss, margin=2, region_ids=(1, 2), progress=False)
        batch = build_batch(reg, pair)
        assert reg.sparse_terms(batch) is None  # a Dice that is not a sum over voxels keeps the dense warp
    assert linear_dice(DiceLoss(include_background=True))
    reg = IterativeSegReg(margin=2, region_ids=(1, 2), sparse_warp=False, progress=False)
    assert reg.sparse_terms(build_batch(reg, pair)) is None
    reg = IterativeSegReg(margin=2, region_ids=(1, 2), progress=False)  # "auto": on the CPU
    assert reg.sparse_warp == "auto" and reg.sparse_terms(build_batch(reg, pair)) is not None
    with pytest.raises(ValueError, match="sparse_fraction"):
        IterativeSegReg(sparse_fraction=1.5)
    with pytest.raises(ValueError, match="sparse_warp"):
        IterativeSegReg(sparse_warp="sometimes")


def test_sparse_and_dense_solvers_register_alike():
    pair = two_blob_pair(shift=3)
    out = {}
    for mode in (False, True):
        reg = IterativeSegReg(levels=(2, 1), iterations=(20, 10), margin=2, sparse_warp=mode, progress=False)
        out[mode] = reg(*pair)["ddf"]
    inside = pair[2][0, 0] > 0
    err = (out[True][0, 1][inside] - 3.0).abs().mean()
    assert float(err) < 1.0  # both really register (3 voxels of shift)
    # the same loss and gradient to float rounding; over 30 Adam steps (normalised by tiny second moments) and the
    # choice of each region's best iterate such rounding grows to about 2e-3 voxel here
    assert float((out[True] - out[False]).norm(dim=1).max()) < 1e-2


@requires_cuda
def test_sparse_step_on_cuda_matches_the_cpu():
    loss = SegRegLoss(MINDSSCLoss(noise_gate=2.0), DiceLoss(include_background=True), RegionDiffusionLoss())
    reg = IterativeSegReg(loss=loss, margin=2, region_ids=(1, 2), sparse_warp=True, progress=False)
    batch = build_batch(reg, two_blob_pair())
    u0 = torch.randn((2, 3, 4, 4, 3), generator=torch.Generator().manual_seed(1))
    u0 = F.interpolate(u0, size=batch.shape, mode="trilinear", align_corners=True)
    cpu = reg.batch_losses(batch, u0)
    gpu = build_batch(reg, tuple(t.cuda() for t in two_blob_pair()))
    assert reg.sparse_terms(gpu) is not None
    torch.testing.assert_close(reg.batch_losses(gpu, u0.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-5)
