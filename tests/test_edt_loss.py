import numpy as np
import pytest
import torch
from conftest import requires_cuda
from scipy.ndimage import distance_transform_edt

from custom.losses import EDTDiceLoss, EDTLoss
from custom.regions import normalised_edt


def blob(shape=(20, 18, 12), centre=(10, 9, 6), radius=5):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return (((grid - np.array(centre).reshape(3, 1, 1, 1)) ** 2).sum(0) <= radius**2).astype(np.float32)


def test_normalised_edt_matches_scipy():
    m = blob()
    ref = distance_transform_edt(m)
    ref = ref / ref.max()
    out = normalised_edt(m[None])[0]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.max() == 1.0 and out[m == 0].max() == 0.0


def test_normalised_edt_with_spacing_matches_scipy():
    m = blob()
    ref = distance_transform_edt(m, sampling=(1.0, 1.0, 3.0))
    np.testing.assert_allclose(normalised_edt(m[None], sampling=[1.0, 1.0, 3.0])[0], ref / ref.max(), atol=1e-6)


def test_edt_loss_zero_for_identical_masks_and_equals_mse():
    a = torch.as_tensor(normalised_edt(blob()[None]))[None]
    b = torch.as_tensor(normalised_edt(blob(centre=(11, 9, 6))[None]))[None]
    assert EDTLoss()(a, a).item() == 0.0
    np.testing.assert_allclose(EDTLoss()(a, b).item(), np.mean((a.numpy() - b.numpy()) ** 2), rtol=1e-6)
    assert EDTLoss()(a, b).item() > 0


def test_empty_mask_edt_is_zero():
    assert normalised_edt(np.zeros((1, 5, 5, 5), np.float32)).max() == 0


@requires_cuda
def test_edt_loss_cuda():
    a = torch.as_tensor(normalised_edt(blob()[None]))[None]
    b = torch.as_tensor(normalised_edt(blob(centre=(11, 9, 6))[None]))[None]
    torch.testing.assert_close(EDTLoss()(a.cuda(), b.cuda()).cpu(), EDTLoss()(a, b))


def test_reductions_and_the_combined_edt_dice_loss():
    a = torch.as_tensor(normalised_edt(blob()[None]))[None]
    b = torch.as_tensor(normalised_edt(blob(centre=(11, 9, 6))[None]))[None]
    sq = (a - b) ** 2
    torch.testing.assert_close(EDTLoss(reduction="none")(a, b), sq)
    torch.testing.assert_close(EDTLoss(reduction="sum")(a, b), sq.sum())
    ma, mb = (a > 0).float(), (b > 0).float()
    dice = 1 - 2 * (ma * mb).sum() / (ma.sum() + mb.sum())  # MONAI DiceLoss without smoothing terms, one channel
    ours = EDTDiceLoss(edt_scale=100.0)(ma, mb, a, b)
    torch.testing.assert_close(ours, 0.5 * (dice + 100 * sq.mean()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        EDTDiceLoss(reduction="none")
