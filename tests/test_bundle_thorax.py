import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import configs, error_text, run, validate_metadata, workflow
from scipy.ndimage import map_coordinates

import custom
from custom.datasets.learn2reg import read_keypoints
from custom.regions import load_merge_map
from custom.synthetic.thorax import TOTALSEG_IDS, make_thorax
from custom.transforms import MergeLabelsd

CFG = configs("segreg_thorax")
INFER, EVAL, MERGE = CFG / "inference.json", CFG / "evaluate.json", CFG / "totalsegmentator_to_segreg13.json"
FAST = {"level_spacing_mm": [8.0, 4.0], "iterations": [3, 2], "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def thorax(tmp_path_factory):
    root = tmp_path_factory.mktemp("thorax")
    return make_thorax(str(root), n_subjects=2, shape=(40, 32, 32), n_keypoints=30, seed=1).parent


def test_metadata_properties_and_no_training_config(thorax):
    meta = validate_metadata("segreg_thorax")
    assert len(meta["labels"]) == 20 and meta["labels"]["7"] == "pulmonary_artery" and meta["labels"]["13"] == "liver"
    assert not (CFG / "train.json").exists()
    for files in ([INFER], [INFER, EVAL]):
        assert workflow(files, "infer", dataset_dir=str(thorax)).check_properties() == []


def test_variants_use_the_shared_mechanism_and_unknown_names_are_refused(thorax, tmp_path):
    for variant, glob in (("segreg", False), ("global", True)):
        wf = workflow([INFER], "infer", dataset_dir=str(thorax), variant=variant)
        inferer = wf.parser.get_parsed_content("inferer")
        assert inferer.optimiser.global_region == glob and type(inferer.optimiser.loss.sim).__name__ == "MINDSSCLoss"
    with pytest.raises(Exception) as err:
        run([INFER], "infer", dataset_dir=str(thorax), output_dir=str(tmp_path / "o"), variant="segreg2", **FAST)
    assert "unknown variant 'segreg2'" in error_text(err.value) and not (tmp_path / "o").exists()


def test_merge_map_covers_the_totalsegmentator_thorax_classes():
    spec = load_merge_map(MERGE)
    assert set(spec["regions"]) == set(range(13))
    for name, i in TOTALSEG_IDS.items():  # every class the generator (and TotalSegmentator's thorax) uses
        assert i in spec["map"], name
    assert spec["map"][TOTALSEG_IDS["lung_lower_lobe_left"]] == 3 and spec["map"][TOTALSEG_IDS["rib_right_7"]] == 4
    assert spec["map"][TOTALSEG_IDS["clavicula_left"]] == 10 and spec["map"][TOTALSEG_IDS["heart"]] == 12


EXTENDED = CFG / "totalsegmentator_to_segreg_extended.json"
TOTAL_V2 = json.loads((Path(custom.__file__).parent / "totalsegmentator_total_v2_classes.json").read_text())["classes"]


@pytest.mark.parametrize("merge", [MERGE, EXTENDED], ids=["seed13", "extended"])
def test_merge_maps_use_the_totalsegmentator_v2_ids(merge):
    """Every source id of a shipped merge map is a TotalSegmentator v2 'total' class under the name the map gives it."""
    spec = json.loads(merge.read_text())
    assert len(TOTAL_V2) == 117 and set(spec["map"]) == set(spec["source_names"])
    for i, name in spec["source_names"].items():
        assert TOTAL_V2[name] == int(i), (merge.name, i, name)
    for name, i in TOTALSEG_IDS.items():  # the generator's classes keep the ids of the full list
        assert TOTAL_V2[name] == i


def test_the_extended_set_gives_the_upper_abdomen_its_own_regions():
    seed, ext = load_merge_map(MERGE), load_merge_map(EXTENDED)
    assert {i: ext["regions"][i] for i in seed["regions"]} == seed["regions"]  # the 13 regions keep their ids
    assert all(ext["map"][k] == v for k, v in seed["map"].items())  # and their classes
    organs = {"liver": "liver", "gallbladder": "liver", "stomach": "stomach", "spleen": "spleen"}
    organs.update(kidney_right="kidney_right", kidney_left="kidney_left", pancreas="pancreas_duodenum")
    for cls, region in organs.items():
        assert ext["regions"][ext["map"][TOTAL_V2[cls]]] == region, cls
    assert len(set(ext["regions"].values())) == len(ext["regions"]) == 20


def test_region_set_is_a_config_choice_and_labels_follow_it(thorax, tmp_path):
    labels = {}
    for name, n in (("seed13", 13), ("extended", 20)):
        wf = workflow([INFER, EVAL], "infer", dataset_dir=str(thorax), output_dir=str(tmp_path / name), region_set=name)
        labels[name] = wf.parser.get_parsed_content("labels")
        assert len(labels[name]) == n and wf.parser.get_parsed_content("writer").labels[13 % n] == labels[name][13 % n]
    assert labels["extended"][13] == "liver"
    meta = validate_metadata("segreg_thorax")  # the default set is the one metadata.json names for the Zoo
    assert workflow([INFER], "infer", dataset_dir=str(thorax)).parser.get_parsed_content("region_set") == "extended"
    assert {int(k): v for k, v in meta["labels"].items()} == labels["extended"]
    with pytest.raises(Exception) as err:
        workflow([INFER], "infer", dataset_dir=str(thorax), region_set="organs").parser.get_parsed_content("merge_map")
    assert "unknown region_set 'organs'" in error_text(err.value) and "extended" in error_text(err.value)
    label = torch.zeros(1, 6, 6, 6)
    label[0, 4:, 4:, 4:] = TOTAL_V2["liver"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # liver is a known class of the extended set: no unknown-label warning
        out = MergeLabelsd(["fixed_label"], str(EXTENDED))({"fixed_label": label})["fixed_label"]
    assert set(torch.unique(out).tolist()) == {0, 13}


def test_unknown_labels_are_reported_with_the_file_name():
    label = torch.zeros(1, 6, 6, 6)
    label[0, 1:3, 1:3, 1:3] = TOTALSEG_IDS["aorta"]
    label[0, 4:, 4:, 4:] = 5  # liver: not a thorax region
    with pytest.warns(UserWarning, match=r"\[5\].*fixed_label"):
        out = MergeLabelsd(["fixed_label"], str(MERGE))({"fixed_label": label})["fixed_label"]
    assert set(torch.unique(out).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="merge map"):
        MergeLabelsd(["fixed_label"], str(MERGE), unknown="error")({"fixed_label": label})


@pytest.mark.parametrize("variant", ["segreg", "global"])
def test_submission_folder_and_tre_match_the_learn2reg_convention(thorax, tmp_path, variant):
    out = tmp_path / variant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wf = workflow([INFER, EVAL], "infer", dataset_dir=str(thorax), output_dir=str(out), variant=variant, **FAST)
        wf.run()
        logged = wf.parser.get_parsed_content("evaluator").state.metrics
        wf.finalize()
    names = sorted(p.name for p in (out / "submission").glob("*.nii.gz"))
    assert names == ["disp_0001_0001_0001_0000.nii.gz", "disp_0001_0002_0001_0000.nii.gz"]
    table = json.loads((out / "metrics.json").read_text())
    for name in names:
        disp = nib.load(out / "submission" / name).get_fdata()
        assert disp.shape == (40, 32, 32, 3)
        # Learn2Reg's evaluation: sample the displacement at the fixed keypoints, add, compare with the moving ones
        m = name.split("_")[2]
        fixed = read_keypoints(thorax / f"keypoints0{int(m)}Tr" / f"ThoraxCBCT_0001_{m}.csv")
        moving = read_keypoints(thorax / f"keypoints0{int(m)}Tr" / "ThoraxCBCT_0001_0000.csv")
        u = np.stack([map_coordinates(disp[..., i], fixed.T, order=1) for i in range(3)], 1)
        spacing = np.linalg.norm(nib.load(out / "submission" / name).affine[:3, :3], axis=0)
        tre = np.linalg.norm((fixed + u - moving) * spacing, axis=1).mean()
        row = next(c for c in table["cases"] if c["pair"] == name[:-7])
        assert row["tre_mm"] == pytest.approx(tre, rel=1e-4)
        # the synthetic set stores the exact motion: EPE inside the CBCT field of view (above -1000 HU) is reported
        assert np.isfinite(row["epe_in_fov_mm"]) and "epe_in_fov_mm" in table["conventions"]
    assert np.isfinite(table["summary"]["dice_mean"]["mean"]) and "sdlogj" in table["summary"]
    assert "tre_mm" in table["conventions"]
    # one metric path: the evaluator's logged metrics are the table's means
    for key, col in (("tre_mm", "tre_mm"), ("mean_dice", "dice_mean"), ("sdlogj", "sdlogj")):
        assert logged[key] == pytest.approx(table["summary"][col]["mean"], rel=1e-6, abs=1e-9), key
