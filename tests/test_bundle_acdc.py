import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import TINY_NET, configs, error_text, run, validate_metadata, workflow
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
        for variant in ("dice", "edt", "baseline"):  # into one models/ folder
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
        "dist_backend",
    }
    for key in multi:
        assert key in train or key in new_ids, key
    merged = ConfigParser()
    merged.read_config([str(TRAIN), str(MULTI)])
    assert merged["network"]["_target_"].endswith("DistributedDataParallel")
    assert merged["train#dataloader#sampler"] == "@train#sampler" and merged["training"] == "@run"


def test_variant_selects_the_loss_weights_and_region_mode(acdc):
    expected = {"dice": ("DiceLoss", 0.1), "edt": ("EDTLoss", 10.0), "edt_dice": ("EDTDiceLoss", 0.1)}
    expected["baseline"] = ("DiceLoss", 0.1)
    for variant, (mask_loss, g1) in expected.items():
        wf = workflow([TRAIN], "train", dataset_dir=str(acdc), variant=variant)
        loss = wf.parser.get_parsed_content("loss")
        assert type(loss.loss.mask).__name__ == mask_loss and type(loss.loss.sim).__name__ == "MSELoss"
        assert loss.loss.weights == {"sim": 1.0, "mask": g1, "reg": 0.01}
        assert wf.parser.get_parsed_content("global_region") == (variant == "baseline")
        assert wf.parser.get_parsed_content("model_name") == f"model_{variant}.pt"


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


def test_training_writes_one_checkpoint_per_variant_with_its_settings(trained):
    ckpts = {
        v: torch.load(trained / "models" / f"model_{v}.pt", weights_only=True) for v in ("dice", "edt", "baseline")
    }
    assert not (trained / "models" / "model.pt").exists()
    for variant, ckpt in ckpts.items():
        assert ckpt["segreg"]["variant"] == variant and ckpt["segreg"]["global_region"] == (variant == "baseline")
        assert ckpt["segreg"]["backbone"]["class"] == "VoxelMorphUNet" and any(
            k.endswith("weight") for k in ckpt["model"]
        )
    # dice and edt trained separately: different weights, neither overwrote the other
    assert any(not torch.equal(ckpts["dice"]["model"][k], ckpts["edt"]["model"][k]) for k in ckpts["dice"]["model"])


@pytest.mark.parametrize(
    "variant,ckpt,override,message",
    [
        ("dice", "model_edt.pt", {}, "trained as variant 'edt'"),
        ("baseline", "model_dice.pt", {}, "trained as variant 'dice'"),
        ("dice", "model_dice.pt", {"network_def#channels": [8, 8, 8, 8, 8, 8, 8, 8]}, "different backbone"),
        ("foo", "model_dice.pt", {}, "unknown variant 'foo'"),
    ],
)
def test_inference_refuses_a_checkpoint_it_was_not_trained_as(
    acdc, trained, tmp_path, variant, ckpt, override, message
):
    with pytest.raises(Exception) as err:
        run(
            [INFER],
            "infer",
            dataset_dir=str(acdc),
            ckpt_path=str(trained / "models" / ckpt),
            output_dir=str(tmp_path / "o"),
            variant=variant,
            **{**SMALL, **override},
        )
    assert message in error_text(err.value)
    assert not (tmp_path / "o").exists()  # refused before any output


def test_training_refuses_an_unknown_variant(acdc, tmp_path):
    with pytest.raises(Exception) as err:
        run([TRAIN], "train", dataset_dir=str(acdc), ckpt_dir=str(tmp_path), variant="foo", epochs=1, **SMALL)
    assert "unknown variant 'foo'" in error_text(err.value) and "edt_dice" in error_text(err.value)


