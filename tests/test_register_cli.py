import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from custom.register import register, warp

FAST = {"levels": (2, 1), "iterations": (40, 30), "progress": False}


def phantom(shape=(28, 24, 12), seed=0):
    """A textured body with two boxes (labels 1, 2)."""
    rng = np.random.default_rng(seed)
    tex = gaussian_filter(rng.standard_normal(shape), 1.5)
    tex = (tex - tex.min()) / (tex.max() - tex.min())
    lab = np.zeros(shape, np.int16)
    lab[6:14, 6:16, 3:9] = 1
    lab[15:22, 5:17, 3:9] = 2
    img = 0.3 * tex + 0.3 * (lab == 1) + 0.6 * (lab == 2)
    return img.astype(np.float32), lab


def write(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def shifted_pair(tmp_path, affine, flip=False):
    """Fixed = phantom; moving = phantom moved by +2 voxels along x (label 2 only, so the two boxes slide)."""
    img, lab = phantom()
    mov_img, mov_lab = img.copy(), lab.copy()
    box = lab == 2
    mov_img[box] = 0.3
    mov_lab[box] = 0
    mov_img[np.roll(box, 2, axis=0)] = img[box]
    mov_lab[np.roll(box, 2, axis=0)] = 2
    arrays = [img, lab, mov_img, mov_lab]
    if flip:  # the same physical images stored LPS
        arrays = [a[::-1, ::-1] for a in arrays]
    names = ["f.nii.gz", "fl.nii.gz", "m.nii.gz", "ml.nii.gz"]
    return [write(tmp_path / n, a, affine) for n, a in zip(names, arrays)]


RAS = np.diag([2.0, 2.0, 2.0, 1.0])
LPS = np.diag([-2.0, -2.0, 2.0, 1.0])
LPS[:3, 3] = [54.0, 46.0, 0.0]  # (28 - 1) * 2 and (24 - 1) * 2: the flipped grid covers the same world box


def test_register_recovers_a_sliding_box_and_warp_matches_scipy(tmp_path):
    f, fl, m, ml = shifted_pair(tmp_path, RAS)
    out = register(f, m, fl, ml, out_dir=str(tmp_path / "out"), **FAST)
    disp = nib.load(out["displacement"])
    assert np.allclose(disp.affine, RAS) and disp.shape == (28, 24, 12, 3)
    u = disp.get_fdata()
    lab = nib.load(fl).get_fdata()
    inner = (lab == 2) & (np.abs(np.gradient(lab)[0]) == 0)
    assert abs(u[..., 0][inner].mean() - 2.0) < 0.5 and np.abs(u[..., 0][lab == 1]).mean() < 0.5
    # warp: scipy map_coordinates on the saved field reproduces the written warped image and label
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in u.shape[:3]], indexing="ij")
    coords = [np.clip(g[i] + u[..., i], 0, u.shape[i] - 1) for i in range(3)]
    np.testing.assert_allclose(
        nib.load(out["warped_image"]).get_fdata(), map_coordinates(nib.load(m).get_fdata(), coords, order=1), atol=1e-4
    )
    warped_lab = nib.load(out["warped_label"]).get_fdata()
    assert (warped_lab == map_coordinates(nib.load(ml).get_fdata(), coords, order=0)).mean() > 0.99
    # points: fixed keypoints moved to their moving voxel coordinates
    pts = np.array([[18.0, 10.0, 6.0], [9.0, 10.0, 5.0]])
    np.savetxt(tmp_path / "kp.csv", pts, delimiter=",")
    moved = np.loadtxt(
        warp(str(tmp_path / "kp.csv"), out["displacement"], str(tmp_path / "kp_m.csv"), kind="points"), delimiter=","
    )
    ref = np.stack([map_coordinates(u[..., i], pts.T, order=1) for i in range(3)], 1) + pts
    np.testing.assert_allclose(moved, ref, atol=1e-3)
    with pytest.raises(FileExistsError, match="overwrite"):
        register(f, m, fl, ml, out_dir=str(tmp_path / "out"), **FAST)


def test_an_lps_stored_copy_registers_identically(tmp_path):
    (tmp_path / "ras").mkdir()
    (tmp_path / "lps").mkdir()
    f, fl, m, ml = shifted_pair(tmp_path / "ras", RAS)
    ras = register(f, m, fl, ml, out_dir=str(tmp_path / "ras" / "o"), save_warped=False, **FAST)
    f, fl, m, ml = shifted_pair(tmp_path / "lps", LPS, flip=True)
    lps = register(f, m, fl, ml, out_dir=str(tmp_path / "lps" / "o"), save_warped=False, **FAST)
    a, b = nib.load(ras["displacement"]), nib.load(lps["displacement"])
    assert np.allclose(b.affine, LPS)
    # the LPS file's voxel axes x and y run the other way: flip the array and negate those components
    expected = a.get_fdata()[::-1, ::-1] * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(b.get_fdata(), expected, atol=1e-3)


def test_a_moving_file_with_a_shifted_origin_is_registered_in_world_space(tmp_path):
    img, lab = phantom()
    f, fl = write(tmp_path / "f.nii.gz", img, RAS), write(tmp_path / "fl.nii.gz", lab, RAS)
    moved = RAS.copy()
    moved[0, 3] = 4.0  # the same array 4 mm further along x: physically shifted
    m, ml = write(tmp_path / "m.nii.gz", img, moved), write(tmp_path / "ml.nii.gz", lab, moved)
    with pytest.warns(UserWarning, match="resampled into the fixed grid"):
        out = register(f, m, fl, ml, out_dir=str(tmp_path / "o"), save_warped=False, **FAST)
    u = nib.load(out["displacement"]).get_fdata()
    # voxel i of the fixed file holds what voxel i of the moving file holds: in the Learn2Reg form the answer is 0
    inner = (slice(4, -4), slice(4, -4), slice(2, -2))
    assert np.abs(u[inner]).mean() < 0.3


def test_bad_inputs_name_the_file_or_option(tmp_path):
    img, lab = phantom()
    f = write(tmp_path / "f.nii.gz", img, RAS)
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        register(f, str(tmp_path / "nothere.nii.gz"), out_dir=str(tmp_path / "o"), **FAST)
    with pytest.raises(ValueError, match="both --fixed_label and --moving_label"):
        register(f, f, fixed_label=f, out_dir=str(tmp_path / "o"), **FAST)
    with pytest.raises(ValueError, match="thick-slice"):
        register(f, f, out_dir=str(tmp_path / "o"), in_plane=True, **FAST)
    with pytest.raises(ValueError, match="levels"):
        register(f, f, out_dir=str(tmp_path / "o"), levels="abc", iterations=(1,), progress=False)
    blocked = tmp_path / "plain_file"
    blocked.write_text("x")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        register(f, f, out_dir=str(blocked / "o"), **FAST)
    with pytest.raises(ValueError, match="not a displacement field"):
        warp(f, f, str(tmp_path / "w.nii.gz"))
