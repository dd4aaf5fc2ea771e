import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY_NET, configs, run, validate_metadata, workflow
from monai.bundle import ConfigParser
from scipy.ndimage import map_coordinates

from custom.datasets.acdc import acdc_split
from custom.synthetic.acdc import make_acdc

CFG = configs("segreg_acdc")
TRAIN, INFER, EVAL, MULTI = (CFG / f for f in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"))
SMALL = {"pixdim": [3.6, 3.6, 10.0], "spatial_size": [32, 32, 16], "num_workers": 0, **TINY_NET}


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    make_acdc(str(root), n_subjects=3, n_test=1, shape=(64, 64, 16), seed=3)
    return root


@pytest.fixture(scope="module")
def trained(acdc, tmp_path_factory):
    """Both variants trained for one epoch from a working directory outside the repository."""
    out = tmp_path_factory.mktemp("acdc_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        for variant in ("edt_dice", "baseline"):
            run(
                [TRAIN],
                "train",
                dataset_dir=str(acdc),
                ckpt_dir=str(out / "models"),
                output_dir=str(out / variant),
                variant=variant,
                epochs=1,
                val_interval=1,
                **SMALL,
            )
    return out


def test_metadata_matches_the_model_zoo_schema():
    meta = validate_metadata("segreg_acdc")
    assert meta["labels"] == {"0": "background", "1": "RV", "2": "myocardium", "3": "LV_cavity"}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2


@pytest.mark.parametrize("files,kind", [([TRAIN], "train"), ([INFER], "infer"), ([INFER, EVAL], "infer")])
def test_configs_have_every_bundle_property(files, kind, acdc):
    wf = workflow(files, kind, dataset_dir=str(acdc))
    assert wf.check_properties() == []
    if kind == "train":
        assert wf.parser.get("training") == "@run" and wf.parser.get("run")


def test_multi_gpu_config_only_overrides_ids_that_train_defines():
    # starting it needs torch.distributed and GPUs; here: every overridden id exists, and the merged config is DDP
    train, multi = ConfigParser(), ConfigParser.load_config_file(str(MULTI))
    train.read_config(str(TRAIN))
    new_ids = {
        "train#sampler",
        "validate#sampler",
        "train#dataloader#sampler",
        "validate#dataloader#sampler",
        "finalize",
    }
    for key in multi:
        assert key in train or key in new_ids, key
    merged = ConfigParser()
    merged.read_config([str(TRAIN), str(MULTI)])
    assert merged["network"]["_target_"].endswith("DistributedDataParallel")
    assert merged["train#dataloader#sampler"] == "@train#sampler" and merged["training"] == "@run"


def test_variant_selects_the_loss_weights_and_region_mode(acdc):
    expected = {"dice": ("dice", 0.1), "edt": ("edt", 10.0), "edt_dice": ("edt_dice", 0.1), "baseline": ("dice", 0.1)}
    for variant, (mask_loss, g1) in expected.items():
        wf = workflow([TRAIN], "train", dataset_dir=str(acdc), variant=variant)
        loss = wf.parser.get_parsed_content("loss")
        assert loss.loss.mask_loss == mask_loss and loss.loss.weights == {"sim": 1.0, "mask": g1, "reg": 0.01}
        assert wf.parser.get_parsed_content("global_region") == (variant == "baseline")


def test_split_by_patient_and_automatic_label_folder(acdc, tmp_path):
    train, val = acdc_split(acdc, "train", 0.67), acdc_split(acdc, "val", 0.67)
    assert {r["patient"] for r in train} == {"patient001", "patient002"} and {r["patient"] for r in val} == {
        "patient003"
    }
    assert {r["direction"] for r in train} == {"ES_ED", "ED_ES"}
    auto = tmp_path / "auto"
    auto.mkdir()
    for r in acdc_split(acdc, "test"):
        for k in ("fixed_image", "moving_image"):
            (auto / r[k].split("/")[-1]).write_bytes(open(r[k].replace(".nii.gz", "_gt.nii.gz"), "rb").read())
    test = acdc_split(acdc, "test", label_dir=auto)
    assert test[0]["fixed_label"].startswith(str(auto)) and test[0]["fixed_gt"].endswith("_gt.nii.gz")


def test_training_writes_the_best_checkpoint_per_variant(trained):
    assert (trained / "models" / "model.pt").is_file() and (trained / "models" / "model_baseline.pt").is_file()
    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)


@pytest.mark.parametrize("variant", ["edt_dice", "baseline"])
def test_evaluation_writes_consistent_outputs_and_table(acdc, trained, variant, tmp_path):
    out = tmp_path / "eval"
    run(
        [INFER, EVAL],
        "infer",
        dataset_dir=str(acdc),
        ckpt_dir=str(trained / "models"),
        output_dir=str(out),
        variant=variant,
        **SMALL,
    )
    table = json.loads((out / "metrics.json").read_text())
    assert len(table["cases"]) == 2 and {c["pair"] for c in table["cases"]} == {"patient004_ES_ED", "patient004_ED_ES"}
    for col in ("dice_RV", "dice_myocardium", "dice_LV_cavity", "hd95_RV", "sdlogj", "neg_jac_percent"):
        assert np.isfinite(table["summary"][col]["mean"]), col
    # independent check: preprocess the ground truth as the config does, warp it with the saved displacement through
    # scipy (nearest), compare with the saved warped label and recompute Dice with numpy
    disp = nib.load(out / "displacements" / "patient004_ES_ED.nii.gz")
    assert disp.shape == (32, 32, 16, 3) and np.allclose(np.linalg.norm(disp.affine[:3, :3], axis=0), [3.6, 3.6, 10])
    record = next(r for r in acdc_split(acdc, "test") if r["direction"] == "ES_ED")
    prep = workflow([INFER], "infer", dataset_dir=str(acdc), **SMALL).parser.get_parsed_content("preprocessing")
    data = prep(record)
    fixed_gt, moving_gt = (np.asarray(data[k])[0] for k in ("fixed_gt", "moving_gt"))
    u = disp.get_fdata()
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in u.shape[:3]], indexing="ij")
    coords = [np.clip(g[i] + u[..., i], 0, u.shape[i] - 1) for i in range(3)]
    ours = nib.load(out / "warped" / "patient004_ES_ED_label.nii.gz").get_fdata()
    ref = map_coordinates(moving_gt, coords, order=0)
    assert (ours == ref).mean() > 0.995
    row = next(c for c in table["cases"] if c["pair"] == "patient004_ES_ED")
    for i, name in ((1, "RV"), (2, "myocardium"), (3, "LV_cavity")):
        a, b = ours == i, fixed_gt == i
        assert row[f"dice_{name}"] == pytest.approx(200 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-3)


def test_inference_without_a_checkpoint_says_what_to_run(acdc, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run([INFER], "infer", dataset_dir=str(acdc), ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "o"), **SMALL)
    assert isinstance(err.value.__cause__, FileNotFoundError) and "train this variant first" in str(err.value.__cause__)
