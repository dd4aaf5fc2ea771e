"""Bad input and faults: every case refused with the file or option named, nothing half-written."""

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import configs, error_text, run, workflow
from monai.data import MetaTensor

from custom.datasets.learn2reg import learn2reg_pairs
from custom.inferer import SegRegInferer
from custom.io import atomic_path, save_displacement, save_nifti
from custom.iterative import IterativeSegReg
from custom.plan import RegionPlan
from custom.synthetic.thorax import make_thorax
from custom.training import PairBatch
from custom.validation import InputError, SafeLoadImaged, ValidatePaird

THORAX = configs("segreg_thorax")
FAST = {"level_spacing_mm": [4.0], "iterations": [1], "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def thorax(tmp_path_factory):
    root = tmp_path_factory.mktemp("thorax_bad")
    return make_thorax(str(root), n_subjects=1, shape=(24, 20, 16), n_keypoints=5, seed=0).parent


def corrupt(src: Path, dst: Path, fn) -> Path:
    img = nib.load(src)
    nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj).astype(np.float32)), img.affine), dst)
    return dst


def thorax_copy(thorax: Path, tmp_path: Path, name: str, fn) -> Path:
    """A copy of the thorax set whose fixed image of the first validation pair is replaced by ``fn(array)``."""
    import shutil

    root = tmp_path / "set"
    shutil.copytree(thorax, root)
    rec = learn2reg_pairs(root / "ThoraxCBCT_dataset.json", "registration_val", "segmentationsTr")[0]
    if name == "truncated":
        data = Path(rec["fixed_image"]).read_bytes()
        Path(rec["fixed_image"]).write_bytes(data[: len(data) // 2])
    else:
        target = rec["fixed_label"] if name == "label" else rec["fixed_image"]
        corrupt(Path(target), Path(target), fn)
    return root, Path(rec["fixed_label"] if name == "label" else rec["fixed_image"])


def nan_image(a):
    a[0, 0, 0], a[1, 1, 1] = np.nan, np.nan
    return a


def huge_spacing(a):
    return a


@pytest.mark.parametrize(
    "case,fn,message",
    [
        ("image", nan_image, r"contains 2 NaN and 0 infinite"),
        ("image", lambda a: np.where(a > 0, np.inf, a), r"infinite values"),
        ("label", lambda a: a + 0.4 * (a > 0), r"non-integer values"),
        ("truncated", None, r"cannot read"),
    ],
)
def test_bundle_run_refuses_bad_input_and_names_the_file(thorax, tmp_path, case, fn, message):
    root, bad = thorax_copy(thorax, tmp_path, case, fn)
    out = tmp_path / "out"
    with pytest.raises(Exception) as err:
        run([THORAX / "inference.json"], "infer", dataset_dir=str(root), output_dir=str(out), **FAST)
    text = error_text(err.value)
    assert bad.name in text and __import__("re").search(message, text), text
    assert not list(out.glob("submission/*.nii.gz"))  # nothing written for the bad pair


def test_huge_spacing_is_refused_with_the_file_and_its_spacing(tmp_path):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([1e6, 1.0, 1.0, 1.0])), path)
    data = SafeLoadImaged(["fixed_image"], ensure_channel_first=True, image_only=True)({"fixed_image": str(path)})
    with pytest.raises(InputError, match=r"img\.nii\.gz has voxel spacing \[1000000\.0, 1\.0, 1\.0\]"):
        ValidatePaird()(data)


def test_the_last_line_of_a_failed_bundle_run_names_the_file(thorax, tmp_path):
    root, bad = thorax_copy(thorax, tmp_path, "truncated", None)
    cfg = str(THORAX / "inference.json")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, "--dataset_dir", str(root)]
    cmd += ["--output_dir", str(tmp_path / "o"), "--num_workers", "0", "--progress", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and bad.name in last and last.startswith("SegReg error: InputError: cannot read"), last


def test_learn2reg_reader_names_missing_folders_and_keys(thorax, tmp_path):
    js = thorax / "ThoraxCBCT_dataset.json"
    with pytest.raises(InputError, match=r"label folder .*labelsTrX does not exist"):
        learn2reg_pairs(js, "registration_val", "labelsTrX")
    spec = json.loads(js.read_text())
    spec["registration_val"][0] = {"fixed": spec["registration_val"][0]["fixed"]}
    bad = tmp_path / "ThoraxCBCT_dataset.json"
    bad.write_text(json.dumps(spec))
    for sub in ("imagesTr", "segmentationsTr"):
        (tmp_path / sub).symlink_to(thorax / sub)
    with pytest.raises(InputError, match=r"entry 0 of 'registration_val' .* has no \['moving'\] key"):
        learn2reg_pairs(bad, "registration_val", "segmentationsTr")


@pytest.mark.parametrize(
    "override,message",
    [({"epochs": "abc"}, "config id 'epochs' must be int, got 'abc'"), ({"epochs": 0}, "'epochs' must be at least 1")],
)
def test_training_refuses_mistyped_config_values(tmp_path, override, message):
    from custom.synthetic.acdc import make_acdc

    make_acdc(str(tmp_path / "acdc"), n_subjects=2, shape=(32, 32, 8))
    with pytest.raises(Exception) as err:
        workflow([configs("segreg_acdc") / "train.json"], "train", dataset_dir=str(tmp_path / "acdc"), **override)
        run([configs("segreg_acdc") / "train.json"], "train", dataset_dir=str(tmp_path / "acdc"), **override)
    assert message in error_text(err.value)


def test_training_warns_when_no_validation_will_run():
    from custom.validation import warn_if_no_validation

    with pytest.warns(UserWarning, match="no checkpoint is saved"):
        warn_if_no_validation(2, 5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["make-data", "--shape", "abc"], "--shape takes three whole numbers"),
        (["make-data", "--n_subjects", "0"], "--n_subjects must be at least 1"),
        (["demo", "--epochs", "abc"], "--epochs takes a whole number, got 'abc'"),
    ],
)
def test_cli_values_are_typed_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "custom", *args, "--out_dir", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and message in proc.stderr and not out.exists(), proc.stderr


