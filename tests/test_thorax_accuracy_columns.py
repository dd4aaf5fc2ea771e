"""benchmarks/thorax_accuracy.py: the voxels behind each EPE column and the page's line that counts them."""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

# the ids from the shipped TotalSegmentator v2 class list, not from the benchmark's own constants
CLASSES = json.loads((REPO / "custom" / "totalsegmentator_total_v2_classes.json").read_text())["classes"]
KIDNEY, LIVER, LUNG = CLASSES["kidney_right"], CLASSES["liver"], CLASSES["lung_upper_lobe_left"]


def write_pair(root: Path, name: str, kidney_in_fov: int) -> dict:
    """A 12 x 10 x 8 pair at 2 mm: its field of view ends at z = 2 (-1000 HU below), ``kidney_in_fov`` kidney voxels
    inside it and 4 below it, a 3 x 3 x 3 liver and a lung block."""
    shape, affine = (12, 10, 8), np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.full(shape, 40.0, np.float32)
    image[:, :, :2] = -1000.0
    label = np.zeros(shape, np.int16)
    label[0:2, 0:2, 0:1] = KIDNEY  # outside the field of view
    label[:kidney_in_fov, 9, 3] = KIDNEY
    label[4:7, 4:7, 4:7] = LIVER
    label[8:11, 2:6, 2:7] = LUNG
    rec = {}
    for key, arr in (("fixed_image", image), ("fixed_label", label)):
        rec[key] = str(root / f"{name}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), rec[key])
    return rec


def test_column_masks_and_counts(tmp_path):
    from thorax_accuracy import column_masks, voxel_counts

    recs = [write_pair(tmp_path, "a", 5), write_pair(tmp_path, "b", 11)]
    masks = column_masks(recs[0])
    assert int(masks["kidneys"].sum()) == 5  # the 4 below the field of view do not count
    assert int(masks["abdomen"].sum()) == 27
    assert int(masks["lungs"].sum()) == 3 * 4 * 5
    assert int(masks["out_fov"].sum()) == 4
    fov = nib.load(recs[0]["fixed_image"]).get_fdata() > -1000
    assert masks["pleura"].any() and not (masks["pleura"] & ~fov).any()  # the band around the lungs, in the FOV only
    line = voxel_counts(recs)
    assert "kidneys 5-11" in line
    assert "liver, stomach, spleen 27," in line
    assert f"lungs {3 * 4 * 5}," in line
