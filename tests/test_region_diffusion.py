import pytest
import torch
from conftest import requires_cuda

from custom.losses import RegionDiffusionLoss
from custom.regions import labels_to_regions


def split_regions(shape=(10, 8, 6), border=4):
    label = torch.zeros((1, 1) + shape)
    label[:, :, border:] = 1
    return labels_to_regions(label, [0, 1])


def test_piecewise_constant_field_costs_nothing_within_regions():
    regions = split_regions()
    ddf = torch.zeros((1, 3, 10, 8, 6))
    ddf[:, 1, 4:] = 3.0  # sliding: jump of 3 voxels at the border x = 4
    ddf[:, 1, :4] = -3.0
    loss = RegionDiffusionLoss()
    assert loss(ddf, regions).item() == 0.0
    # global diffusion sees the jump: (6^2 / 3 components) on 1 of 9 x-pairs, mean over all pairs
    torch.testing.assert_close(loss(ddf), torch.tensor(36.0 / 3 / 9))


def test_linear_field_analytic_value():
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1, 1).expand(1, 3, 10, 8, 6)
    ddf = 0.5 * x  # every component grows 0.5 per voxel along x only
    regions = split_regions()
    torch.testing.assert_close(RegionDiffusionLoss()(ddf, regions), torch.tensor(0.25))
    torch.testing.assert_close(RegionDiffusionLoss()(ddf), torch.tensor(0.25))


def test_gradient_never_crosses_the_border():
    regions = split_regions()
    ddf = torch.randn((1, 3, 10, 8, 6), requires_grad=True)
    RegionDiffusionLoss()(ddf, regions).backward()
    # moving region 0 rigidly leaves the loss unchanged: its gradient sums to zero
    assert abs(ddf.grad[:, :, :4].sum().item()) < 1e-5


@requires_cuda
def test_region_diffusion_cuda():
    regions = split_regions()
    ddf = torch.randn((1, 3, 10, 8, 6))
    torch.testing.assert_close(
        RegionDiffusionLoss()(ddf.cuda(), regions.cuda()).cpu(), RegionDiffusionLoss()(ddf, regions)
    )


def test_reduction_none_gives_one_value_per_case():
    regions = torch.cat([split_regions(), split_regions(border=6)])
    ddf = torch.randn((2, 3, 10, 8, 6))
    per_case = RegionDiffusionLoss(reduction="none")(ddf, regions)
    assert per_case.shape == (2,)
    for b in range(2):
        torch.testing.assert_close(per_case[b], RegionDiffusionLoss()(ddf[b : b + 1], regions[b : b + 1]))
    torch.testing.assert_close(RegionDiffusionLoss(reduction="sum")(ddf, regions), per_case.sum())


def test_one_spacing_row_per_case_is_each_case_with_its_own_spacing():
    # a linear field u_c = 0.5 x (voxels) costs (0.5 s_c / s_x)^2 averaged over components: analytic per case
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1, 1).expand(2, 3, 10, 8, 6)
    ddf = 0.5 * x
    rows = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 4.0]])
    got = RegionDiffusionLoss(reduction="none")(ddf, None, rows)
    want = torch.stack([(0.5 * r / r[0]).pow(2).mean() for r in rows])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one row per case"):
        RegionDiffusionLoss()(ddf, None, torch.ones(3, 3))


def test_precomputed_border_weights_give_the_same_loss_and_gradient():
    # the iterative solver computes the border weights once per batch and reuses them at every step
    regions = torch.cat([split_regions(), split_regions(border=6)])
    ddf = torch.randn((2, 3, 10, 8, 6), requires_grad=True)
    spacing = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 1.0]])
    loss = RegionDiffusionLoss(reduction="none")
    direct = loss(ddf, regions, spacing)
    (g_direct,) = torch.autograd.grad(direct.sum(), ddf)
    reused = loss(ddf, spacing=spacing, weights=loss.border_weights(regions))
    (g_reused,) = torch.autograd.grad(reused.sum(), ddf)
    torch.testing.assert_close(reused, direct)
    torch.testing.assert_close(g_reused, g_direct)
    assert (direct != loss(ddf, None, spacing)).all()  # the weights matter: no border is crossed


