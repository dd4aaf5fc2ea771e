import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure

from custom.degrade import degrade_labels
from custom.metrics import mean_dice


def two_boxes(shape=(24, 22, 12)):
    label = np.zeros(shape, np.int16)
    label[4:12, 5:15, 3:9] = 1
    label[13:20, 5:15, 3:9] = 2  # one voxel of background between the boxes
    return label


def test_one_voxel_erosion_and_dilation_match_scipy_with_the_6_neighbourhood():
    label = two_boxes()
    cross = generate_binary_structure(3, 1)
    eroded = degrade_labels(label, "erode", 1.0, (1, 1, 1))
    for i in (1, 2):
        np.testing.assert_array_equal(eroded == i, binary_erosion(label == i, cross, border_value=1))
    single = (label == 1).astype(np.int16)
    grown = degrade_labels(single, "dilate", 1.0, (1, 1, 1))
    np.testing.assert_array_equal(grown == 1, binary_dilation(single == 1, cross))


def test_dilation_never_overwrites_another_label_and_fills_the_gap_from_the_nearest():
    label = two_boxes()
    grown = degrade_labels(label, "dilate", 3.0, (1, 1, 1))
    assert (grown[label > 0] == label[label > 0]).all()
    assert grown[12, 10, 5] in (1, 2) and grown[2, 10, 5] == 1 and grown[22, 10, 5] == 2


def test_erosion_is_physical_on_thick_slices():
    label = np.zeros((24, 22, 12), np.int16)
    label[2:18, 3:19, 3:9] = 1
    eroded = degrade_labels(label, "erode", 4.0, (1.0, 1.0, 10.0))  # 4 mm: in-plane borders go, 10 mm slices stay
    assert (eroded[:, :, 3] == 1).any() and (eroded[:, :, 8] == 1).any()
    assert not (eroded[2:6] == 1).any() and (eroded[6:14, 7:15, 3:9] == 1).all()


def test_shift_moves_the_labels_by_the_amount_in_mm():
    label = two_boxes()
    moved = degrade_labels(label, "shift", 3.0, (1.0, 1.0, 1.0), seed=4)
    c0 = np.array(np.nonzero(label == 1)).mean(1)
    c1 = np.array(np.nonzero(moved == 1)).mean(1)
    assert abs(np.linalg.norm(c1 - c0) - 3.0) < 0.75  # nearest sampling rounds each axis


def test_boundary_noise_keeps_ids_and_worsens_with_the_amount():
    label = two_boxes((40, 36, 16))
    label[label > 0] = 0
    label[8:30, 8:28, 4:12] = 1
    dices = [mean_dice(degrade_labels(label, "noise", a, (1, 1, 1), seed=1), label, [1]) for a in (0.0, 1.0, 3.0)]
    assert dices[0] == 100 and dices[0] > dices[1] > dices[2], dices
    assert set(np.unique(degrade_labels(label, "noise", 3.0, (1, 1, 1)))) <= {0, 1}


def test_bad_arguments_are_refused():
    label = two_boxes()
    with pytest.raises(ValueError, match="kind"):
        degrade_labels(label, "blur", 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="amount_mm"):
        degrade_labels(label, "erode", -1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        degrade_labels(label, "erode", 1.0, (1, 1))
