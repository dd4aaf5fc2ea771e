"""Pairing rules of the MONAI Label app (pure Python: runs without MONAI Label installed)."""

import sys

import pytest
from bundle_utils import REPO

sys.path.insert(0, str(REPO / "apps" / "monailabel"))
from lib.pairing import PairingError, pairing_rule, split_by_subject  # noqa: E402

ACDC_IDS = [f"patient{p:03d}_frame{f:02d}" for p in (1, 2, 3, 4) for f in (1, 12)] + ["ThoraxCBCT_0000_0000"]


def test_acdc_moving_is_the_other_frame_and_training_stays_within_patients():
    rule = pairing_rule("segreg_acdc")
    assert rule.default_moving("patient002_frame12", ACDC_IDS) == "patient002_frame01"
    assert rule.default_moving("patient002_frame01", ACDC_IDS) == "patient002_frame12"
    pairs = rule.training_pairs(ACDC_IDS)
    assert len(pairs) == 8 and all(rule.subject(f) == rule.subject(m) and f != m for f, m in pairs)
    with pytest.raises(PairingError, match="moving_image"):
        rule.default_moving("patient009_frame01", ACDC_IDS)
    with pytest.raises(PairingError, match="patientNNN_frameMM"):
        rule.default_moving("ThoraxCBCT_0000_0000", ACDC_IDS)


def test_thorax_moving_is_the_planning_ct_of_the_same_case():
    rule = pairing_rule("segreg_thorax")
    ids = ["ThoraxCBCT_0011_0000", "ThoraxCBCT_0011_0001", "ThoraxCBCT_0011_0002", "ThoraxCBCT_0012_0001"]
    assert rule.default_moving("ThoraxCBCT_0011_0002", ids) == "ThoraxCBCT_0011_0000"
    with pytest.raises(PairingError, match="planning CT"):
        rule.default_moving("ThoraxCBCT_0011_0000", ids)
    with pytest.raises(PairingError, match="ThoraxCBCT_0012_0000"):
        rule.default_moving("ThoraxCBCT_0012_0001", ids)
    assert rule.training_pairs(ids) == [
        ("ThoraxCBCT_0011_0001", "ThoraxCBCT_0011_0000"),
        ("ThoraxCBCT_0011_0002", "ThoraxCBCT_0011_0000"),
    ]


@pytest.mark.parametrize("bundle", ["segreg_acdc", "segreg_abdomen"])
def test_split_puts_no_subject_on_both_sides(bundle):
    ids = ACDC_IDS[:-1] if bundle == "segreg_acdc" else [f"AbdomenCTCT_{i:04d}_0000" for i in range(1, 6)]
    rule = pairing_rule(bundle)
    train, val = split_by_subject(ids, rule, val_fraction=0.25)
    assert train and val
    subjects = [{rule.subject(i) for p in part for i in p} for part in (train, val)]
    assert not subjects[0] & subjects[1]


def test_a_patient_with_one_labelled_frame_is_not_a_validation_subject():
    rule = pairing_rule("segreg_acdc")
    ids = ACDC_IDS[:6] + ["patient004_frame01"]  # patients 1-3 complete, patient 4 has one labelled frame
    train, val = split_by_subject(ids, rule, val_fraction=0.2)
    assert {rule.subject(i) for p in val for i in p} == {"patient003"} and len(train) == 4


def test_split_without_pairs_says_what_to_label():
    with pytest.raises(PairingError, match="label maps"):
        split_by_subject(["patient001_frame01", "ThoraxCBCT_0000_0000"], pairing_rule("segreg_acdc"))