def reference_diffusion(ddf, regions, spacing):
    """The regulariser as written in its docstring, differentiated by autograd (one row of spacing per case)."""
    dims = ddf.ndim - 2
    sp = spacing.view(ddf.shape[0], dims, *[1] * dims)
    u = ddf * sp if ddf.shape[1] == dims else ddf
    total = 0
    for k in range(dims):
        axis, n = 2 + k, ddf.shape[2 + k]
        if n < 2:  # an axis of one voxel has no difference
            continue
        diff = (u.narrow(axis, 1, n - 1) - u.narrow(axis, 0, n - 1)) / sp[:, k : k + 1]
        sq = diff.square().mean(1)
        if regions is None:
            total = total + sq.flatten(1).mean(1)
            continue
        w = (regions.narrow(axis, 1, n - 1) * regions.narrow(axis, 0, n - 1)).sum(1)
        total = total + (sq * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)
    return total


@pytest.mark.parametrize("shape, channels", [((7, 6, 5), 3), ((9, 8), 2), ((6, 1, 5), 3), ((7, 6), 1)])
@pytest.mark.parametrize("soft", [False, True])
def test_loss_and_gradient_match_autograd_through_the_written_expression(shape, channels, soft):
    # the loss writes its gradient out; autograd through the plain expression is the independent reference
    torch.manual_seed(0)
    dims = len(shape)
    ddf = torch.randn((2, channels) + shape, dtype=torch.float64, requires_grad=True)
    label = torch.randint(0, 3, (2, 1) + shape)
    regions = labels_to_regions(label, [0, 1, 2]).double()
    if soft:
        regions = regions * torch.rand_like(regions)
    spacing = torch.tensor([[1.0, 2.0, 3.0][:dims], [0.5, 1.5, 1.0][:dims]], dtype=torch.float64)
    for reg in (regions, None):
        got = RegionDiffusionLoss(reduction="none")(ddf, reg, spacing)
        want = reference_diffusion(ddf, reg, spacing)
        torch.testing.assert_close(got, want)
        weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
        (g_got,) = torch.autograd.grad((got * weights).sum(), ddf)
        (g_want,) = torch.autograd.grad((want * weights).sum(), ddf)
        torch.testing.assert_close(g_got, g_want)
    check = ddf.detach()[:1, :, :4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda u: RegionDiffusionLoss()(u, regions[:1, :, :4], spacing[:1]), (check,))


def test_backward_frees_the_saved_differences_unless_the_graph_is_retained():
    ddf = torch.randn((1, 3, 5, 4, 3), requires_grad=True)
    loss = RegionDiffusionLoss()(ddf, split_regions((5, 4, 3), border=2))
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):  # autograd's own error: the buffers were freed
        loss.backward()


def test_autocast_does_not_take_the_whole_grid_sums_to_half_precision():
    # under AMP the network's field may arrive in bfloat16 / float16; the loss sums over the grid in float32
    torch.manual_seed(0)
    ddf = torch.randn((2, 3, 12, 10, 9))
    regions = labels_to_regions(torch.randint(0, 2, (2, 1, 12, 10, 9)), [0, 1])
    want = RegionDiffusionLoss(reduction="none")(ddf, regions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = RegionDiffusionLoss(reduction="none")(ddf, regions)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    half = ddf.to(torch.bfloat16).requires_grad_()
    loss = RegionDiffusionLoss()(half, regions)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()
    torch.testing.assert_close(loss, RegionDiffusionLoss()(half.detach().float(), regions))


def test_one_set_of_border_weights_serves_a_batch_and_double_backward_is_refused():
    ddf = torch.randn((3, 3, 6, 5, 4), requires_grad=True)
    regions = split_regions((6, 5, 4), border=3)
    loss = RegionDiffusionLoss(reduction="none")
    shared = loss(ddf, spacing=[1.0, 2.0, 1.5], weights=loss.border_weights(regions))
    torch.testing.assert_close(shared, loss(ddf, regions.expand(3, -1, -1, -1, -1), [1.0, 2.0, 1.5]))
    (grad,) = torch.autograd.grad(shared.sum(), ddf, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
