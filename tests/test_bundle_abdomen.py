import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import TINY_NET, configs, run, validate_metadata, workflow
from scipy.ndimage import map_coordinates
from seg_bundle import make_segmentation_bundle

from custom.datasets.learn2reg import learn2reg_split
from custom.segmentation import with_automatic_labels
from custom.synthetic.abdomen import make_abdomen

CFG = configs("segreg_abdomen")
TRAIN, INFER, EVAL = (CFG / f for f in ("train.json", "inference.json", "evaluate.json"))
SMALL = {"n_train": 2, "n_val": 2, "num_workers": 0, **TINY_NET}


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory):
    root = tmp_path_factory.mktemp("abdomen")
    return make_abdomen(str(root), n_subjects=6, shape=(48, 40, 56), seed=2)


@pytest.fixture(scope="module")
def trained(abdomen, tmp_path_factory):
    out = tmp_path_factory.mktemp("abd_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        run(
            [TRAIN],
            "train",
            dataset_dir=str(abdomen.parent),
            ckpt_dir=str(out / "models"),
            output_dir=str(out / "tb"),
            epochs=1,
            val_interval=1,
            **SMALL,
        )
    return out


def test_metadata_and_properties(abdomen):
    meta = validate_metadata("segreg_abdomen")
    assert len(meta["labels"]) == 14 and meta["labels"]["6"] == "liver"
    for files, kind in (([TRAIN], "train"), ([INFER], "infer"), ([INFER, EVAL], "infer")):
        wf = workflow(files, kind, dataset_dir=str(abdomen.parent), n_train=2, n_val=2)
        assert wf.check_properties() == []


def test_variants_use_lncc_and_the_abdomen_weights(abdomen):
    expected = {"dice": ("DiceLoss", 1.0), "edt": ("EDTLoss", 100.0), "edt_dice": ("EDTDiceLoss", 1.0)}
    expected["baseline"] = ("DiceLoss", 1.0)
    for variant, (mask_loss, g1) in expected.items():
        loss = workflow(
            [TRAIN], "train", dataset_dir=str(abdomen.parent), variant=variant, n_train=2, n_val=2
        ).parser.get_parsed_content("loss")
        assert type(loss.loss.sim).__name__ == "LocalNormalizedCrossCorrelationLoss"
        assert type(loss.loss.mask).__name__ == mask_loss and loss.loss.weights == {"sim": 1.0, "mask": g1, "reg": 0.1}


def test_split_gives_all_ordered_inter_subject_pairs(abdomen):
    train = learn2reg_split(abdomen, "train", n_train=3, n_val=2)
    assert len(train) == 3 * 2 and all(r["fixed_image"] != r["moving_image"] for r in train)
    test = learn2reg_split(abdomen, "test", n_train=2, n_val=2)
    assert {r["fixed_image"].split("_")[-2] for r in test} == {"0005", "0006"} and len(test) == 2
    with pytest.raises(ValueError, match="n_train"):
        learn2reg_split(abdomen, "train", n_train=20, n_val=3)


def test_precomputed_label_folder(abdomen, tmp_path):
    recs = learn2reg_split(abdomen, "test", n_train=2, n_val=2)
    with pytest.raises(ValueError, match="missing"):
        with_automatic_labels(recs, label_dir=tmp_path)
    for r in recs:
        for k in ("fixed", "moving"):
            (tmp_path / r[f"{k}_image"].split("/")[-1]).write_bytes(open(r[f"{k}_label"], "rb").read())
    auto = with_automatic_labels(recs, label_dir=tmp_path)
    assert auto[0]["fixed_label"].startswith(str(tmp_path)) and auto[0]["fixed_gt"] == recs[0]["fixed_label"]
    assert with_automatic_labels(recs) is recs


def test_segmentation_bundle_chain_then_registration_scored_on_ground_truth(abdomen, trained, tmp_path):
    imgs = sorted((abdomen.parent / "imagesTr").glob("*.nii.gz"))[:4]
    seg_bundle, seg_map = make_segmentation_bundle(
        tmp_path / "seg_bundle", imgs, [abdomen.parent / "labelsTr" / p.name for p in imgs]
    )
    out, labels = tmp_path / "eval", tmp_path / "auto_labels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(
            [INFER, EVAL],
            "infer",
            dataset_dir=str(abdomen.parent),
            ckpt_dir=str(trained / "models"),
            output_dir=str(out),
            seg_bundle=str(seg_bundle),
            seg_label_map=str(seg_map),
            seg_label_dir=str(labels),
            **SMALL,
        )
    made = sorted(p.name for p in labels.glob("*.nii.gz"))
    assert made == ["AbdomenCTCT_0005_0000.nii.gz", "AbdomenCTCT_0006_0000.nii.gz"]
    auto = nib.load(labels / made[0])
    assert auto.shape == (48, 40, 56) and set(np.unique(auto.get_fdata()).astype(int)) <= set(range(14))
    # Learn2Reg file + ground-truth scoring, checked independently: scipy applies the submitted displacement to the
    # moving ground truth, Dice against the fixed ground truth equals the table
    table = json.loads((out / "metrics.json").read_text())
    disp = nib.load(out / "submission" / "disp_0005_0006.nii.gz").get_fdata()
    gt = abdomen.parent / "labelsTr"
    fixed, moving = (nib.load(gt / f"AbdomenCTCT_000{i}_0000.nii.gz").get_fdata() for i in (5, 6))
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in fixed.shape], indexing="ij")
    warped = map_coordinates(moving, [np.clip(g[i] + disp[..., i], 0, fixed.shape[i] - 1) for i in range(3)], order=0)
    row = next(c for c in table["cases"] if c["pair"] == "disp_0005_0006")
    for i, name in ((1, "spleen"), (6, "liver"), (7, "stomach")):
        a, b = warped == i, fixed == i
        assert row[f"dice_{name}"] == pytest.approx(200 * (a & b).sum() / (a.sum() + b.sum()), abs=0.5)


def test_label_resampling_onto_the_image_grid_matches_scipy():
    from custom.segmentation import resample_nearest

    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (12, 10, 8))
    src_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    dst_aff = np.diag([1.0, 1.0, 2.0, 1.0])
    dst_aff[:3, 3] = [1.0, -2.0, 2.0]
    shape = (20, 18, 6)
    ours = resample_nearest(label, src_aff, shape, dst_aff)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    src = ((g @ dst_aff[:3, :3].T + dst_aff[:3, 3]) - src_aff[:3, 3]) @ np.linalg.inv(src_aff[:3, :3]).T
    ref = map_coordinates(label.astype(float), src.T, order=0, mode="constant", cval=0).reshape(shape)
    inside = (src > 0.01).all(1).reshape(shape) & (src < np.array(label.shape) - 1.01).all(1).reshape(shape)
    frac = (ours == ref)[inside & (np.abs(src - np.round(src)) != 0.5).all(1).reshape(shape)].mean()
    assert frac == 1.0 and ours.shape == shape
