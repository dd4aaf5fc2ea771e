"""Lattice sampling of the iterative solver (``IterativeSegReg(sample_stride=...)``): each step scores the large
regions on every second voxel per axis, the lattice shifting from step to step, its sums scaled to the grid.

References: the full step (every voxel; itself tested against the dense warp in ``test_sparse_warp.py``), torch's max
pooling for the box filters, and the true shift of a synthetic pair."""

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from monai.losses import DiceLoss
from test_sparse_warp import build_batch, two_blob_pair

from custom.iterative import ControlGrid, IterativeSegReg, dilate, is_thin
from custom.losses import RegionDiffusionLoss, SegRegLoss
from custom.mind import MINDSSCLoss
from custom.region_batch import RegionBatch, resize_field
from custom.utils import box_extreme

EVEN = (36, 32, 22)  # the pair's region boxes pad to 34 x 30 x 20: every lattice phase holds the same voxel count


def solver(weights, **kwargs):
    loss = SegRegLoss(MINDSSCLoss(noise_gate=2.0), DiceLoss(include_background=True), RegionDiffusionLoss(), weights)
    return IterativeSegReg(loss=loss, margin=2, region_ids=(1, 2), progress=False, **kwargs)


def smooth_field(shape, seed=1, amplitude=1.5):
    coarse = torch.randn((2, 3, 4, 4, 3), generator=torch.Generator().manual_seed(seed)) * amplitude
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def loss_and_grad(reg, batch, u0):
    u = u0.clone().requires_grad_(True)
    losses = reg.batch_losses(batch, u)
    losses.sum().backward()
    return losses.detach(), u.grad


def control_loss_and_grad(reg, batch, basis, param0):
    """The solver's losses and their gradient for the control values ``param0`` of ``basis`` (the control path)."""
    param = param0.clone().requires_grad_(True)
    losses = reg.batch_losses(batch, control=(basis, param))
    losses.sum().backward()
    return losses.detach(), param.grad


@pytest.mark.parametrize("sparse", [True, False])
def test_the_phases_of_a_lattice_average_to_the_full_similarity_and_gradient(sparse):
    # the similarity is a sum over voxels: the mean of its 8 lattice estimates (stride 2, 3-D) is the full sum, and so
    # is the mean of their gradients; the regulariser is the full one at every phase
    weights = {"sim": 10.0, "mask": 0.0, "reg": 5.0}
    pair = two_blob_pair(shape=EVEN)
    full = solver(weights, sparse_warp=sparse)
    lattice = solver(weights, sparse_warp=sparse, sample_stride=2, sample_min_points=1)
    batch = build_batch(lattice, pair)
    assert batch.shape == (34, 30, 20) and lattice.lattice_stride(batch) == 2
    u0 = smooth_field(batch.shape)
    want_loss, want_grad = loss_and_grad(full, build_batch(full, pair), u0)
    phases = [loss_and_grad(lattice, batch, u0) for _ in range(8)]
    assert sorted(batch.cache["lattice"]) == list(range(8))  # eight different lattices, each used once
    losses = torch.stack([p[0] for p in phases])
    assert float((losses - want_loss).abs().max()) > 1e-3 * float(want_loss.abs().max())  # one phase is not the sum
    torch.testing.assert_close(losses.mean(0), want_loss, rtol=1e-4, atol=1e-5)
    grad = torch.stack([p[1] for p in phases]).mean(0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-4 * float(want_grad.abs().max()))


def test_lattice_dice_estimates_the_full_dice():
    # Dice is a ratio of sums: each phase estimates it from a lattice of the masks (a ratio estimate, close not equal)
    weights = {"sim": 0.0, "mask": 1.0, "reg": 0.0}
    pair = two_blob_pair(shape=EVEN)
    full, lattice = solver(weights), solver(weights, sample_stride=2, sample_min_points=1)
    u0 = smooth_field((34, 30, 20), amplitude=1.0)
    want = loss_and_grad(full, build_batch(full, pair), u0)[0]
    batch = build_batch(lattice, pair)
    got = torch.stack([loss_and_grad(lattice, batch, u0)[0] for _ in range(8)])
    assert float(want.min()) > 0.05  # the masks do not match under this field: a Dice loss to estimate
    torch.testing.assert_close(got.mean(0), want, rtol=0.03, atol=0.0)


