"""A finer control grid or an added finer level must not make the training-free solver worse (issue 25, item 3).

The sweep runs on a small CBCT-like synthetic thorax pair (``make_thorax(realism="cbct")``: breathing, sliding, upper
abdomen, cone-beam artefacts) with the ``segreg_thorax`` bundle's solver settings and regions (its default region set
merges the TotalSegmentator labels, as the bundle does), and scores each field by its
end-point error (mm) against the stored exact motion over the lungs inside the CBCT field of view: an independent
reference, not the solver's own loss. Before the control-grid basis (``custom.iterative.ControlGrid``), one control
point per voxel nearly doubled the error (Adam's per-parameter steps left voxel-sized noise in the field).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.datasets.learn2reg import learn2reg_pairs
from custom.iterative import ControlGrid
from custom.regions import load_merge_map, merge_labels
from custom.register import iterative_registration
from custom.synthetic.thorax import make_thorax

LUNGS = (10, 11, 12, 13, 14)  # TotalSegmentator lung lobes
BUNDLE = Path(__file__).parents[1] / "bundles/segreg_thorax/configs"
CONFIG = json.loads((BUNDLE / "inference.json").read_text())
SETTINGS = {  # the segreg_thorax bundle's solver settings, read from its config
    "level_spacing_mm": tuple(CONFIG["level_spacing_mm"]),
    "iterations": tuple(CONFIG["iterations"]),
    "intensity_range": tuple(CONFIG["intensity_range"]),
    "fov_value": CONFIG["fov_value"],
    "reg_domain": CONFIG["reg_domain"],
    "sigma_mm": CONFIG["composition_sigma_mm"],
    "grid_spacing": CONFIG["grid_spacing"],
    "mask_only_levels": CONFIG["mask_only_levels"],
    "progress": False,
}


@pytest.fixture(scope="module")
def cbct_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbct")
    js = make_thorax(
        str(root),
        n_subjects=1,
        n_val=1,
        shape=(56, 48, 48),
        spacing=(3.0, 3.0, 3.0),
        seed=3,
        n_keypoints=10,
        realism="cbct",
    )
    rec = learn2reg_pairs(js, "registration_val", "segmentationsTr")[0]
    merge = load_merge_map(BUNDLE / CONFIG["region_sets"][CONFIG["region_set"]])["map"]
    for key in ("fixed_label", "moving_label"):  # the bundle's regions; the scorer reads the TotalSegmentator labels
        image = nib.load(rec[key])
        regions = merge_labels(np.rint(image.get_fdata()).astype(np.int16), merge, "ignore").astype(np.int16)
        rec[f"{key}_regions"] = str(root / f"{key}_regions.nii.gz")
        nib.save(nib.Nifti1Image(regions, image.affine), rec[f"{key}_regions"])
    return rec


def lung_epe(rec, **overrides) -> float:
    """Lung end-point error (mm, inside the CBCT field of view) of the solver with ``overrides`` on the pair ``rec``."""
    disp = iterative_registration(
        rec["fixed_image"],
        rec["moving_image"],
        rec["fixed_label_regions"],
        rec["moving_label_regions"],
        **{**SETTINGS, **overrides},
    )["disp"]
    truth = np.moveaxis(nib.load(rec["true_displacement"]).get_fdata(), -1, 0)
    image = nib.load(rec["fixed_image"])
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    inside = np.isin(np.rint(nib.load(rec["fixed_label"]).get_fdata()), LUNGS) & (image.get_fdata() > -1000)
    err = np.linalg.norm((np.asarray(disp) - truth) * spacing[:, None, None, None], axis=0)
    return float(err[inside].mean())


def test_control_grid_spans_the_coarser_grid_and_keeps_the_step():
    grid = ControlGrid([9, 9, 9], [9, 9, 9])  # one control point per voxel
    assert grid.fine_axes == [0, 1, 2]
    import torch

    # a linear field is represented exactly; a unit parameter step moves the field by 2 voxels (grid_spacing 2's span)
    ramp = torch.linspace(-3, 3, 9).view(1, 1, 9, 1, 1).expand(1, 3, 9, 9, 9).contiguous()
    assert torch.allclose(grid.field(grid.parameters_of(ramp)), ramp, atol=1e-5)
    assert torch.allclose(grid.field(torch.ones(1, 3, 9, 9, 9)), torch.full((1, 3, 9, 9, 9), 2.0))
    coarse = ControlGrid([5, 5, 5], [9, 9, 9])
    assert coarse.fine_axes == [] and torch.allclose(
        coarse.field(torch.ones(1, 3, 5, 5, 5)), torch.full((1, 3, 9, 9, 9), 2.0)
    )


def test_a_finer_control_grid_or_level_is_not_worse(cbct_pair):
    none = lung_epe(cbct_pair, iterations=(0,) * len(SETTINGS["iterations"]))
    base = lung_epe(cbct_pair)
    fine_grid = lung_epe(cbct_pair, grid_spacing=1)
    levels, iterations = SETTINGS["level_spacing_mm"], SETTINGS["iterations"]
    fine_level = lung_epe(cbct_pair, level_spacing_mm=levels + (3.0,), iterations=iterations + (iterations[-1],))
    print(f"lung EPE mm: none {none:.2f}, grid 2 {base:.2f}, grid 1 {fine_grid:.2f}, + level 3 mm {fine_level:.2f}")
    assert base < 0.75 * none
    # "beyond noise": 0.25 mm, the spread of the lung EPE between equally good settings on such pairs
    assert fine_grid <= base + 0.25
    assert fine_level <= base + 0.25
