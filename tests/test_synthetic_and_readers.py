import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from custom.datasets.acdc import acdc_pairs, split_patients
from custom.datasets.learn2reg import learn2reg_pairs, read_keypoints
from custom.io import learn2reg_disp_name, load_nifti, save_nifti, spacing_affine
from custom.metrics import dice_per_label
from custom.synthetic.abdomen import make_abdomen
from custom.synthetic.acdc import make_acdc
from custom.synthetic.thorax import make_thorax


def nii(path):
    return torch.as_tensor(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))


def warp_label(moving, disp):
    """Moving label warped (MONAI Warp, nearest) with a Learn2Reg (X, Y, Z, 3) displacement."""
    return Warp("nearest", "border")(moving[None, None], disp.permute(3, 0, 1, 2)[None])[0, 0]


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_acdc(str(tmp_path_factory.mktemp("acdc")), n_subjects=3, shape=(64, 64, 8))


def test_acdc_layout_headers_and_exact_ground_truth(acdc):
    recs = acdc_pairs(acdc, directions=("ES_ED",))
    assert len(recs) == 3 and (acdc / "patient001" / "Info.cfg").exists()
    zooms = nib.load(recs[0]["fixed_image"]).header.get_zooms()
    np.testing.assert_allclose(zooms, (1.8, 1.8, 10.0))
    for r in recs:
        fl, ml = nii(r["fixed_label"]), nii(r["moving_label"])
        disp = nii(acdc / r["patient"] / f"{r['patient']}_disp_ES_ED.nii.gz")
        assert set(np.unique(fl.numpy())) == {0, 1, 2, 3}
        before = dice_per_label(ml[None], fl[None], [1, 2, 3])
        after = dice_per_label(warp_label(ml, disp)[None], fl[None], [1, 2, 3])
        assert before.min() < 95 and after.min() > 99, (before, after)  # GT field explains the motion


def test_acdc_variety_spreads_appearance_and_anatomy_across_subjects(tmp_path):
    """variety=1 (the default) spreads tissue intensity, heart size and frame-to-frame gain across subjects well
    beyond the narrow set (variety=0); the stored motion still explains the ES frame exactly."""

    def spread(variety):
        root = make_acdc(str(tmp_path / str(variety)), n_subjects=6, shape=(64, 64, 8), seed=5, variety=variety)
        lv_mean, lv_size, gain = [], [], []
        for r in acdc_pairs(root, directions=("ES_ED",)):
            fl, fi = nii(r["fixed_label"]).numpy(), nii(r["fixed_image"]).numpy()
            ml, mi = nii(r["moving_label"]).numpy(), nii(r["moving_image"]).numpy()
            lv_mean.append(mi[ml == 3].mean())
            lv_size.append((ml == 3).sum())
            gain.append(fi[fl == 3].mean() / mi[ml == 3].mean())
        return np.std(lv_mean), np.std(lv_size) / np.mean(lv_size), np.std(gain)

    narrow, varied = spread(0.0), spread(1.0)
    assert all(v > 1.5 * n for v, n in zip(varied, narrow)), (narrow, varied)


def test_acdc_reader_directions_split_and_predicted_labels(acdc, tmp_path):
    recs = acdc_pairs(acdc)
    assert {r["direction"] for r in recs} == {"ES_ED", "ED_ES"}
    train, val, test = split_patients(recs, (0.34, 0.33))
    assert {r["patient"] for r in train}.isdisjoint({r["patient"] for r in val} | {r["patient"] for r in test})
    pred = tmp_path / "pred"
    with pytest.raises(ValueError, match="missing"):
        acdc_pairs(acdc, label_dir=pred)
    (acdc / "patient001" / "Info.cfg").rename(acdc / "patient001" / "Info.bak")
    try:
        with pytest.raises(ValueError, match="Info.cfg"):
            acdc_pairs(acdc)
    finally:
        (acdc / "patient001" / "Info.bak").rename(acdc / "patient001" / "Info.cfg")