def test_sparse_and_all_point_lattices_give_the_same_step():
    # on a CPU the lattice keeps its active points, on a GPU all of them: the same loss and gradient at every phase
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    pair = two_blob_pair(shape=EVEN)
    runs = {}
    for sparse in (True, False):
        reg = solver(weights, sparse_warp=sparse, sample_stride=2, sample_min_points=1)
        batch = build_batch(reg, pair)
        runs[sparse] = [loss_and_grad(reg, batch, smooth_field(batch.shape)) for _ in range(3)]
    for (la, ga), (lb, gb) in zip(runs[True], runs[False]):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
        assert float(ga.abs().max()) > 1e-4


def test_the_lattice_is_taken_for_large_regions_with_an_image_term_only():
    pair = two_blob_pair(shape=EVEN)
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    assert solver(weights).lattice_stride(build_batch(solver(weights), pair)) == 1  # default: every voxel
    small = solver(weights, sample_stride=2, sample_min_points=100000)  # regions under the threshold keep every voxel
    assert small.lattice_stride(build_batch(small, pair)) == 1
    reg = solver(weights, sample_stride=2, sample_min_points=1)
    batch = build_batch(reg, pair)
    masks_only = RegionBatch.stack([r for r in batch.regions])
    masks_only.fixed, masks_only.moving = batch.fixed[:, :0], batch.moving[:, -1:]
    assert reg.lattice_stride(masks_only) == 1  # a region registered by its masks alone keeps every voxel
    squared = SegRegLoss(MINDSSCLoss(), DiceLoss(include_background=True, squared_pred=True), RegionDiffusionLoss())
    reg = IterativeSegReg(loss=squared, margin=2, region_ids=(1, 2), progress=False, sample_stride=2)
    assert reg.lattice_stride(build_batch(reg, pair)) == 1  # a Dice that is not a sum over voxels: every voxel
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sample_stride"):
            IterativeSegReg(sample_stride=bad)


def test_a_singleton_axis_keeps_its_voxel():
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    reg = solver(weights, sample_stride=2, sample_min_points=1)
    batch = build_batch(reg, two_blob_pair(shape=EVEN))
    flat = RegionBatch(
        batch.regions,
        *[None if t is None else t[..., 4:5].contiguous() for t in (batch.fixed, batch.moving, batch.fixed_masks)],
        None,
        *[t[..., 4:5].contiguous() for t in (batch.valid, batch.reg_domain, batch.sim_weight)],
    )
    assert reg.lattice_stride(flat) == 2
    u0 = smooth_field(flat.shape)
    u0[:, 2] = 0
    for _ in range(8):
        losses, grad = loss_and_grad(reg, flat, u0)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert sorted(flat.cache["lattice"]) == [0, 1, 2, 3]  # 2 x 2 phases in-plane, the single slice in each


def test_lattice_solver_registers_a_shift_like_the_full_one(monkeypatch):
    pair = two_blob_pair(shift=3)
    calls = []
    original = IterativeSegReg.lattice_batch_losses
    monkeypatch.setattr(IterativeSegReg, "lattice_batch_losses", lambda *a, **k: calls.append(1) or original(*a, **k))
    inside = pair[2][0, 0] > 0
    for stride in (1, 2):
        reg = IterativeSegReg(levels=(2, 1), iterations=(20, 10), margin=2, progress=False, sample_stride=stride)
        reg.sample_min_points = 1
        ddf = reg(*pair)["ddf"]
        err = (ddf[0, 1][inside] - 3.0).abs().mean()
        assert float(err) < 1.0, (stride, float(err))  # 3 voxels of shift recovered to under a voxel
        assert bool(calls) == (stride == 2)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_lattice_batch_returns_its_last_iterate_a_full_one_its_best(stride, monkeypatch):
    # every call's loss is made higher than the one before (a constant: the gradients do not change); a full batch
    # keeps its lowest loss's iterate (the start), a lattice batch, whose losses are noisy estimates, its last one
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    reg = solver(weights, sample_stride=stride, sample_min_points=1, tolerance=0)
    batch = build_batch(reg, two_blob_pair(shape=EVEN))
    assert reg.lattice_stride(batch) == stride
    calls, params = [], []
    original = reg.batch_losses
    monkeypatch.setattr(
        reg, "batch_losses", lambda *a, **k: original(*a, **k) + 100.0 * (calls.append(1) or len(calls))
    )
    adam_step = torch.optim.Adam.step

    def recording_step(opt, *args):  # the control-grid parameters after each step
        out = adam_step(opt, *args)
        params.append(opt.param_groups[0]["params"][0].detach().clone())
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    init = smooth_field(batch.shape, amplitude=0.5)
    out = reg.optimise_batch(batch, init, 6)
    assert len(calls) == len(params) == 6
    basis = ControlGrid(params[-1].shape[2:], batch.shape)
    start = basis.field(basis.parameters_of(init))
    want = basis.field(params[-1]) if stride == 2 else start
    torch.testing.assert_close(out, want)
    assert float((basis.field(params[-1]) - start).abs().max()) > 1e-3  # the two candidates differ


