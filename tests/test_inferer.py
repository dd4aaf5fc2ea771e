import pytest
import torch
from conftest import requires_cuda

from custom.inferer import SegRegInferer
from custom.networks import segreg_unet


class MaxIntensityNet(torch.nn.Module):
    """Predicts a constant field (0, c, 0) per sample, c = max of the fixed channel: a region's id-coded value."""

    def forward(self, x):
        c = x[:, 1].flatten(1).amax(1).view(-1, 1, 1, 1)
        v = torch.zeros((x.shape[0], 3) + x.shape[2:])
        v[:, 1] = c
        return v


def labelled_case(shape=(24, 20, 12), extra_fixed_region=False):
    label = torch.zeros((1, 1) + shape)
    label[:, :, 3:10, 4:15, 2:10] = 1
    label[:, :, 12:20, 4:15, 2:10] = 2
    moving_label = label.clone()
    if extra_fixed_region:
        label[:, :, 21:23, 2:5, 2:5] = 3
    fixed = label.clone().clamp(max=2)  # intensity = region id
    moving = moving_label.clone()
    return torch.cat([moving, fixed], 1), label, moving_label


@pytest.mark.parametrize("num_steps", [0, 7])
def test_composed_field_is_each_region_constant_inside_its_region(num_steps):
    inputs, fl, ml = labelled_case()
    out = SegRegInferer(margin=4, max_batch=2, num_steps=num_steps)(inputs, MaxIntensityNet(), fl, ml)
    ddf = out["ddf"]
    for r in (1, 2):
        inside = fl[0, 0] == r
        torch.testing.assert_close(ddf[0, 1][inside], torch.full((int(inside.sum()),), float(r)), atol=1e-4, rtol=0)
        assert ddf[0, 0][inside].abs().max() == 0
    assert ddf[0, 1][fl[0, 0] == 0].abs().max() == 0  # background fixed intensity 0 -> zero field
    assert out["warped_image"].shape == out["warped_label"].shape == (1, 1, 24, 20, 12)


def test_cropping_and_batching_do_not_change_the_result():
    inputs, fl, ml = labelled_case()
    net = MaxIntensityNet()
    ref = SegRegInferer(crop=False, max_batch=8, num_steps=0)(inputs, net, fl, ml)["ddf"]
    for crop, max_batch in ((True, 1), (True, 3)):
        ddf = SegRegInferer(crop=crop, max_batch=max_batch, num_steps=0)(inputs, net, fl, ml)["ddf"]
        torch.testing.assert_close(ddf, ref)


class ShapeRecorder(MaxIntensityNet):
    """MaxIntensityNet that records the shape of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


def small_regions_case():
    """Three 6 x 6 x 4 regions in a 64 x 64 x 16 image: their boxes are far smaller than the background's."""
    label = torch.zeros((1, 1, 64, 64, 16))
    for r, x0 in ((1, 5), (2, 25), (3, 45)):
        label[:, :, x0 : x0 + 6, 20:26, 6:10] = r
    return torch.cat([label.clamp(max=1), label.clamp(max=1)], 1), label, label.clone()


@pytest.mark.parametrize(
    "max_padding, expected",
    [(0.5, [(1, 2, 64, 64, 16), (3, 2, 16, 16, 16)]), (float("inf"), [(4, 2, 64, 64, 16)])],
)
def test_batches_are_not_padded_past_max_padding(max_padding, expected):
    inputs, fl, ml = small_regions_case()
    net = ShapeRecorder()
    ref = SegRegInferer(crop=False, max_batch=1, num_steps=0)(inputs, net, fl, ml)["ddf"]
    net.shapes.clear()
    ddf = SegRegInferer(margin=2, max_batch=4, max_padding=max_padding, num_steps=0)(inputs, net, fl, ml)["ddf"]
    assert net.shapes == expected  # 4 x 65536 padded voxels for 3 x 4096 + 65536 needed is 2.4 extra: split at 0.5
    torch.testing.assert_close(ddf, ref)
    with pytest.raises(ValueError, match="max_padding"):
        SegRegInferer(max_padding=-0.1)


def test_region_missing_in_moving_is_skipped_with_a_warning():
    inputs, fl, ml = labelled_case(extra_fixed_region=True)
    with pytest.warns(UserWarning, match=r"\[3\].*background"):
        out = SegRegInferer(num_steps=0)(inputs, MaxIntensityNet(), fl, ml)
    assert out["ddf"][0, 1][fl[0, 0] == 3].abs().max() == 0  # fell to background (field 0)


def test_real_backbone_on_sizes_that_are_not_multiples_of_16():
    inputs, fl, ml = labelled_case(shape=(21, 19, 13))
    net = segreg_unet(channels=(4, 8, 8, 8, 8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,)).eval()
    with torch.no_grad():
        out = SegRegInferer(margin=3, max_batch=2)(inputs, net, fl, ml)
    assert out["ddf"].shape == (1, 3, 21, 19, 13) and torch.isfinite(out["ddf"]).all()


def test_bad_inputs_are_clear_errors():
    inputs, fl, ml = labelled_case()
    with pytest.raises(ValueError, match="label maps"):
        SegRegInferer()(inputs, MaxIntensityNet())
    with pytest.raises(ValueError, match="resample"):
        SegRegInferer()(inputs, MaxIntensityNet(), fl[..., :-1], ml)


@requires_cuda
def test_inferer_cuda_matches_cpu():
    inputs, fl, ml = labelled_case()
    net = segreg_unet(channels=(4, 8, 8, 8, 8, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,)).eval()
    with torch.no_grad():
        ref = SegRegInferer()(inputs, net, fl, ml)["ddf"]
        out = SegRegInferer()(inputs.cuda(), net.cuda(), fl.cuda(), ml.cuda())["ddf"].cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
