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
    for stride in (0, "two", (2, 3)):
        with pytest.raises(ValueError, match="sample_stride"):
            register(f, f, out_dir=str(tmp_path / "o"), sample_stride=stride, **FAST)
    for mode in ("iterative", "global"):  # a bundle named outside --mode bundle would be ignored: refused
        with pytest.raises(ValueError, match=r"--bundle applies to --mode bundle only"):
            register(f, f, out_dir=str(tmp_path / "o"), mode=mode, bundle="bundles/segreg_thorax", **FAST)
    with pytest.raises(ValueError, match=r"--variant, --ckpt_path apply to --mode bundle only"):
        register(f, f, out_dir=str(tmp_path / "o"), variant="segreg", ckpt_path="m.pt", **FAST)
    for flag, value in (("sample_stride", 2), ("levels", (2, 1)), ("noise_gate", "none"), ("reg_domain", "auto")):
        with pytest.raises(ValueError, match=f"--{flag} set the iterative modes"):  # the bundle's config decides
            register(f, f, out_dir=str(tmp_path / "b"), mode="bundle", bundle="segreg_thorax", **{flag: value})
    assert not (tmp_path / "b").exists()  # refused before any work
    blocked = tmp_path / "plain_file"
    blocked.write_text("x")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        register(f, f, out_dir=str(blocked / "o"), **FAST)
    with pytest.raises(ValueError, match="not a displacement field"):
        warp(f, f, str(tmp_path / "w.nii.gz"))


def test_thick_slice_cine_mr_registers_in_plane_by_default_and_beats_no_registration(tmp_path):
    """A synthetic cine-MR pair (1.8 x 1.8 x 10 mm, true motion in-plane) with only the label maps, no flags: the
    through-plane displacement stays 0 and the heart end-point error (mm, against the exact motion) is below no
    registration; ``--in_plane false`` registers the through-plane axis again."""
    from custom.synthetic.acdc import make_acdc

    root = make_acdc(str(tmp_path / "acdc"), n_subjects=1, shape=(64, 64, 16), seed=4) / "patient001"
    info = dict(line.split(": ") for line in (root / "Info.cfg").read_text().splitlines())
    ed, es = (f"patient001_frame{int(info[k]):02d}" for k in ("ED", "ES"))
    truth_img = nib.load(root / "patient001_disp_ES_ED.nii.gz")
    truth, spacing = truth_img.get_fdata(), np.array(truth_img.header.get_zooms()[:3])
    heart = nib.load(root / f"{es}_gt.nii.gz").get_fdata() > 0
    files = [str(root / f"{n}.nii.gz") for n in (es, ed)] + [str(root / f"{n}_gt.nii.gz") for n in (es, ed)]
    out = register(*files, out_dir=str(tmp_path / "auto"), save_warped=False, progress=False)
    u = nib.load(out["displacement"]).get_fdata()
    assert np.abs(u[..., 2]).max() == 0

    def epe(field):
        return float(np.linalg.norm((field - truth) * spacing, axis=-1)[heart].mean())

    none, ours = epe(np.zeros_like(truth)), epe(u)
    assert ours < 0.6 * none, (ours, none)
    free = register(*files, out_dir=str(tmp_path / "free"), save_warped=False, progress=False, in_plane="false")
    assert np.abs(nib.load(free["displacement"]).get_fdata()[..., 2]).max() > 0


def nifti(path, array, affine=RAS):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


@pytest.mark.parametrize(
    "case,message",
    [
        ("inf", r"f_bad\.nii\.gz contains 0 NaN and 3 infinite values"),
        ("nan", r"f_bad\.nii\.gz contains 5 NaN and 0 infinite values \(of 8064\)"),  # counted on the stored values
        ("2d", r"f_bad\.nii\.gz has shape \(28, 24\), i\.e\. 2 spatial dimensions"),
        ("4d", r"f_bad\.nii\.gz has shape \(28, 24, 12, 2\), i\.e\. 4 spatial dimensions"),
        ("spacing", r"f_bad\.nii\.gz has voxel spacing \[1800\.0, 2\.0, 2\.0\] mm"),
        ("label", r"fl_bad\.nii\.gz has \d+ non-integer values"),
    ],
)
def test_register_refuses_bad_input_naming_the_file_and_writes_nothing(tmp_path, case, message):
    img, lab = phantom()
    f, fl = nifti(tmp_path / "f.nii.gz", img), nifti(tmp_path / "fl.nii.gz", lab)
    bad = img.copy()
    affine = RAS
    if case == "inf":
        bad[0, 0, :3] = np.inf
    elif case == "nan":
        bad[1, 2, :5] = np.nan
    elif case == "2d":
        bad = bad[..., 0]
    elif case == "4d":
        bad = np.stack([bad, bad], -1)
    elif case == "spacing":
        affine = np.diag([1800.0, 2.0, 2.0, 1.0])
    kwargs = dict(fixed_label=fl, moving_label=fl, out_dir=str(tmp_path / "out"), **FAST)
    if case == "label":
        kwargs["fixed_label"] = nifti(tmp_path / "fl_bad.nii.gz", lab + 0.4 * (lab == 1))
        fixed = f
    else:
        fixed = nifti(tmp_path / "f_bad.nii.gz", bad, affine)
    with pytest.raises(ValueError, match=message):
        register(fixed, f, **kwargs)
    assert not list((tmp_path / "out").glob("*"))