def test_control_grid_field_is_resize_field_of_the_smoothed_parameters():
    # the rescaling to level voxels is taken on the control grid: the same field as resizing first (float64)
    for grid, size in (([5, 6, 7], [9, 11, 13]), ([9, 11, 13], [9, 11, 13]), ([4, 4], [8, 9]), ([9, 5], [9, 8])):
        basis = ControlGrid(grid, size)
        param = torch.randn((2, len(grid), *grid), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        want = resize_field(basis.smooth(param * basis.scale.to(param)), size)
        torch.testing.assert_close(basis.field(param), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nd", [2, 3])
def test_box_filters_equal_max_pooling(nd):
    pool = F.max_pool3d if nd == 3 else F.max_pool2d
    g = torch.Generator().manual_seed(nd)
    for shape in ((7, 1, 5)[:nd], (12, 9, 10)[:nd], (1, 6, 2)[:nd]):
        soft = torch.rand((2, 1) + shape, generator=g) * (torch.rand((2, 1) + shape, generator=g) < 0.4)
        assert torch.equal(box_extreme(soft, largest=True), pool(soft, 3, stride=1, padding=1))
        assert torch.equal(box_extreme(soft, largest=False), -pool(-soft, 3, stride=1, padding=1))
        binary = soft > 0.2  # bool masks: grown and eroded in place, the same voxels as pooling
        assert torch.equal(box_extreme(binary, largest=True), pool(binary.float(), 3, stride=1, padding=1) > 0)
        assert torch.equal(box_extreme(binary, largest=False), -pool(-binary.float(), 3, stride=1, padding=1) > 0)
        for radius in (1, 2):
            assert torch.equal(dilate(soft, radius), pool(soft, 2 * radius + 1, stride=1, padding=radius))
        mask = soft[:1]
        eroded = -pool(-mask, 3, stride=1, padding=1)
        for fraction in (0.2, 0.5):
            assert is_thin(mask, fraction) == bool(eroded.sum() < fraction * mask.sum())


@requires_cuda
@pytest.mark.parametrize("on_control", [False, True])
def test_lattice_step_on_cuda_equals_cpu(on_control):
    # the field on every level voxel, and a displacement read and regularised on its control grid
    # (custom.control_lattice), alike
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    pair = two_blob_pair(shape=EVEN)
    out = {}
    for device in ("cpu", "cuda"):
        reg = solver(weights, sample_stride=2, sample_min_points=1)
        batch = build_batch(reg, [t.to(device) for t in pair])
        field = smooth_field(batch.shape).to(device)
        if on_control:
            basis = ControlGrid(reg.control_grid(batch.shape, [1.0, 1.5, 2.0]), batch.shape)
            out[device] = [control_loss_and_grad(reg, batch, basis, basis.parameters_of(field)) for _ in range(2)]
        else:
            out[device] = [loss_and_grad(reg, batch, field) for _ in range(2)]
    for (la, ga), (lb, gb) in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(la, lb.cpu(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ga, gb.cpu(), rtol=1e-3, atol=1e-5)