def test_key_metric_and_table_score_the_ground_truth_with_automatic_labels(acdc, trained, tmp_path):
    # automatic labels: the ground truth shifted by 3 voxels, so scoring them would give a different Dice
    auto = tmp_path / "auto"
    auto.mkdir()
    for r in acdc_split(acdc, "test"):
        for k in ("fixed_gt", "moving_gt"):
            img = nib.load(r[k])
            name = r[k.replace("gt", "image")].split("/")[-1]
            nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 3, axis=0), img.affine), auto / name)
    out = tmp_path / "eval"
    wf = workflow(
        [INFER, EVAL],
        "infer",
        dataset_dir=str(acdc),
        ckpt_dir=str(trained / "models"),
        output_dir=str(out),
        variant="dice",
        label_dir=str(auto),
        **SMALL,
    )
    wf.run()
    logged = wf.parser.get_parsed_content("evaluator").state.metrics["mean_dice"]
    wf.finalize()
    table = json.loads((out / "metrics.json").read_text())
    assert logged == pytest.approx(table["summary"]["dice_mean"]["mean"], abs=1e-6)
    assert "hd95_<label>" in table["conventions"] and table["settings"]["jacobian_border"] == [2, 2, 0]
    # the table scores the ground truth, not the automatic labels: with the ground truth warped by the saved field
    # (scipy, original grid) Dice is close to the table; the shifted automatic labels would score far lower
    record = next(r for r in acdc_split(acdc, "test", label_dir=auto) if r["direction"] == "ES_ED")
    u = nib.load(out / "displacements" / "patient004_ES_ED.nii.gz").get_fdata()
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in u.shape[:3]], indexing="ij")
    coords = [np.clip(g[i] + u[..., i], 0, u.shape[i] - 1) for i in range(3)]
    row = next(c for c in table["cases"] if c["pair"] == "patient004_ES_ED")
    fixed_gt, fixed_auto = nib.load(record["fixed_gt"]).get_fdata(), nib.load(record["fixed_label"]).get_fdata()
    warped = map_coordinates(nib.load(record["moving_gt"]).get_fdata(), coords, order=0)
    dice = [
        200 * ((warped == i) & (fixed_gt == i)).sum() / ((warped == i).sum() + (fixed_gt == i).sum()) for i in (1, 2, 3)
    ]
    auto = [
        200 * ((warped == i) & (fixed_auto == i)).sum() / ((warped == i).sum() + (fixed_auto == i).sum())
        for i in (1, 2, 3)
    ]
    assert row["dice_mean"] == pytest.approx(np.mean(dice), abs=6.0) and abs(row["dice_mean"] - np.mean(auto)) > 10


@pytest.mark.parametrize("variant", ["dice", "baseline"])
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
    # the files are on the fixed image's original grid and header (64 x 64 x 16 at 1.8 x 1.8 x 10 mm), although the
    # registration ran on the 32 x 32 x 16 grid at 3.6 mm; the field is in-plane (frozen_components [2])
    record = next(r for r in acdc_split(acdc, "test") if r["direction"] == "ES_ED")
    fixed_file, moving_gt_file = nib.load(record["fixed_image"]), nib.load(record["moving_gt"])
    disp = nib.load(out / "displacements" / "patient004_ES_ED.nii.gz")
    assert disp.shape == fixed_file.shape + (3,) and np.allclose(disp.affine, fixed_file.affine)
    u = disp.get_fdata()
    assert np.abs(u[..., 2]).max() < 1e-4 and np.abs(u[..., :2]).max() > 0
    # independent check: scipy applies the saved displacement to the original moving ground truth (the Learn2Reg way)
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in u.shape[:3]], indexing="ij")
    coords = [np.clip(g[i] + u[..., i], 0, u.shape[i] - 1) for i in range(3)]
    ours = nib.load(out / "warped" / "patient004_ES_ED_label.nii.gz")
    assert np.allclose(ours.affine, fixed_file.affine)
    ref = map_coordinates(moving_gt_file.get_fdata(), coords, order=0)
    assert (ours.get_fdata() == ref).mean() > 0.995
    # end-point error against the stored exact motion, recomputed with numpy from the two files; an in-plane field
    # leaves no through-plane motion
    truth = nib.load(record["true_displacement"]).get_fdata()
    epe = np.linalg.norm((u - truth) * np.linalg.norm(fixed_file.affine[:3, :3], axis=0), axis=-1).mean()
    row = next(c for c in table["cases"] if c["pair"] == "patient004_ES_ED")
    assert row["epe_mm"] == pytest.approx(epe, rel=1e-4) and row["through_plane_mm"] < 1e-3
    assert table["summary"]["epe_mm"]["mean"] == pytest.approx(epe, rel=1e-4)  # only ES_ED has a stored truth
    # the table scores on the registration grid; on the original grid the same field gives nearly the same Dice
    fixed_gt = nib.load(record["fixed_gt"]).get_fdata()
    row = next(c for c in table["cases"] if c["pair"] == "patient004_ES_ED")
    for i, name in ((1, "RV"), (2, "myocardium"), (3, "LV_cavity")):
        a, b = ref == i, fixed_gt == i
        assert row[f"dice_{name}"] == pytest.approx(200 * (a & b).sum() / (a.sum() + b.sum()), abs=6.0)


def test_inference_without_a_checkpoint_says_what_to_run(acdc, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run([INFER], "infer", dataset_dir=str(acdc), ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "o"), **SMALL)
    assert isinstance(err.value.__cause__, FileNotFoundError) and "train this variant first" in str(err.value.__cause__)
    assert "model_edt_dice.pt" in str(err.value.__cause__)