def test_abdomen_json_layout_and_inter_subject_variation(tmp_path):
    js = make_abdomen(str(tmp_path), n_subjects=4, shape=(40, 36, 48))
    spec = json.loads(js.read_text())
    assert len(spec["labels"]) == 14 and spec["numTraining"] == 4
    recs = learn2reg_pairs(js, split="training_all")
    assert len(recs) == 12 and "fixed_label" in recs[0]
    val = learn2reg_pairs(js)
    assert len(val) == spec["numRegistration_val"] > 0
    a, b = nii(recs[0]["fixed_label"]), nii(recs[0]["moving_label"])
    d = dice_per_label(b[None], a[None], list(range(1, 14)))
    assert torch.nanmean(d) < 90  # subjects differ
    assert (tmp_path / "masksTr" / "AbdomenCTCT_0001_0000.nii.gz").exists()


def test_thorax_layout_keypoints_and_ground_truth(tmp_path):
    js = make_thorax(str(tmp_path), n_subjects=2, shape=(48, 40, 40), n_keypoints=30)
    recs = learn2reg_pairs(js, split="registration_val", label_dir="segmentationsTr")
    assert len(recs) == 2 and recs[0]["moving_image"].endswith("_0000.nii.gz")
    r = recs[0]
    fk, mk = read_keypoints(r["fixed_keypoints"]), read_keypoints(r["moving_keypoints"])
    assert fk.shape == mk.shape == (30, 3)
    # the JSON names keypoints .nii.gz; the reader finds the .csv of the same stem
    entry = json.loads(js.read_text())["training"][0]
    assert read_keypoints(tmp_path / entry["keypoints01"]).shape[1] == 3
    fixed, moving = nii(r["fixed_image"]), nii(r["moving_image"])
    assert (fixed == -1000).float().mean() > (moving == -1000).float().mean()  # smaller CBCT field of view
    name = learn2reg_disp_name(r["fixed_image"], r["moving_image"])
    assert name == "disp_0001_0001_0001_0000.nii.gz" or name == "disp_0001_0002_0001_0000.nii.gz"
    disp = nii(tmp_path / "gtdisp" / name)
    fl, ml = nii(r["fixed_label"]), nii(r["moving_label"])
    ids = [int(v) for v in np.unique(fl.numpy()) if v]
    before = torch.nanmean(dice_per_label(ml[None], fl[None], ids))
    after = torch.nanmean(dice_per_label(warp_label(ml, disp)[None], fl[None], ids))
    assert after > 99 and before < after


