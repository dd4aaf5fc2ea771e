"""Padding outside a scanner's field of view (custom.field_of_view) and ``register --fov_value`` (default auto)."""

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.datasets.learn2reg import learn2reg_pairs
from custom.field_of_view import padding_value
from custom.register import register
from custom.synthetic.thorax import make_thorax
from custom.validation import InputError


def cbct_like(shape=(40, 32, 24), radius=0.35, seed=0) -> np.ndarray:
    """Noisy tissue (HU) inside a cylinder along the last axis, -1000 exactly outside it."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 30.0, shape)
    x, y = np.meshgrid(np.linspace(-0.5, 0.5, shape[0]), np.linspace(-0.5, 0.5, shape[1]), indexing="ij")
    image[(x**2 + y**2) > radius**2] = -1000.0
    return image


def test_padding_is_the_lowest_value_held_exactly_by_enough_voxels():
    image = cbct_like()
    outside = float((image == -1000.0).mean())
    assert 0.3 < outside < 0.9
    assert padding_value(torch.as_tensor(image)) == -1000.0
    # noisy air (a conventional CT, an MR background with noise): its lowest value is held by one voxel
    air = np.random.default_rng(1).normal(-1000.0, 20.0, (40, 32, 24))
    assert padding_value(torch.as_tensor(air)) is None
    # a few voxels at the lowest value are not padding: the share must reach min_fraction
    few = air.copy()
    few.flat[:100] = -1100.0  # 0.3 % of the voxels
    assert padding_value(torch.as_tensor(few)) is None
    assert padding_value(torch.as_tensor(few), min_fraction=0.002) == -1100.0


@pytest.fixture(scope="module")
def thorax_pair(tmp_path_factory):
    js = make_thorax(str(tmp_path_factory.mktemp("fov")), 1, (40, 32, 32), (8.0, 8.0, 8.0), n_keypoints=5, seed=0)
    return learn2reg_pairs(js, "registration_val", "segmentationsTr")[0]


def errors(disp_path, rec) -> tuple[float, float]:
    """End-point error (mm) against the stored exact motion: over every voxel, and over the fixed CBCT's field of
    view (where it holds more than its padding, -1000)."""
    truth = nib.load(rec["true_displacement"]).get_fdata()
    fixed = nib.load(rec["fixed_image"])
    spacing = np.linalg.norm(fixed.affine[:3, :3], axis=0)
    disp = np.zeros_like(truth) if disp_path is None else nib.load(disp_path).get_fdata()
    err = np.linalg.norm((disp - truth) * spacing, axis=-1)
    return float(err.mean()), float(err[fixed.get_fdata() > -1000].mean())


def test_register_recognises_a_cbct_field_of_view_by_default(thorax_pair, tmp_path, capsys):
    # the CBCT's cylinder of -1000 is no anatomy: registered by the image, the background region (air and padding)
    # followed its border and every voxel's error rose above no registration's; by its masks alone (the default
    # where the padding is found) the field beats no registration
    rec = thorax_pair
    args = [rec["fixed_image"], rec["moving_image"], rec["fixed_label"], rec["moving_label"]]
    kw = dict(iterations=(20, 10, 5), save_warped=False, progress=False)
    auto = register(*args, out_dir=str(tmp_path / "auto"), **kw)["displacement"]
    assert "padding outside the scanner's field of view" in capsys.readouterr().out
    scored = register(*args, out_dir=str(tmp_path / "none"), fov_value="none", **kw)["displacement"]
    assert "field of view" not in capsys.readouterr().out
    none_all, none_fov = errors(None, rec)
    auto_all, auto_fov = errors(auto, rec)
    scored_all, scored_fov = errors(scored, rec)
    assert auto_all < none_all and auto_fov < none_fov
    assert auto_all < 0.5 * scored_all and auto_fov < scored_fov


def test_register_names_a_moving_image_with_padding(tmp_path, capsys):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    full = np.random.default_rng(2).normal(40.0, 30.0, (40, 32, 24))
    for name, array in (("fixed", full), ("moving", cbct_like())):
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(tmp_path / f"{name}.nii.gz"))
    out = register(
        str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), out_dir=str(tmp_path / "o"),
        iterations=(2, 1, 1), save_warped=False, progress=False,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "moving image" in printed and "register the truncated image as the fixed one" in printed
    assert nib.load(out["displacement"]).shape == (40, 32, 24, 3)


@pytest.mark.parametrize("word", ["maybe", "true", ""])
def test_register_refuses_a_fov_value_it_cannot_read(tmp_path, word):
    with pytest.raises(InputError, match="--fov_value takes auto, none or a number"):
        register("f.nii.gz", "m.nii.gz", out_dir=str(tmp_path), fov_value=word)
