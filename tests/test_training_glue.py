import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, DiffusionLoss
from scipy.ndimage import map_coordinates

from custom.inferer import SegRegInferer
from custom.losses import EDTDiceLoss, EDTLoss, SegRegLoss
from custom.region_pair import GlobalRegiond
from custom.regions import normalised_edt
from custom.training import PairBatch, RegionPairBatch, RegionPairLoss
from custom.variants import select_variant

MASK_LOSSES = {
    "dice": lambda: DiceLoss(include_background=True),
    "edt": EDTLoss,
    "edt_dice": EDTDiceLoss,
}


def pair_loss(mask_loss: str, num_steps: int = 7) -> RegionPairLoss:
    return RegionPairLoss(SegRegLoss(torch.nn.MSELoss(), MASK_LOSSES[mask_loss](), DiffusionLoss()), num_steps)


def test_global_region_masks_are_one_hot_labels_and_images_unmasked():
    lab = torch.zeros(1, 12, 10, 8)
    lab[0, 2:6, 2:6, 2:6], lab[0, 7:11, 3:8, 2:6] = 1, 3
    img = torch.rand(1, 12, 10, 8)
    d = GlobalRegiond(label_ids=[1, 2, 3])(
        {"fixed_image": img, "moving_image": img, "fixed_label": lab, "moving_label": lab}
    )
    assert torch.equal(d["fixed_region_image"], img)
    assert d["fixed_region_mask"].shape == (3, 12, 10, 8)
    for c, i in enumerate((1, 2, 3)):
        assert torch.equal(d["fixed_region_mask"][c], (lab[0] == i).float())
    torch.testing.assert_close(torch.as_tensor(d["moving_region_edt"]), normalised_edt(d["moving_region_mask"]))
    with pytest.raises(ValueError, match="NaN"):
        GlobalRegiond(label_ids=[1])(
            {"fixed_image": img * float("nan"), "moving_image": img, "fixed_label": lab, "moving_label": lab}
        )


class ConstantVelocity(torch.nn.Module):
    def forward(self, x):
        v = torch.zeros((x.shape[0], 3) + x.shape[2:])
        v[:, 0] = 1.5
        return v


def test_global_inferer_applies_one_field_everywhere():
    lab = torch.zeros(1, 1, 16, 16, 16)
    lab[..., 3:8, 3:8, 3:8] = 1
    img = torch.rand(1, 1, 16, 16, 16)
    out = SegRegInferer(global_region=True, num_steps=0)(torch.cat([img, img], 1), ConstantVelocity(), lab, lab)
    torch.testing.assert_close(out["ddf"][0, 0], torch.full((16, 16, 16), 1.5))
    # the warp of the image is a shift by 1.5 voxels along x (scipy reference, border clamp)
    g = np.meshgrid(*[np.arange(16.0)] * 3, indexing="ij")
    ref = map_coordinates(img[0, 0].numpy(), [np.clip(g[0] + 1.5, 0, 15), g[1], g[2]], order=1)
    np.testing.assert_allclose(out["warped_image"][0, 0].numpy(), ref, atol=1e-5)


def _targets(shape=(16, 16, 16)):
    m = torch.zeros((1, 1) + shape)
    m[..., 4:12, 4:12, 4:12] = 1
    img = m * 0.8
    return {
        "fixed_image": img,
        "moving_image": img.clone(),
        "fixed_mask": m,
        "moving_mask": m.clone(),
        "fixed_edt": normalised_edt(m[0])[None],
        "moving_edt": normalised_edt(m[0])[None],
    }


@pytest.mark.parametrize("mask_loss", ["dice", "edt", "edt_dice"])
def test_region_pair_loss_is_zero_for_identical_pair_and_zero_velocity(mask_loss):
    loss = pair_loss(mask_loss)
    t = _targets()
    v = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    total = loss(v, t)
    assert loss.last["sim"] == 0 and loss.last["reg"] == 0 and loss.last["mask"] < 1e-4
    total.backward()
    assert v.grad is not None


def test_region_pair_loss_penalises_a_shift_and_its_gradient_undoes_it():
    t = _targets()
    t["moving_image"] = torch.roll(t["moving_image"], 2, dims=2)
    t["moving_mask"] = torch.roll(t["moving_mask"], 2, dims=2)
    t["moving_edt"] = torch.roll(t["moving_edt"], 2, dims=2)
    loss = pair_loss("dice", num_steps=0)
    v = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    loss(v, t).backward()
    # moving content sits at +2 along x: sampling further along +x reduces the loss, so -grad points to +x
    assert -v.grad[0, 0].sum() > 0 and loss.last["mask"] > 0.1


def test_batches_follow_the_voxelmorph_channel_order():
    t = _targets()
    batch = {f"{s}_region_{k}": t[f"{s}_{k}"] for s in ("fixed", "moving") for k in ("image", "mask", "edt")}
    batch["moving_region_image"] = batch["moving_region_image"] + 1
    inputs, targets = RegionPairBatch()(batch)
    assert torch.equal(inputs[:, 0:1], batch["moving_region_image"]) and torch.equal(inputs[:, 1:], t["fixed_image"])
    with pytest.raises(KeyError, match="RandRegionPaird"):
        RegionPairBatch()({"fixed_image": t["fixed_image"]})
    pair = {
        "fixed_image": t["fixed_image"],
        "moving_image": t["moving_image"] + 1,
        "fixed_label": t["fixed_mask"],
        "moving_label": t["moving_mask"],
    }
    inputs, refs, args, kwargs = PairBatch()(pair)
    assert torch.equal(inputs[:, 0:1], pair["moving_image"]) and torch.equal(
        refs["fixed_reference"], pair["fixed_label"]
    )
    assert set(kwargs) == {"fixed_label", "moving_label", "spacing"} and args == ()
    # with ground truth in the batch, the references are the ground truth while the labels still drive registration
    gt = {"fixed_gt": t["fixed_mask"] * 2, "moving_gt": t["moving_mask"] * 3, "fixed_keypoints": torch.ones(1, 4, 3)}
    _, refs, _, kwargs = PairBatch()({**pair, **gt})
    assert torch.equal(refs["fixed_reference"], gt["fixed_gt"]) and torch.equal(
        refs["moving_reference"], gt["moving_gt"]
    )
    assert torch.equal(kwargs["fixed_label"], pair["fixed_label"]) and refs["fixed_keypoints"].shape == (1, 4, 3)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        select_variant({"dice": {}, "baseline": {}}, "dcie")


def test_loss_modules_are_required_and_weights_checked():
    with pytest.raises(TypeError, match="_target_"):
        SegRegLoss("mse", DiceLoss())
    with pytest.raises(ValueError, match="unknown loss weights"):
        SegRegLoss(torch.nn.MSELoss(), DiceLoss(), weights={"similarity": 1.0})
    with pytest.raises(TypeError, match="SegRegLoss"):
        RegionPairLoss(torch.nn.MSELoss())