def test_learn2reg_names_and_bad_files(tmp_path):
    assert (
        learn2reg_disp_name("imagesTr/AbdomenCTCT_0001_0000.nii.gz", "AbdomenCTCT_0002_0000.nii.gz")
        == "disp_0001_0002.nii.gz"
    )
    with pytest.raises(ValueError, match="not a Learn2Reg"):
        learn2reg_disp_name("a.nii.gz", "b.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_nifti(bad)
    with pytest.raises(ValueError, match="cannot read Learn2Reg dataset JSON"):
        learn2reg_pairs(tmp_path / "missing.json")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.nii.gz"
    with pytest.raises(Exception):
        save_nifti(np.zeros((2, 2, 2), dtype=object), target, spacing_affine((1, 1, 1)))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_abdomen_pair_truth_composes_the_subject_fields():
    from custom.synthetic.abdomen import pair_truth

    shape = (12, 10, 8)
    u_fixed = np.zeros((3,) + shape, np.float32)
    u_moving = np.zeros((3,) + shape, np.float32)
    u_fixed[0], u_moving[0], u_moving[1] = 1.0, -2.0, 0.5  # fixed x shows template x + 1; moving z shows z - 2
    truth, residual = pair_truth(u_fixed, u_moving)
    np.testing.assert_allclose(truth[0], 3.0, atol=1e-5)  # z = x + 3
    np.testing.assert_allclose(truth[1], -0.5, atol=1e-5)
    assert residual.max() < 1e-4


def test_abdomen_pair_truth_is_exact_inside_the_organs(tmp_path):
    """Moving image sampled at the stored truth reproduces the fixed image inside every organ (away from partial-volume
    borders) up to the noise (two noisy samples, 15 HU each), across the sliding borders; the recipe in the JSON
    regenerates each subject exactly."""
    import json

    from scipy.ndimage import binary_erosion, map_coordinates

    from custom.synthetic.abdomen import PRIORITY, subject_motion, template
    from custom.synthetic.motion import compose_sliding, identity_grid

    js = make_abdomen(str(tmp_path), n_subjects=3, shape=(64, 56, 80), seed=4, n_val_pairs=2)
    spec = json.loads(js.read_text())
    pair = spec["registration_val"][0]
    fixed, moving = (load_nifti(js.parent / pair[k])[0] for k in ("fixed", "moving"))
    fixed_label = load_nifti(js.parent / pair["fixed"].replace("imagesTr", "labelsTr"))[0]
    truth = np.moveaxis(load_nifti(js.parent / "gtdisp" / learn2reg_disp_name(pair["fixed"], pair["moving"]))[0], -1, 0)
    grid = identity_grid(fixed.shape)
    checked = 0
    for organ in range(1, 14):
        inside = binary_erosion(fixed_label == organ)
        if inside.sum() < 5:  # too thin for an interior at this size
            continue
        checked += 1
        warped = map_coordinates(moving, grid[:, inside] + truth[:, inside], order=1, mode="nearest")
        unregistered = np.abs(moving[inside] - fixed[inside]).mean()
        assert np.abs(warped - fixed[inside]).mean() < 25.0, organ
        assert unregistered > 25.0 or organ in (5, 8, 9), organ  # thin vessels may barely move
    assert checked >= 8
    k = int(pair["moving"].split("_")[1])
    stored = np.moveaxis(load_nifti(js.parent / "gtdisp" / f"AbdomenCTCT_{k:04d}_template.nii.gz")[0], -1, 0)
    regenerated = compose_sliding(template((64, 56, 80))[0], *subject_motion((64, 56, 80), 4, k), PRIORITY)
    np.testing.assert_allclose(regenerated, stored, atol=1e-5)


def test_cbct_thorax_adds_the_upper_abdomen_artefacts_and_keeps_the_truth_exact(tmp_path):
    from custom.synthetic.cbct import ORGANS

    js = make_thorax(str(tmp_path), n_subjects=1, shape=(48, 40, 40), n_keypoints=20, realism="cbct")
    r = learn2reg_pairs(js, split="registration_val", label_dir="segmentationsTr")[0]
    fl, ml = nii(r["fixed_label"]), nii(r["moving_label"])
    organs = {tid for tid, *_ in ORGANS.values()}
    assert organs <= {int(v) for v in np.unique(ml.numpy())}  # liver, stomach, spleen, kidneys in the FBCT
    disp = nii(tmp_path / "gtdisp" / learn2reg_disp_name(r["fixed_image"], r["moving_image"]))
    ids = [int(v) for v in np.unique(fl.numpy()) if v]
    # exact motion: every labelled CBCT voxel maps onto its own label in the FBCT (the space an organ left shows
    # unlabelled tissue, so the FBCT warped by the truth may show organs where the CBCT has none)
    warped, labelled = warp_label(ml, disp).numpy(), fl.numpy() > 0
    assert (warped[labelled] == fl.numpy()[labelled]).mean() > 0.999
    # the organs under the diaphragm move cranio-caudally with it (z component), the chest wall hardly
    liver = fl.numpy() == ORGANS["liver"][0]
    ribs = np.isin(fl.numpy(), [v for v in ids if 92 <= v <= 115])
    assert abs(disp[..., 2].numpy()[liver].mean()) > 0.5 and abs(disp[..., 2].numpy()[ribs].mean()) < 0.2
    # solid organs move rigidly: no static second copy where the wall's field reaches into the space they left
    for name in ("liver", "stomach", "spleen"):
        organ = fl.numpy() == ORGANS[name][0]
        u = disp.numpy()[organ]  # (n, 3) voxels
        assert organ.sum() > 20 and np.abs(u - u.mean(0)).max() < 1e-4, name
    fixed, moving = nii(r["fixed_image"]).numpy(), nii(r["moving_image"]).numpy()
    body = moving > -500
    outside = fixed == -1000
    assert (body & outside).sum() > 0.05 * body.sum()  # the field of view truncates the body


def test_lung_density_follows_the_volume_change():
    """Mass conservation: a fixed-grid region that maps to 1.2**3 times its volume holds that much more lung."""
    from custom.synthetic.cbct import render_state

    shape = (24, 24, 24)
    label = np.full(shape, 11, np.int16)  # lung_lower_lobe_left everywhere
    fbct = np.full(shape, -850.0, np.float32)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    ddf = 0.2 * (g - 11.5)  # x -> 1.2 x about the centre: det J = 1.728
    img = render_state(label, fbct, ddf)
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(img[inner], (-850.0 + 1000.0) * 1.728 - 1000.0, atol=1e-2)
