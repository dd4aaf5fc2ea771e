import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import requires_cuda
from monai.transforms import LoadImaged
from scipy.ndimage import map_coordinates

from custom.geometry import displacement_to_grid, labels_to_grid, tre_world, warp_volume
from custom.metrics import tre_mm
from custom.networks import VelocityToDisplacement
from custom.transforms import AlignPaird


def affine(diag, origin, perm=(0, 1, 2)):
    a = np.eye(4)
    a[:3, :3] = np.diag(diag)[:, list(perm)]
    a[:3, 3] = origin
    return a


def world_map(p):
    """An analytic physical motion, mm -> mm: a small rotation about z, a stretch and a shift."""
    c, s = np.cos(0.05), np.sin(0.05)
    m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.02]])
    return m @ p + np.array([[3.0], [-2.0], [1.5]])


def analytic_disp(grid_affine, shape, moving_affine):
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")).reshape(3, -1)
    world = grid_affine[:3, :3] @ idx + grid_affine[:3, 3:4]
    moved = np.linalg.inv(moving_affine) @ np.vstack([world_map(world), np.ones((1, idx.shape[1]))])
    return (moved[:3] - idx).reshape((3,) + tuple(shape))


def test_displacement_carried_from_a_resampled_reoriented_grid_matches_the_analytic_motion():
    # original fixed grid stored LPS with a permuted axis order; registration ran on a finer RAS grid that covers it
    fixed_orig = affine([-2.0, -2.0, 3.0], [80.0, 60.0, -10.0], perm=(1, 0, 2))
    shape_orig = (18, 20, 10)
    reg = affine([1.5, 1.5, 2.5], [30.0, 16.0, -16.0])
    shape_reg = (40, 36, 18)
    moving_orig = affine([2.5, 2.5, 2.0], [35.0, 20.0, -12.0])
    u_reg = torch.as_tensor(analytic_disp(reg, shape_reg, reg), dtype=torch.float32)  # registration-grid field
    ours = displacement_to_grid(u_reg, reg, fixed_orig, shape_orig, moving_orig).numpy()
    ref = analytic_disp(fixed_orig, shape_orig, moving_orig)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # the same grid and moving affine give the field back unchanged
    torch.testing.assert_close(displacement_to_grid(u_reg, reg, reg, shape_reg), u_reg)


def test_world_tre_is_learn2reg_tre_on_a_shared_grid_and_follows_the_affines_otherwise():
    rng = np.random.default_rng(0)
    ddf = torch.as_tensor(rng.normal(0, 1.5, (3, 12, 11, 9)), dtype=torch.float32)
    fp, mp = rng.uniform(1, 8, (15, 3)), rng.uniform(1, 8, (15, 3))
    a = affine([1.5, 1.0, 2.0], [5.0, -3.0, 7.0])
    ours = tre_world(ddf, a, fp, a, mp, a)
    torch.testing.assert_close(ours, tre_mm(ddf[None], fp, mp, (1.5, 1.0, 2.0)), atol=1e-4, rtol=1e-4)
    # an identity field on a grid whose moving file is shifted by 4 mm along x: TRE of coincident indices is 4 mm
    zero = torch.zeros(3, 12, 11, 9)
    shifted = affine([1.5, 1.0, 2.0], [9.0, -3.0, 7.0])
    torch.testing.assert_close(tre_world(zero, a, fp, a, fp, shifted), torch.full((15,), 4.0), atol=1e-4, rtol=0)


def test_warp_volume_matches_scipy_map_coordinates():
    rng = np.random.default_rng(1)
    vol = rng.random((10, 9, 8)).astype(np.float32)
    lab = rng.integers(0, 4, (10, 9, 8)).astype(np.float32)
    disp = rng.normal(0, 1.2, (3, 7, 6, 5)).astype(np.float32)
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in disp.shape[1:]], indexing="ij")
    coords = [np.clip(g[i] + disp[i], 0, vol.shape[i] - 1) for i in range(3)]
    ours = warp_volume(torch.as_tensor(vol), torch.as_tensor(disp)).numpy()
    np.testing.assert_allclose(ours, map_coordinates(vol, coords, order=1), atol=1e-5)
    ours_lab = warp_volume(torch.as_tensor(lab), torch.as_tensor(disp), "nearest").numpy()
    assert (ours_lab == map_coordinates(lab, coords, order=0)).mean() > 0.99  # ties at .5 may round differently
    # labels carried between grids through world space
    src = affine([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    dst = affine([-2.0, 2.0, 1.0], [9.0, 0.0, 0.0])
    back = labels_to_grid(torch.as_tensor(lab), src, dst, (5, 4, 8)).numpy()
    np.testing.assert_array_equal(back, lab[9 - 2 * np.arange(5)][:, 2 * np.arange(4)])


def save(tmp_path, name, array, aff):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), aff), path)
    return str(path)


