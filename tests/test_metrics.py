import numpy as np
import torch
from conftest import requires_cuda
from scipy.ndimage import map_coordinates

from custom.handlers import JacobianMetric, TREMetric
from custom.metrics import dice_per_label, hd95_per_label, jacobian_determinant, jacobian_stats, tre_mm


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


def test_tre_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    ddf = rng.normal(0, 2, (3, 10, 9, 8)).astype(np.float32)
    fixed_pts = rng.uniform(1, 7, (20, 3))
    moving_pts = rng.uniform(1, 7, (20, 3))
    disp = np.stack([map_coordinates(ddf[c], fixed_pts.T, order=1) for c in range(3)], 1)
    ref = np.linalg.norm((fixed_pts + disp - moving_pts) * [1.5, 1.0, 2.0], axis=1)
    ours = tre_mm(torch.as_tensor(ddf)[None], fixed_pts, moving_pts, spacing=(1.5, 1.0, 2.0))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_metric_objects_aggregate_the_functions():
    A = np.diag([1.2, 1.0, 1.0])
    ddf = torch.cat([affine_ddf(A), affine_ddf(np.eye(3))])
    m = JacobianMetric("sdlogj")
    m(y_pred=ddf)
    assert float(m.aggregate()) < 1e-5
    t = TREMetric(spacing=(1, 1, 1))
    kp = torch.tensor([[[2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]]).repeat(2, 1, 1)
    t(y_pred=torch.zeros(2, 3, 6, 6, 6), y=kp)
    assert float(t.aggregate()) == 0.0


@requires_cuda
def test_metrics_cuda_match_cpu():
    u = torch.randn(1, 3, 12, 12, 12)
    torch.testing.assert_close(jacobian_determinant(u.cuda()).cpu(), jacobian_determinant(u), atol=1e-4, rtol=1e-4)
    pts = torch.rand(5, 3) * 10
    torch.testing.assert_close(tre_mm(u.cuda(), pts, pts).cpu(), tre_mm(u, pts, pts), atol=1e-4, rtol=1e-4)
