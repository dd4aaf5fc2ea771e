"""World-space transforms and inverse fields, checked with the real toolkits (SimpleITK, ANTs) where installed
(``pip install -e ".[itk]"``; ``.ci/run`` installs them) and against analytic fields everywhere.

Every pair has a known world-space motion ``T`` (a rotation plus a smooth wave, a few mm), a fixed grid and a moving
grid: RAS, LPS-stored, oblique (rotated direction cosines) and anisotropic with the moving image on another grid.
"""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import requires_cuda
from scipy.ndimage import gaussian_filter, map_coordinates

from custom.interop import LPS, convert, invert, read_field
from custom.inverse import inverse_report, invert_displacement
from custom.io import grid_record, save_displacement
from custom.register import register, warp


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def affine(spacing, origin, rot=np.eye(3)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = rot @ np.diag(spacing), origin
    return a


GEOMETRIES = {  # name: (fixed affine, fixed shape, moving affine, moving shape)
    "ras": (affine((2, 2, 3), (-30, -25, -20)), (30, 26, 14), affine((2, 2, 3), (-30, -25, -20)), (30, 26, 14)),
    "lps": (affine((-2, -2, 3), (28, 25, -20)), (30, 26, 14), affine((-2, -2, 3), (28, 25, -20)), (30, 26, 14)),
    "oblique": (
        affine((2, 2, 3), (-28, -30, -18), rotation(15, 10)),
        (30, 26, 14),
        affine((2, 2, 3), (-28, -30, -18), rotation(15, 10)),
        (30, 26, 14),
    ),
    "anisotropic": (
        affine((1.5, 1.5, 4), (-27, -24, -22)),
        (36, 32, 11),
        affine((2.5, 2, 3), (-32, -28, -24)),
        (26, 30, 16),
    ),
}


def motion(p: np.ndarray) -> np.ndarray:
    """The true world map ``T`` (RAS mm, ``(N, 3)`` -> ``(N, 3)``): a 4 degree rotation about (0, 0, 0) and a wave."""
    r = rotation(4, 0)
    wave = np.stack([2.0 * np.sin(p[:, 1] / 12), 1.5 * np.cos(p[:, 0] / 15), 1.0 * np.sin(p[:, 0] / 10)], 1)
    return p @ r.T + wave


def grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def make_pair(tmp_path, name: str):
    """Files of one geometry: fixed image, moving image (smooth texture), Learn2Reg displacement of ``T``."""
    fa, fs, ma, ms = GEOMETRIES[name]
    idx = grid(fs).reshape(-1, 3)
    target = motion(idx @ fa[:3, :3].T + fa[:3, 3])  # world points in the moving image
    u = ((target - ma[:3, 3]) @ np.linalg.inv(ma[:3, :3]).T - idx).reshape(tuple(fs) + (3,))
    rng = np.random.default_rng(0)
    tex = gaussian_filter(rng.standard_normal(ms), 2.0)
    fixed, moving = tmp_path / f"{name}_fixed.nii.gz", tmp_path / f"{name}_moving.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(fs, np.float32), fa), fixed)
    nib.save(nib.Nifti1Image(tex.astype(np.float32), ma), moving)
    disp = save_displacement(np.moveaxis(u, -1, 0), tmp_path / f"{name}_disp.nii.gz", fa, ma, ms)
    return str(fixed), str(moving), str(disp), u


def interior(u: np.ndarray, moving_shape, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose image lies at least ``margin`` voxels inside the moving grid (no border conventions)."""
    y = grid(u.shape[:3]) + u
    return np.all((y >= margin) & (y <= np.array(moving_shape) - 1 - margin), -1)


def sitk_array(img) -> np.ndarray:
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_the_world_field_is_the_true_motion_and_converts_back(tmp_path, name):
    """No toolkit needed: the ITK form equals ``L (T(p) - p)`` and ``--to learn2reg`` gives the file back."""
    fixed, moving, disp, u = make_pair(tmp_path, name)
    out = convert(disp, str(tmp_path / "itk.nii.gz"), fixed=fixed)
    form, d, aff, _ = read_field(out)
    fa, fs, _, _ = GEOMETRIES[name]
    p = grid(fs).reshape(-1, 3) @ fa[:3, :3].T + fa[:3, 3]
    assert form == "world" and np.allclose(aff, fa, atol=1e-5)
    np.testing.assert_allclose(d.reshape(-1, 3), (motion(p) - p) @ LPS.T, atol=1e-4)
    back = convert(out, str(tmp_path / "l2r.nii.gz"), moving=moving, to="learn2reg")
    np.testing.assert_allclose(nib.load(back).get_fdata(), u, atol=1e-3)
    assert grid_record(back)["shape"] == list(GEOMETRIES[name][3])


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".h5"])
def test_simpleitk_resamples_like_warp_and_maps_points_like_the_project(tmp_path, name, ext):
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving, disp, u = make_pair(tmp_path, name)
    out = convert(disp, str(tmp_path / f"t{ext}"), fixed=fixed, moving=moving, to="itk")
    if ext == ".h5":
        tx = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(out)))
    else:
        tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out)), sitk.sitkVectorFloat64))
    ref = sitk_array(sitk.Resample(sitk.ReadImage(moving), sitk.ReadImage(fixed), tx, sitk.sitkLinear, 0.0))
    ours = nib.load(warp(moving, disp, str(tmp_path / "w.nii.gz"))).get_fdata()
    inside = interior(u, GEOMETRIES[name][3])
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ref[inside], ours[inside], atol=1e-4 * np.ptp(ours))
    fa, fs, ma, _ = GEOMETRIES[name]
    for x in ([10, 12, 6], [20, 7, 9], [5, 20, 3]):
        p = LPS @ (fa[:3, :3] @ x + fa[:3, 3])
        q = LPS @ (ma[:3, :3] @ (np.array(x) + u[tuple(x)]) + ma[:3, 3])
        np.testing.assert_allclose(tx.TransformPoint(p.tolist()), q, atol=1e-4)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_ants_applies_the_warp_like_warp(tmp_path, name):
    ants = pytest.importorskip("ants")
    fixed, moving, disp, u = make_pair(tmp_path, name)
    out = convert(disp, str(tmp_path / "warp.nii.gz"), fixed=fixed, to="ants")
    ref = ants.apply_transforms(ants.image_read(fixed), ants.image_read(moving), [str(out)], interpolator="linear")
    ours = nib.load(warp(moving, disp, str(tmp_path / "w.nii.gz"))).get_fdata()
    inside = interior(u, GEOMETRIES[name][3])
    np.testing.assert_allclose(ref.numpy()[inside], ours[inside], atol=1e-3 * np.ptp(ours))


def analytic_pair(tmp_path):
    """Rotation (8 degrees) plus stretch (1.1, 0.95, 1.05) about the centre of a 2 x 2 x 3 mm grid: known inverse."""
    fa, fs = affine((2, 2, 3), (-40, -36, -30)), (40, 36, 20)
    idx = grid(fs).reshape(-1, 3)
    world = idx @ fa[:3, :3].T + fa[:3, 3]
    centre = world.mean(0)
    m = rotation(8, 0) @ np.diag([1.1, 0.95, 1.05])
    forward = (world - centre) @ m.T + centre
    backward = (world - centre) @ np.linalg.inv(m).T + centre
    to_vox = np.linalg.inv(fa[:3, :3])
    u = ((forward - fa[:3, 3]) @ to_vox.T - idx).reshape(fs + (3,))
    v = ((backward - fa[:3, 3]) @ to_vox.T - idx).reshape(fs + (3,))
    return fa, fs, u, v


def test_the_inverse_of_an_analytic_field_is_exact_and_consistent(tmp_path):
    fa, fs, u, v = analytic_pair(tmp_path)
    inv, report = invert_displacement(torch.as_tensor(np.moveaxis(u, -1, 0), dtype=torch.float32), fa, fa, fs)
    inv = np.moveaxis(inv.numpy(), 0, -1)
    has_preimage = interior(v, fs, margin=0)
    assert np.abs(inv - v)[has_preimage].max() < 1e-3  # voxels
    # u(x) + u_inv(x + u(x)) ~ 0 where det J > 0 (everywhere here) and x + u(x) lies inside the grid
    y = grid(fs) + u
    inside = interior(u, fs, margin=0)
    back = np.stack([map_coordinates(inv[..., i], y[inside].T, order=1) for i in range(3)], 1)
    assert np.abs(u[inside] + back).max() < 0.1
    assert report["ic_p95_mm"] < 0.01 and report["folded_percent"] == 0


@requires_cuda
def test_the_inverse_on_cuda_equals_the_cpu_one(tmp_path):
    fa, fs, u, _ = analytic_pair(tmp_path)
    t = torch.as_tensor(np.moveaxis(u, -1, 0), dtype=torch.float32)
    cpu, rep_cpu = invert_displacement(t, fa, fa, fs)
    gpu, rep_gpu = invert_displacement(t.cuda(), fa, fa, fs)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    assert abs(rep_gpu["ic_p95_mm"] - rep_cpu["ic_p95_mm"]) < 1e-3


@pytest.mark.parametrize("name", ["ras", "anisotropic"])
def test_invert_command_against_simpleitk_invert_displacement_field(tmp_path, name):
    sitk = pytest.importorskip("SimpleITK")
    fixed, moving, disp, u = make_pair(tmp_path, name)
    report = invert(disp, str(tmp_path / "inv.nii.gz"), fixed=fixed)
    assert report["ic_p95_mm"] < 0.05
    ours = convert(str(tmp_path / "inv.nii.gz"), str(tmp_path / "inv_itk.nii.gz"), to="itk")
    if name != "ras":  # SimpleITK's inverse lives on the field's (fixed) grid: compare the point maps
        fwd = sitk.Cast(
            sitk.ReadImage(str(convert(disp, str(tmp_path / "f.nii.gz"), to="itk"))), sitk.sitkVectorFloat64
        )
        ref = sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(fwd, maximumNumberOfIterations=50))
        mine = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(ours)), sitk.sitkVectorFloat64))
        fa, fs, ma, ms = GEOMETRIES[name]
        for x in ([12, 12, 5], [20, 16, 7], [16, 10, 8]):
            q = LPS @ (ma[:3, :3] @ np.array(x, float) + ma[:3, 3])
            np.testing.assert_allclose(mine.TransformPoint(q.tolist()), ref.TransformPoint(q.tolist()), atol=0.05)
        return
    fwd = sitk.Cast(sitk.ReadImage(str(convert(disp, str(tmp_path / "f.nii.gz"), to="itk"))), sitk.sitkVectorFloat64)
    ref = np.transpose(
        sitk.GetArrayFromImage(sitk.InvertDisplacementField(fwd, maximumNumberOfIterations=50)), (2, 1, 0, 3)
    )
    mine = read_field(str(ours))[1]
    core = (slice(3, -3), slice(3, -3), slice(2, -2))
    assert np.abs(mine[core] - ref[core]).max() < 0.05  # mm


def test_moving_keypoints_go_to_the_fixed_keypoints_through_the_inverse(tmp_path):
    fixed, moving, disp, u = make_pair(tmp_path, "oblique")
    fixed_pts = np.array([[10.0, 12.0, 6.0], [20.0, 7.5, 9.0], [6.5, 18.0, 4.0], [15.0, 15.0, 7.0]])
    moving_pts = fixed_pts + np.stack([map_coordinates(u[..., i], fixed_pts.T, order=1) for i in range(3)], 1)
    np.savetxt(tmp_path / "moving_kp.csv", moving_pts, delimiter=",")
    out = warp(str(tmp_path / "moving_kp.csv"), disp, str(tmp_path / "to_fixed.csv"), kind="points",
               direction="moving_to_fixed")  # fmt: skip
    report = invert(disp, str(tmp_path / "inv.nii.gz"))
    err_mm = np.linalg.norm((np.loadtxt(out, delimiter=",") - fixed_pts) @ GEOMETRIES["oblique"][0][:3, :3].T, axis=1)
    assert err_mm.max() < max(0.05, report["ic_p95_mm"])


def test_sliding_thorax_inverse_is_accurate_inside_regions_and_reports_the_rest(tmp_path):
    from custom.evaluation import border_band
    from custom.synthetic.thorax import make_thorax

    root = make_thorax(str(tmp_path / "thorax"), n_subjects=1, shape=(40, 32, 32), n_keypoints=5, seed=1).parent
    truth = sorted((root / "gtdisp").glob("*.nii.gz"))[0]
    img = nib.load(truth)
    u = torch.as_tensor(np.moveaxis(img.get_fdata(), -1, 0), dtype=torch.float32)
    inv, report = invert_displacement(u, img.affine, img.affine, u.shape[1:])
    fixed_id = truth.name.split("_")[1:3]
    label = nib.load(root / "segmentationsTr" / f"ThoraxCBCT_{fixed_id[0]}_{fixed_id[1]}.nii.gz").get_fdata()
    core = ~border_band(label.astype(int), width=2)
    per_voxel = inverse_report(u, inv, img.affine, img.affine)  # the whole image, borders included
    assert set(report) >= {"ic_mean_mm", "ic_p95_mm", "folded_percent", "outside_percent", "unresolved_percent"}
    # away from the sliding borders the round trip is exact to a small fraction of a voxel
    idx = grid(u.shape[1:])
    y = idx + np.moveaxis(u.numpy(), 0, -1)
    ok = core & interior(np.moveaxis(u.numpy(), 0, -1), u.shape[1:], margin=0)
    back = np.stack([map_coordinates(inv.numpy()[i], y[ok].T, order=1) for i in range(3)], 1)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    err = np.linalg.norm((y[ok] + back - idx[ok]) * spacing, axis=1)
    assert np.median(err) < 0.05 and np.percentile(err, 95) < 0.5 * spacing.min(), np.percentile(err, [50, 95])
    assert per_voxel["ic_p95_mm"] >= np.percentile(err, 50)


def test_register_on_an_oblique_lps_pair_gives_a_file_simpleitk_applies_like_warp(tmp_path):
    """``register --transform itk --inverse true`` on an oblique, LPS-stored pair with the moving image on another
    grid: SimpleITK's resampling with the written transform equals ``python -m custom warp``."""
    from test_register_cli import phantom

    img, lab = phantom()
    rot = rotation(20, -8)
    fa = affine((-2, -2, 2.5), (30, 20, -10), rot)  # LPS-stored (negative x/y columns) and oblique
    ma = affine((-2.2, -2.1, 2.4), (31, 21, -9), rot)
    paths = {}
    for name, arr, aff in (
        ("f", img, fa),
        ("fl", lab, fa),
        ("m", np.roll(img, 2, 0), ma),
        ("ml", np.roll(lab, 2, 0), ma),
    ):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, aff), paths[name])
    with pytest.warns(UserWarning, match="resampled into the fixed grid"):
        out = register(paths["f"], paths["m"], paths["fl"], paths["ml"], out_dir=str(tmp_path / "o"), levels=(2, 1),
                       iterations=(10, 5), progress=False, transform="itk", inverse=True)  # fmt: skip
    assert {"displacement", "warped_image", "transform", "inverse", "inverse_transform"} <= set(out)
    sitk = pytest.importorskip("SimpleITK")
    tx = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(out["transform"]), sitk.sitkVectorFloat64))
    ref = sitk_array(sitk.Resample(sitk.ReadImage(paths["m"]), sitk.ReadImage(paths["f"]), tx, sitk.sitkLinear, 0.0))
    ours = nib.load(out["warped_image"]).get_fdata()
    u = nib.load(out["displacement"]).get_fdata()
    inside = interior(u, img.shape)
    np.testing.assert_allclose(ref[inside], ours[inside], atol=1e-4 * np.ptp(ours))