@pytest.mark.parametrize(
    "shape,message",
    [((1, 2, 16, 16), r"\(B, 2, X, Y, Z\)"), ((1, 2, 4, 16, 16, 8), r"4-D series"), ((1, 3, 16, 16, 8), "cat")],
)
def test_inferer_refuses_wrong_dimensionality(shape, message):
    x = torch.zeros(shape)
    lab = torch.zeros((1, 1) + shape[2:])
    with pytest.raises(InputError, match=message):
        SegRegInferer()(x, torch.nn.Identity(), lab, lab)


def test_different_sizes_and_non_finite_input_are_named():
    a = MetaTensor(torch.zeros(1, 1, 16, 16, 8), meta={"filename_or_obj": "fixed_A.nii.gz"})
    b = MetaTensor(torch.zeros(1, 1, 16, 12, 8), meta={"filename_or_obj": "moving_B.nii.gz"})
    batch = {"fixed_image": a, "moving_image": b, "fixed_label": a, "moving_label": b}
    with pytest.raises(InputError, match=r"fixed_A\.nii\.gz.*moving_B\.nii\.gz.*not on one grid"):
        PairBatch()(batch)
    lab = torch.ones(1, 1, 16, 16, 8)
    bad = torch.zeros(1, 2, 16, 16, 8)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="1 NaN"):
        SegRegInferer()(bad, torch.nn.Identity(), lab, lab)
    img = torch.rand(1, 1, 16, 16, 8)
    inf = img.clone()
    inf[0, 0, 1, 1, 1] = float("inf")
    with pytest.raises(InputError, match="1 infinite"):
        IterativeSegReg(progress=False)(img, inf, lab, lab)
    with pytest.raises(InputError, match="non-integer"):
        RegionPlan.build(lab * 1.4, lab)
    field = np.zeros((3, 4, 4, 4), np.float32)
    field[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 non-finite values; it is not written"):
        save_displacement(field, "/nonexistent/never.nii.gz", np.eye(4))


def test_outputs_get_normal_permissions_and_stale_temps_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_nifti(np.zeros((2, 2, 2), np.float32), tmp_path / "a.nii.gz", np.eye(4))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        # a run killed while writing leaves a temp file; the next write of that name removes it
        stale = tmp_path / ".a.nii.gz.segreg-tmp-999999999-x.nii.gz"
        stale.write_bytes(b"")
        save_nifti(np.zeros((2, 2, 2), np.float32), tmp_path / "a.nii.gz", np.eye(4))
        assert not stale.exists()
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.json"):
                raise RuntimeError("interrupted")
        assert not list(tmp_path.glob(".b.json*")) and not (tmp_path / "b.json").exists()
    finally:
        os.umask(old)


def test_writer_checks_the_output_folder_before_work_and_announces_replacing(tmp_path):
    from custom.writers import RegistrationWriter

    if os.geteuid() != 0:  # root ignores write permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(InputError, match="cannot write to the output folder"):
            RegistrationWriter(str(ro / "out"), labels=["bg", "a"]).reset()
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("pair\n")
    with pytest.raises(FileExistsError, match="exists from an earlier run"):
        RegistrationWriter(str(out), labels=["bg", "a"], overwrite=False).reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RegistrationWriter(str(out), labels=["bg", "a"]).reset()  # overwrite: replaces, logging a warning
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(InputError, match="cannot write to the output folder"):
        RegistrationWriter(str(blocked / "out"), labels=["bg", "a"]).reset()