def load_and_align(paths, **kw):
    keys = list(paths)
    data = LoadImaged(keys, ensure_channel_first=True, image_only=True)(paths)
    return AlignPaird(**kw)(data)


def test_an_lps_stored_copy_gives_the_same_arrays_as_its_ras_original(tmp_path):
    rng = np.random.default_rng(2)
    img, lab = rng.random((12, 10, 6)), rng.integers(0, 3, (12, 10, 6))
    ras = affine([2.0, 2.0, 5.0], [-11.0, -9.0, -12.5])
    # the same physical image stored LPS: x and y flipped, origin at the other corner
    lps = affine([-2.0, -2.0, 5.0], [11.0, 9.0, -12.5])
    a = load_and_align(
        {
            "fixed_image": save(tmp_path, "f.nii.gz", img, ras),
            "fixed_label": save(tmp_path, "fl.nii.gz", lab, ras),
            "moving_image": save(tmp_path, "m.nii.gz", img, ras),
        }
    )
    b = load_and_align(
        {
            "fixed_image": save(tmp_path, "f_lps.nii.gz", img[::-1, ::-1], lps),
            "fixed_label": save(tmp_path, "fl_lps.nii.gz", lab[::-1, ::-1], lps),
            "moving_image": save(tmp_path, "m_lps.nii.gz", img[::-1, ::-1], lps),
        }
    )
    for k in ("fixed_image", "fixed_label", "moving_image"):
        torch.testing.assert_close(a[k].as_tensor(), b[k].as_tensor())
        np.testing.assert_allclose(np.asarray(a[k].affine), np.asarray(b[k].affine), atol=1e-5)


def test_a_moving_image_with_a_shifted_origin_is_resampled_into_the_fixed_grid(tmp_path):
    img = np.zeros((16, 12, 8))
    img[4:9, 3:7, 2:6] = 1.0
    aff = affine([2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    moved = affine([2.0, 2.0, 2.0], [4.0, 0.0, 0.0])  # the moving file's origin is 4 mm (2 voxels) further along x
    paths = {
        "fixed_image": save(tmp_path, "f.nii.gz", img, aff),
        "moving_image": save(tmp_path, "m.nii.gz", img, moved),
    }
    with pytest.warns(UserWarning, match="resampled into the fixed grid"):
        d = load_and_align(paths)
    expected = np.zeros_like(img)
    expected[6:11, 3:7, 2:6] = 1.0  # the same object, 2 voxels further along x in the fixed grid
    np.testing.assert_allclose(d["moving_image"][0].numpy(), expected, atol=1e-5)
    # the moving file's own geometry and name stay in its metadata (the writer maps back to that file)
    np.testing.assert_allclose(np.asarray(d["moving_image"].meta["original_affine"]), moved)
    assert str(d["moving_image"].meta["filename_or_obj"]).endswith("m.nii.gz")
    far = {
        "fixed_image": paths["fixed_image"],
        "moving_image": save(tmp_path, "far.nii.gz", img, affine([2, 2, 2], [900, 0, 0])),
    }
    with pytest.raises(ValueError, match=r"f\.nii\.gz.*far\.nii\.gz.*do not share a physical space"):
        load_and_align(far)


def test_a_label_map_off_its_image_grid_is_refused_with_both_files_named(tmp_path):
    img = np.zeros((8, 8, 4))
    paths = {
        "fixed_image": save(tmp_path, "f.nii.gz", img, affine([1, 1, 1], [0, 0, 0])),
        "fixed_label": save(tmp_path, "fl.nii.gz", img, affine([1, 1, 1], [5, 0, 0])),
        "moving_image": save(tmp_path, "m.nii.gz", img, affine([1, 1, 1], [0, 0, 0])),
    }
    with pytest.raises(ValueError, match=r"fl\.nii\.gz.*not on the grid of its image.*f\.nii\.gz"):
        load_and_align(paths)


def test_frozen_components_stay_exactly_zero_through_integration():
    v = torch.randn(2, 3, 12, 10, 6)
    ddf = VelocityToDisplacement(7, frozen_components=(2,))(v)
    assert ddf[:, 2].abs().max() == 0 and ddf[:, :2].abs().max() > 0


@requires_cuda
def test_geometry_cuda_matches_cpu():
    fixed_orig = affine([-2.0, -2.0, 3.0], [80.0, 60.0, -10.0], perm=(1, 0, 2))
    reg = affine([1.5, 1.5, 2.5], [30.0, 16.0, -16.0])
    u = torch.randn(3, 40, 36, 18)
    cpu = displacement_to_grid(u, reg, fixed_orig, (18, 20, 10))
    gpu = displacement_to_grid(u.cuda(), reg, fixed_orig, (18, 20, 10)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    vol = torch.rand(10, 9, 8)
    d = torch.randn(3, 7, 6, 5)
    torch.testing.assert_close(warp_volume(vol.cuda(), d.cuda()).cpu(), warp_volume(vol, d), atol=1e-5, rtol=1e-5)
