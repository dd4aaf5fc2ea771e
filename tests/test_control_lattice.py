"""A control grid's field read at lattice voxels only, and its diffusion taken on the control grid
(``custom.control_lattice``), as the iterative solver uses them for lattice-scored batches.

References: ``F.interpolate`` (trilinear / bilinear, align_corners=True) for the field, ``RegionDiffusionLoss`` of the
upsampled field (and autograd through it) for the regulariser and its gradient, finite differences (gradcheck)."""

import pytest
import torch
import torch.nn.functional as F
from test_sample_lattice import EVEN, smooth_field, solver
from test_sparse_warp import build_batch, two_blob_pair

from custom.control_lattice import ControlDiffusion, LatticeField, interpolation_matrix
from custom.iterative import ControlGrid
from custom.losses import RegionDiffusionLoss

CASES = [((7, 6, 5), (20, 13, 9)), ((4, 9, 2), (8, 17, 3)), ((5, 6), (13, 11)), ((3, 3, 3), (3, 3, 3))]


def upsample(c, size):
    return F.interpolate(c, size=size, mode="trilinear" if c.ndim == 5 else "bilinear", align_corners=True)


def phases(nd):
    for phase in range(2**nd):
        yield tuple(slice((phase >> a) & 1, None, 2) for a in range(nd))


@pytest.mark.parametrize("grid,size", CASES)
def test_lattice_field_is_the_upsampled_field_at_the_lattice(grid, size):
    c = torch.randn((2, len(grid), *grid), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full = upsample(c, size)
    for lattice in phases(len(grid)):
        got = LatticeField(grid, size, lattice, dtype=c.dtype)(c)
        torch.testing.assert_close(got, full[(slice(None), slice(None)) + lattice], rtol=1e-12, atol=1e-12)


def test_interpolation_matrix_is_linear_interpolation():
    for g, n in ((2, 5), (5, 9), (6, 11), (4, 4), (40, 80)):
        eye = torch.eye(g, dtype=torch.float64)[None]  # (1, g, g): channel j is control value j
        want = F.interpolate(eye, size=n, mode="linear", align_corners=True)[0].T  # (n, g)
        torch.testing.assert_close(interpolation_matrix(g, n), want, rtol=1e-12, atol=1e-12)


def regions_and_spacing(size, seed=0, isotropic=False):
    g = torch.Generator().manual_seed(seed)
    domains = (torch.rand((2, 1, *size), generator=g) > 0.3).double()
    rows = [[4.0, 4.0, 4.0], [3.0, 3.0, 3.0]] if isotropic else [[1.0, 2.0, 3.0], [1.5, 1.5, 4.0]]
    spacing = torch.tensor([r[: len(size)] for r in rows], dtype=torch.float64)
    return RegionDiffusionLoss(reduction="none"), domains, spacing


# integer and non-integer voxels per control cell (a voxel difference then spans three control points), 2-D, an axis
# of two control points, no upsampling at all, and the solver's 80 x 64 x 64 lung box
DIFFUSION_CASES = CASES + [((40, 32, 32), (80, 64, 64)), ((5, 2, 4), (9, 7, 13))]


@pytest.mark.parametrize("grid,size", DIFFUSION_CASES)
@pytest.mark.parametrize("isotropic", [False, True])
def test_control_diffusion_is_the_level_grid_diffusion_and_its_gradient(grid, size, isotropic):
    reg, domains, spacing = regions_and_spacing(size, isotropic=isotropic)
    weights = reg.border_weights(domains)
    form = ControlDiffusion(grid, size, weights, spacing)
    for seed in range(2):
        c = torch.randn((2, len(grid), *grid), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        c.requires_grad_(True)
        want = reg(upsample(c, size), spacing=spacing, weights=weights)
        got = form(c)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (want_grad,) = torch.autograd.grad((want * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum(), c)
        (got_grad,) = torch.autograd.grad((got * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum(), c)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_control_diffusion_without_borders_and_in_float32():
    # every difference counts (weights of ones): a constant field costs 0, a ramp its slope squared
    grid, size = (6, 5, 4), (11, 10, 7)
    reg, _, spacing = regions_and_spacing(size, isotropic=True)
    ones = torch.ones((2, 1, *size), dtype=torch.float64)
    form = ControlDiffusion(grid, size, reg.border_weights(ones), spacing)
    const = torch.full((2, 3, *grid), 2.5, dtype=torch.float64)
    torch.testing.assert_close(form(const), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    weights32 = reg.border_weights(ones.float())
    form32 = ControlDiffusion(grid, size, weights32, spacing.float())
    c = torch.randn((2, 3, *grid), generator=torch.Generator().manual_seed(3))
    want = reg(upsample(c, size), spacing=spacing.float(), weights=weights32)
    assert form32(c).dtype == torch.float32
    torch.testing.assert_close(form32(c), want, rtol=1e-5, atol=1e-7)


def test_control_diffusion_gradcheck():
    grid, size = (4, 5, 3), (9, 11, 6)
    reg, domains, spacing = regions_and_spacing(size, seed=1)
    form = ControlDiffusion(grid, size, reg.border_weights(domains), spacing)
    c = torch.randn((2, 3, *grid), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: form(x), (c,))


def test_solver_lattice_on_the_control_grid_scores_the_upsampled_field():
    # the solver's control path (a displacement's control values read at the lattice, the diffusion on the control
    # grid) gives every term of the level-grid path on the same field, the regulariser included
    weights = {"sim": 10.0, "mask": 1.0, "reg": 5.0}
    reg = solver(weights, sample_stride=2, sample_min_points=1)
    batch = build_batch(reg, two_blob_pair(shape=EVEN))
    assert reg.lattice_stride(batch) == 2
    grid = reg.control_grid(batch.shape, [1.0, 1.5, 2.0])
    basis = ControlGrid(grid, batch.shape)
    assert not basis.fine_axes and list(grid) != list(batch.shape)
    param = basis.parameters_of(smooth_field(batch.shape, amplitude=1.0))
    u = basis.field(param)
    for _ in range(8):  # each call takes the next phase, the same in both batches' counters
        step = batch.cache.get("step", 0)
        level = reg.batch_losses(batch, u)
        batch.cache["step"] = step
        on_control = reg.batch_losses(batch, control=(basis, param))
        torch.testing.assert_close(on_control, level, rtol=1e-4, atol=1e-5)
    assert "control_reg" in batch.cache  # the control path ran


@pytest.mark.parametrize("on_control", [True, False])
def test_lattice_on_control_switch_takes_the_control_or_the_level_path(on_control, monkeypatch):
    # lattice_on_control False (the solver of bundle 0.3.13, for comparisons) upsamples to every voxel instead
    reg = solver({"sim": 10.0, "mask": 1.0, "reg": 5.0}, sample_stride=2, sample_min_points=1)
    monkeypatch.setattr(reg, "lattice_on_control", on_control)
    batch = build_batch(reg, two_blob_pair(shape=EVEN))
    calls = []
    original = reg.control_regulariser
    monkeypatch.setattr(reg, "control_regulariser", lambda *a: calls.append(1) or original(*a))
    init = torch.zeros((len(batch), 3, *batch.shape))
    reg.optimise_batch(batch, init, 3)
    assert len(calls) == (3 if on_control else 0)
