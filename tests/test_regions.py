import json
from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.region_pair import RandRegionPaird
from custom.regions import bounding_box, labels_to_regions, load_merge_map, merge_labels, present_labels


def case(fixed_ids=(0, 1, 2, 3), moving_ids=(0, 1, 2, 4), shape=(8, 8, 8)):
    fl = torch.zeros((1,) + shape)
    ml = torch.zeros((1,) + shape)
    for k, v in enumerate(fixed_ids):
        fl[0, k * 2 : k * 2 + 2] = v
    for k, v in enumerate(moving_ids):
        ml[0, k * 2 : k * 2 + 2] = v
    return {
        "fixed_image": torch.rand((1,) + shape),
        "moving_image": torch.rand((1,) + shape),
        "fixed_label": fl,
        "moving_label": ml,
    }


def test_labels_to_regions_one_hot():
    label = torch.tensor([0, 1, 2, 1, 5]).view(1, 1, 5, 1, 1).float()
    r = labels_to_regions(label, [0, 1, 2])
    assert r.shape == (1, 3, 5, 1, 1)
    assert r[0, :, 4].sum() == 0 and torch.equal(r.sum(1)[0, :4], torch.ones(4, 1, 1))


def test_sampler_frequencies_are_uniform_over_shared_regions():
    t = RandRegionPaird()
    t.set_random_state(0)
    n = 3000
    counts = Counter(t(case())["region_id"] for _ in range(n))
    assert set(counts) == {0, 1, 2}  # 3 and 4 are each in one image only: never drawn
    for r in (0, 1, 2):  # binomial sd = sqrt(n p (1-p)) ~ 26; allow 4 sd
        assert abs(counts[r] - n / 3) < 4 * np.sqrt(n * (1 / 3) * (2 / 3))


def test_sampler_outputs_masked_pair_and_edt():
    t = RandRegionPaird(include_background=False)
    t.set_random_state(1)
    d = case()
    out = t(d)
    r = out["region_id"]
    assert r in (1, 2)
    fm = (d["fixed_label"] == r).float()
    torch.testing.assert_close(out["fixed_region_mask"], fm)
    torch.testing.assert_close(out["fixed_region_image"], d["fixed_image"] * fm)
    assert out["moving_region_edt"].max() == 1.0 and out["moving_region_edt"][out["moving_region_mask"] == 0].max() == 0


def test_several_regions_per_pair_form_one_batch_of_distinct_regions():
    from monai.data import DataLoader, Dataset

    from custom.training import RegionPairBatch

    t = RandRegionPaird(num_samples=2)
    t.set_random_state(0)
    drawn = [tuple(o["region_id"] for o in t(case())) for _ in range(200)]
    assert all(len(set(ids)) == 2 and set(ids) <= {0, 1, 2} for ids in drawn)
    assert set(drawn) == {(0, 1), (0, 2), (1, 2)}  # every pair of the 3 shared regions comes up
    every = RandRegionPaird(num_samples=8)(case())  # more than the pair has: each shared region once
    assert sorted(o["region_id"] for o in every) == [0, 1, 2]
    batch = next(iter(DataLoader(Dataset([case(), case()], transform=RandRegionPaird(num_samples=3)), batch_size=2)))
    inputs, targets = RegionPairBatch()(batch)
    assert inputs.shape == (6, 2, 8, 8, 8) and targets["fixed_mask"].shape == (6, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="num_samples"):
        RandRegionPaird(num_samples=0)


def test_empty_label_map_is_a_clear_error_naming_the_file():
    d = case()
    d["moving_label"] = MetaTensor(torch.zeros_like(d["moving_label"]), meta={"filename_or_obj": "/data/m_gt.nii.gz"})
    with pytest.raises(ValueError, match="m_gt.nii.gz.*empty"):
        RandRegionPaird()(d)


def test_nan_image_is_rejected():
    d = case()
    d["fixed_image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RandRegionPaird()(d)


@pytest.mark.parametrize("shape", [(9,), (7, 11), (6, 9, 8), (3, 4, 5, 6)])
def test_bounding_box_is_the_extent_of_the_masks_voxels(shape):
    # reference: numpy's list of the mask's voxels (np.argwhere), for bool and float masks of any dimensionality
    rng = np.random.default_rng(len(shape))
    for _ in range(10):
        mask = rng.random(shape) > 0.9
        if not mask.any():
            continue
        voxels = np.argwhere(mask)
        lo, hi = voxels.min(0), voxels.max(0)
        want = tuple(slice(max(0, int(a) - 2), min(n, int(b) + 3)) for a, b, n in zip(lo, hi, shape))
        assert bounding_box(torch.as_tensor(mask), 2) == want
        assert bounding_box(torch.as_tensor(mask, dtype=torch.float32) * 3.0, 2) == want
        strided = torch.as_tensor(mask.transpose().copy()).permute(*reversed(range(len(shape))))  # not contiguous
        assert bounding_box(strided, 2) == want


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8, torch.float32, torch.float64])
def test_present_labels_are_numpys_unique_ids(dtype):
    rng = np.random.default_rng(0)
    label = rng.choice([0, 3, 7, 117], size=(9, 8, 7), p=[0.7, 0.2, 0.09, 0.01])
    assert present_labels(torch.as_tensor(label).to(dtype)) == np.unique(label).tolist()
    if dtype.is_floating_point:  # values that are not whole numbers still read as before (rounded unique values)
        assert present_labels(torch.tensor([[2.0, 0.4]], dtype=dtype)) == [0, 2]
    if dtype in (torch.int64, torch.int16):
        assert present_labels(torch.tensor([-2, 5], dtype=dtype)) == [-2, 5]


def test_bounding_box_with_margin_is_clipped():
    m = torch.zeros(10, 10, 10)
    m[2:4, 5:7, 8] = 1
    assert bounding_box(m, 3) == (slice(0, 7), slice(2, 10), slice(5, 10))
    with pytest.raises(ValueError):
        bounding_box(torch.zeros(3, 3, 3))


def test_merge_map_reports_unknown_labels(tmp_path):
    p = tmp_path / "merge.json"
    p.write_text(json.dumps({"regions": {"0": "background", "1": "lung"}, "map": {"10": 1, "11": 1}}))
    spec = load_merge_map(p)
    label = np.array([0, 10, 11, 99])
    with pytest.warns(UserWarning, match=r"\[99\]"):
        out = merge_labels(label, spec["map"])
    np.testing.assert_array_equal(out, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="not in the merge map"):
        merge_labels(label, spec["map"], unknown="error")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_merge_map(bad)


def test_compact_labels_keep_every_id_in_the_smallest_integer_type():
    from monai.data import MetaTensor

    from custom.regions import compact_labels

    small = torch.tensor([[0.0, 3.0], [117.0, 32767.0]]).t()  # not contiguous, as a NIfTI array arrives
    out = compact_labels(small)
    assert out.dtype == torch.int16 and out.is_contiguous() and torch.equal(out.long(), small.long())
    large = torch.tensor([0.0, 40000.0, 2.0004])  # within check_integer_labels' tolerance of an integer
    assert compact_labels(large).dtype == torch.int32 and compact_labels(large).tolist() == [0, 40000, 2]
    assert compact_labels(torch.tensor([-3, 5], dtype=torch.int64)).dtype == torch.int16
    assert compact_labels(torch.tensor([True, False])).tolist() == [1, 0]
    meta = compact_labels(MetaTensor(torch.ones(2, 2), meta={"filename_or_obj": "lab.nii.gz"}))
    assert meta.meta["filename_or_obj"] == "lab.nii.gz"