def test_warp_validates_the_image_label_and_displacement_grid(tmp_path):
    """warp refuses a NaN image, a label map with 1.4-valued voxels, a NaN displacement and a displacement made for
    another grid; it never writes onto an input."""
    f, fl, m, ml = shifted_pair(tmp_path, RAS)
    out = register(f, m, fl, ml, out_dir=str(tmp_path / "o"), save_warped=False, **FAST)
    disp = out["displacement"]
    img, lab = phantom()
    moved = RAS.copy()
    moved[0, 3] = 9.0
    cases = {
        "nan": (nifti(tmp_path / "nan.nii.gz", np.where(img > 0.5, np.nan, img)), "image", r"nan\.nii\.gz contains"),
        "label": (nifti(tmp_path / "lab.nii.gz", lab * 1.4), "label", r"lab\.nii\.gz has \d+ non-integer values"),
        "grid": (
            nifti(tmp_path / "big.nii.gz", np.zeros((56, 48, 24), np.float32), np.eye(4)),
            "image",
            r"indexes the moving image it was made for, shape \[28, 24, 12\]",
        ),
        "shifted": (nifti(tmp_path / "moved.nii.gz", img, moved), "image", r"moved\.nii\.gz has shape \[28, 24, 12\]"),
    }
    for name, (src, kind, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            warp(src, disp, str(tmp_path / f"w_{name}.nii.gz"), kind=kind)
        assert not (tmp_path / f"w_{name}.nii.gz").exists()
    nan_disp = nib.load(disp)
    field = nan_disp.get_fdata().astype(np.float32)
    field[3, 3, 3, 0] = np.nan
    bad_disp = nifti(tmp_path / "nan_disp.nii.gz", field)
    with pytest.raises(ValueError, match=r"nan_disp\.nii\.gz contains 1 NaN"):
        warp(m, bad_disp, str(tmp_path / "w.nii.gz"))
    with pytest.raises(FileExistsError, match="inputs are never overwritten"):
        warp(m, disp, m, overwrite=True)
    # a Learn2Reg displacement without our grid record applies to images on its own grid only
    plain = nifti(tmp_path / "plain_disp.nii.gz", nib.load(disp).get_fdata().astype(np.float32))
    assert warp(m, plain, str(tmp_path / "ok.nii.gz")).is_file()
    with pytest.raises(ValueError, match=r"indexes its own grid"):
        warp(cases["grid"][0], plain, str(tmp_path / "no.nii.gz"))


def test_register_mode_bundle_checks_the_files_the_bundle_writes(tmp_path, capfd):
    """A second ``--mode bundle`` run into the same folder is refused (the bundle's writer names its files
    differently from the iterative mode); ``--save_warped false`` and ``--progress no`` reach the bundle."""
    from bundle_utils import REPO

    from custom.datasets.learn2reg import learn2reg_pairs
    from custom.synthetic.thorax import make_thorax

    root = make_thorax(str(tmp_path / "thorax"), n_subjects=1, shape=(24, 20, 16), n_keypoints=5, seed=0).parent
    p = learn2reg_pairs(root / "ThoraxCBCT_dataset.json", "registration_val", "segmentationsTr")[0]
    files = [p[k] for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")]
    kw = dict(mode="bundle", bundle=str(REPO / "bundles" / "segreg_thorax"), out_dir=str(tmp_path / "o"))
    capfd.readouterr()
    register(*files, save_warped="false", progress="no", **kw)
    assert "%|" not in capfd.readouterr().err  # no tqdm bar, the solver's or ignite's
    register(*files, save_warped="false", **{**kw, "out_dir": str(tmp_path / "bars")})
    assert "%|" in capfd.readouterr().err  # the default shows them
    written = sorted(q.relative_to(tmp_path / "o").as_posix() for q in (tmp_path / "o").rglob("*") if q.is_file())
    assert any(w.startswith("displacements/") for w in written) and not any(w.startswith("warped/") for w in written)
    before = {w: (tmp_path / "o" / w).read_bytes() for w in written}
    with pytest.raises(FileExistsError, match="--overwrite true"):
        register(*files, **kw)
    assert {w: (tmp_path / "o" / w).read_bytes() for w in written} == before
