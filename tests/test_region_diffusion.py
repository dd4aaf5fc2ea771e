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
